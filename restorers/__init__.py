"""Learned restorers (EDSR super-resolution, RAIN, TRN), each a LightningModule trained with a
frozen classifier in its loss. They arrive with their issues; the frozen classifier they use is
classifiers.FrozenClassifier, loaded with classifiers.load_classifier."""
