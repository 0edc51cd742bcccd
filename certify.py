"""Randomized smoothing's certificate behind a frozen classifier, with or without a denoiser.

    python certify.py --classifier checkpoints/victim_shapes.pt \\
        --defense checkpoints/denoiser_shapes.pt smoothing:sigma=0.25 --n 100 --estimation-draws 1000 \\
        --out results/certify_shapes

For each class-balanced test image and each smoothing defense (a denoiser export of
restorers/denoiser.py, or smoothing:sigma=... for the classifier alone): Cohen et al.'s CERTIFY
(--selection-draws n0, --estimation-draws n, --alpha), the certified-accuracy-vs-radius curve, and
the empirical check that no certified image is flipped; certify.csv, curve.csv, results.json,
results.md and curve.png to --out. The run itself: evaluation/certification.py.
"""

from evaluation.certification import main

if __name__ == "__main__":
    main()
