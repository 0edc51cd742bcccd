"""Learned restorers, each a LightningModule trained with a frozen classifier in its loss
(restorers/base.py), and the defenses they give at inference, registered by export kind."""
from defenses.factory import EXPORTED_DEFENSES
from restorers.base import RestorerModule
from restorers.inpainter import InpainterRestorer, InpaintingNetwork, cii_defense_from_export
from restorers.rain import RainDefense, RainRestorer, rain_defense_from_export
from restorers.sr import SuperResolutionDefense, SuperResolutionRestorer, sr_defense_from_export
from restorers.trn import TrnDefense, TrnRestorer, TwoStreamRestorationNetwork, trn_defense_from_export

# Export kind -> the module class that trains it (to rebuild one from a .ckpt) and the defense builder.
RESTORER_MODULES: dict[str, type[RestorerModule]] = {
    "sr": SuperResolutionRestorer, "rain": RainRestorer, "trn": TrnRestorer, "cii": InpainterRestorer,
}
EXPORTED_DEFENSES.update({
    "sr": sr_defense_from_export, "rain": rain_defense_from_export, "trn": trn_defense_from_export, "cii": cii_defense_from_export,
})

__all__ = [
    "InpainterRestorer", "InpaintingNetwork", "RESTORER_MODULES", "RainDefense", "RainRestorer", "RestorerModule", "SuperResolutionDefense", "SuperResolutionRestorer",
    "TrnDefense", "TrnRestorer", "TwoStreamRestorationNetwork",
]
