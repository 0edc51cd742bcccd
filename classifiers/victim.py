"""Train a victim classifier: batch -> classifier -> cross-entropy -> logs.

    python train.py fit --config configs/victim_cifar10.yaml

Label smoothing is off by default, on purpose: it masks gradients. In the project's field notes
(CIFAR-10 ResNet-18, undefended, Linf PGD-10 at 8/255), label smoothing 0.1 left 14.7% accuracy,
against 0.0% without it: the victim looked robust only because the attack's gradients were flattened.
A victim for robustness experiments should make attacks look as strong as they are.
"""

from __future__ import annotations

from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from classifiers.factory import build_classifier
from classifiers.frozen import NormalizedClassifier
from engine.export import check_export, load_weights_only, make_export

# Hyperparameters that rebuild the classifier; the export file keeps exactly these.
CLASSIFIER_SPEC_KEYS = ("arch", "num_classes", "in_chans", "arch_kwargs", "mean", "std")


class VictimModule(pl.LightningModule):
    """A classifier trained on [0,1] images, normalization inside.

    Args:
        arch: network name for classifiers.factory.build_classifier (e.g. resnet18_cifar,
            preact_resnet18, small_cnn, timm/<name>, torchvision/<name>).
        num_classes, in_chans: linked from the data module by train.py.
        arch_kwargs: extra arguments of the architecture (e.g. {"width": 32}).
        mean, std: per-channel normalization; None = 0.5 per channel.
        pretrained: fetch the hub family's pretrained weights (timm/, torchvision/ only).
        weights: a local file to start from: a state dict of the network, or an export file.
        optimizer, lr, momentum, nesterov, weight_decay: the optimizer (SGD or AdamW).
        schedule: learning-rate schedule over the whole run, stepped per batch.
        label_smoothing: keep 0 for victims (see the module docstring).
    """

    def __init__(
        self,
        arch: str = "small_cnn",
        num_classes: int = 10,
        in_chans: int = 3,
        arch_kwargs: dict[str, Any] | None = None,
        mean: list[float] | None = None,
        std: list[float] | None = None,
        pretrained: bool = False,
        weights: str | None = None,
        optimizer: Literal["sgd", "adamw"] = "sgd",
        lr: float = 0.1,
        momentum: float = 0.9,
        nesterov: bool = True,
        weight_decay: float = 5e-4,
        schedule: Literal["onecycle", "cosine", "constant"] = "onecycle",
        label_smoothing: float = 0.0,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        net = build_classifier(arch, num_classes, in_chans, pretrained=pretrained, **(arch_kwargs or {}))
        if weights is not None:
            net.load_state_dict(_state_dict_from(weights), strict=True)
        self.classifier = NormalizedClassifier(net, mean, std)
        self.train_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.val_accuracy = MulticlassAccuracy(num_classes, average="micro")
        self.test_accuracy = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        """x: (N,C,H,W) float in [0,1] -> logits (N,K)."""
        return self.classifier(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        self.train_accuracy.update(logits.detach(), y)  # on_epoch only: no per-batch value to compute
        # No prog_bar: Lightning reads progress-bar values back with .item() after every step, a host sync
        # that stalls the GPU's queue (issue 18); TensorBoard gets them every log_every_n_steps.
        self.log("train/loss", loss)
        self.log("train/acc", self.train_accuracy, on_step=False, on_epoch=True)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        x, y = batch
        logits = self(x)
        accuracy(logits, y)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_accuracy)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_accuracy)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        if hp.optimizer == "sgd":
            optimizer = torch.optim.SGD(
                self.parameters(), lr=hp.lr, momentum=hp.momentum, nesterov=hp.nesterov, weight_decay=hp.weight_decay
            )
        else:
            optimizer = torch.optim.AdamW(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        total_steps = int(self.trainer.estimated_stepping_batches)
        schedulers = {
            "onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=hp.lr, total_steps=total_steps),
            "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps),
            "constant": lambda: torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0),
        }
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedulers[hp.schedule](), "interval": "step"}}

    def to_export(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The export dict of this victim (see engine.export): rebuilt by classifiers.load_classifier."""
        spec = {key: self.hparams[key] for key in CLASSIFIER_SPEC_KEYS}
        return make_export("classifier", spec, self.classifier.net.state_dict(), meta)


def _state_dict_from(path: str) -> dict[str, Tensor]:
    """A network state dict from a plain state-dict file or from one of our export files."""
    loaded = load_weights_only(path, "weights file")
    if isinstance(loaded, dict) and "format" in loaded:
        return check_export(loaded, path, kind="classifier")["state_dict"]
    if not isinstance(loaded, dict) or not all(isinstance(v, Tensor) for v in loaded.values()):
        raise ValueError(f"'{path}' is neither a state dict (name -> tensor) nor an export file")
    return loaded
