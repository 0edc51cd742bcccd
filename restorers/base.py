"""The LightningModule every restorer builds on: a restorer network trained with a frozen
classifier in its loss, validated as a defense.

Training, top-down (`training_step`):
    batch (x clean, y) -> make_pair: degradation or on-the-fly attack -> (inputs, target)
    -> restore(inputs) -> restoration loss (L1 to target) + classifier loss on the restored image
    -> logs
The classifier loss is cross-entropy of the frozen classifier on the restored image (`ce`), or
HGD's (Liao et al. 2018) L1 between the classifier's logits on the restored and on the clean image
(`logits_l1`), or denoised smoothing's stability loss (Salman et al. 2020): cross-entropy against the
classifier's own label of the clean image (`stability`: no true label needed). The classifier is a
FrozenClassifier: requires_grad False, always in eval mode, not in the optimizer; its weights come
from the victim file whose path and hash the export keeps.

Validation each epoch (on the `val_images` held out of the training split), and `train.py
test` on the whole test split: PSNR/SSIM of the restorer's input
(brought to the target size) and of its output against the clean image, the defended clean
accuracy, and the defended gray-box PGD accuracy (attack the classifier alone, defend, classify);
image grids to TensorBoard.

A restorer is one module: a subclass with a `kind`, registered with `@register_restorer`
(restorers/registry.py), that implements the contract below (checked when it registers):
- training: `make_pair`, `restore`, `input_as_image` (and optionally `restoration_loss`,
  `evaluation_pair`);
- the network and the defense, each from one settings dict: `network_settings()` and
  `build_network(**settings)` (the base builds `self.restorer` with them), `defense_settings()`
  and `defense_around(network, classifier, **settings)`. The export file holds both dicts, so
  `defense()` in training and `defense_from_export` in eval.py build the same defense from the
  same keys: the writer and the reader cannot drift apart.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal, get_args

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchvision.utils import make_grid

from attacks import GradientAttack, seeded_generator
from classifiers import load_classifier
from classifiers.frozen import misfit, spec_misfit
from defenses.base import Defense
from engine.errors import InputError
from engine.export import NotAnExportError, file_sha256, make_export, read_export

ClassifierLoss = Literal["ce", "logits_l1", "stability"]
Schedule = Literal["cosine", "constant"]


class RestorerModule(pl.LightningModule):
    """Base of the restorers.

    Args:
        classifier: the victim file (export .pt or VictimModule .ckpt) frozen in the loss.
        num_classes, in_chans: linked from the data module; checked against the classifier.
        restoration_weight, classifier_weight: weights of the L1 restoration loss and of the
            classifier-in-the-loop loss; classifier_loss: "ce", "logits_l1" (HGD) or "stability".
        lr, weight_decay, schedule: AdamW and its per-step schedule.
        adversarial_share: share of each training batch that restorers which train on adversarial
            inputs replace by adversarial images (`adversarial_part`); attack_eps, attack_steps:
            that training attack (Linf PGD with random start against the frozen classifier).
        val_eps, val_steps: the gray-box Linf PGD of the validation.
        grid_images: images per TensorBoard grid.
        compile_networks: torch.compile the frozen classifier and the restorer network, in place
            (their state dicts keep their keys: checkpoints and exports load with or without it).
            Compiling takes tens of seconds and pays off in long GPU runs (docs/RESULTS.md).
        init_from: an export of this kind whose network (the same settings, and what
            `start_requirements` names) the restorer starts from: a second stage or a fine-tuning.
            The optimizer, the schedule and the step count start afresh; resuming a run is --ckpt_path.
    """

    kind: ClassVar[str] = ""  # the export kind, e.g. "sr": written once, on the subclass
    restoration_name: ClassVar[str] = "l1"  # what restoration_loss measures: its name in the logs
    # What a registered subclass must define (RestorerModule.check_contract).
    CONTRACT: ClassVar[tuple[str, ...]] = (
        "make_pair",
        "restore",
        "input_as_image",
        "network_settings",
        "build_network",
        "defense_settings",
        "defense_around",
    )

    def __init__(
        self,
        classifier: str,
        num_classes: int = 10,
        in_chans: int = 3,
        restoration_weight: float = 1.0,
        classifier_weight: float = 0.1,
        classifier_loss: ClassifierLoss = "ce",
        lr: float = 2e-4,
        weight_decay: float = 0.0,
        schedule: Schedule = "cosine",
        adversarial_share: float = 0.0,
        attack_eps: float = 8 / 255,
        attack_steps: int = 5,
        val_eps: float = 8 / 255,
        val_steps: int = 10,
        grid_images: int = 8,
        compile_networks: bool = False,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        if not 0 <= adversarial_share <= 1:
            raise ValueError(f"adversarial_share must be in [0, 1], got {adversarial_share}")
        if classifier_loss not in get_args(ClassifierLoss):
            raise ValueError(f"classifier_loss must be one of {get_args(ClassifierLoss)}, got {classifier_loss!r}")
        self.save_hyperparameters()  # collects the subclass's arguments too
        self.classifier = load_classifier(classifier)
        self.victim = {"path": str(classifier), "sha256": file_sha256(classifier)}
        # What the classifier's file says, at once (no forward pass: no device and no image size are known
        # yet; a probe in `setup` once met the classifier on the CPU while `self.device` said cuda).
        self._refuse_misfit(spec_misfit(self.classifier, in_chans, num_classes))
        self.restorer = self.build_network(**self.network_settings())
        if init_from is not None:
            self._load_start(init_from)
        if compile_networks:  # lazily: the first call compiles, on whatever device the module is then
            self.classifier.compile()
            self.restorer.compile()
        self.psnr_in = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.psnr_out = PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3))
        self.ssim_in = StructuralSimilarityIndexMeasure(data_range=1.0)
        self.ssim_out = StructuralSimilarityIndexMeasure(data_range=1.0)

    # --- what each restorer defines ------------------------------------------------------
    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        """(restorer input, target) from a clean batch x (N,C,H,W) in [0,1] and labels y (N,).

        step seeds the random draws (with the rank); evaluation: no training attack (a validation pair)."""
        raise NotImplementedError

    def restore(self, inputs: Tensor) -> Tensor:
        """The restorer on make_pair's inputs -> images shaped like the target."""
        raise NotImplementedError

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        """make_pair's inputs as an image the size of the target (the baseline the restorer must beat)."""
        raise NotImplementedError

    def network_settings(self) -> dict[str, Any]:
        """The arguments of build_network, from the hyperparameters (plain values: they go into the export)."""
        raise NotImplementedError

    @staticmethod
    def build_network(**settings: Any) -> nn.Module:
        """The restorer network from network_settings()."""
        raise NotImplementedError

    def defense_settings(self) -> dict[str, Any]:
        """The arguments of defense_around besides the network and classifier (plain values)."""
        raise NotImplementedError

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> Defense:
        """The defense at inference around a network (shared, not copied), with the classifier it may need."""
        raise NotImplementedError

    @staticmethod
    def settings_from_v1(model: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """(network_settings, defense_settings) of an export file of version 1, written before the two
        dicts existed; kinds that never wrote version 1 have none."""
        raise NotAnExportError("this restorer kind has no version-1 export files")

    def start_requirements(self) -> dict[str, Any]:
        """What an `init_from` export must have trained with besides the network's settings (keys of
        its model["training"] and their values here); nothing by default."""
        return {}

    def _load_start(self, path: str) -> None:
        """The network's weights from an export of this kind and the same settings (strict)."""
        export = read_export(path, self.kind)
        model = export["model"]
        network = model["network"] if export["version"] >= 2 else self.settings_from_v1(model)[0]
        theirs = {"network": network, **{key: model.get("training", {}).get(key) for key in self.start_requirements()}}
        ours = {"network": self.network_settings(), **self.start_requirements()}
        if theirs != ours:
            raise ValueError(
                f"init_from '{path}' is a {self.kind} restorer with {theirs}, this one has {ours}: "
                f"start from a {self.kind} export of the same {' and '.join(ours)}"
            )
        self.restorer.load_state_dict(export["state_dict"], strict=True)

    def restoration_loss(self, restored: Tensor, target: Tensor, inputs: Tensor) -> Tensor:
        """L1 between the restored image and the target, over every pixel (restorers that change only
        some pixels average over those instead)."""
        return F.l1_loss(restored.float(), target.float())

    @classmethod
    def check_contract(cls) -> None:
        """Raise TypeError naming what `cls` lacks to be a restorer (registry.register_restorer calls it)."""
        if not isinstance(cls.kind, str) or not cls.kind:
            raise TypeError(f"{cls.__qualname__} needs a `kind`: the export kind, written once on the class")
        missing = [name for name in cls.CONTRACT if getattr(cls, name) is getattr(RestorerModule, name)]
        if missing:
            raise TypeError(f"{cls.__qualname__} does not define {missing} (the contract in restorers/base.py)")

    # --- shared ----------------------------------------------------------------------------
    def check_data(self, image_shape: tuple[int, int, int], num_classes: int) -> None:
        """Raise InputError when the frozen classifier cannot score a data set's images of `image_shape`
        (C,H,W) and `num_classes` classes: its input size too, which only a forward pass shows.
        train.py asks before anything of the run is written."""
        self._refuse_misfit(misfit(self.classifier, image_shape, num_classes))

    def _refuse_misfit(self, problem: str | None) -> None:
        if problem is not None:
            raise InputError(
                f"the classifier '{self.victim['path']}' does not fit the data: {problem}; "
                "train the restorer on the data its classifier was trained on"
            )

    def adversarial_part(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> Tensor:
        """PGD adversarials (k,C,H,W) in [0,1] of the batch's first k = round(adversarial_share * N)
        images against `attacked_model()` at `training_epsilon(step)`, seeded by (step, rank); none
        (k = 0) in evaluation."""
        count = 0 if evaluation else round(self.hparams.adversarial_share * len(x))
        if not count:
            return x[:0]
        with torch.enable_grad():
            attack = GradientAttack("linf", self.training_epsilon(step), self.hparams.attack_steps)
            generator = seeded_generator(x.device, step, self.global_rank)
            return attack(self.attacked_model(), x[:count], y[:count], generator)

    def attacked_model(self) -> nn.Module:
        """What the training attack differentiates: the frozen classifier alone (the papers' gray-box
        training; restorers/robust.py attacks through the restorer too)."""
        return self.classifier

    def training_epsilon(self, step: int) -> float:
        """The training attack's budget at `step`: attack_eps (restorers/robust.py ramps it up)."""
        return self.hparams.attack_eps

    def validation_attack(self, x: Tensor, y: Tensor, batch_idx: int) -> Tensor:
        """The validation's gray-box adversarials (N,C,H,W) in [0,1]: Linf PGD (val_eps, val_steps)
        against the classifier alone, seeded by the batch index."""
        with torch.enable_grad():  # validation inside fit runs under no_grad; the attack needs gradients
            attack = GradientAttack("linf", self.hparams.val_eps, self.hparams.val_steps)
            return attack(self.classifier, x, y, seeded_generator(x.device, 0, batch_idx))

    def evaluation_pair(self, x: Tensor, y: Tensor, x_adv: Tensor, batch_idx: int) -> tuple[Tensor, Tensor]:
        """The (inputs, target) whose PSNR/SSIM validation reports: make_pair without the training attack,
        its draws seeded by -1 - batch_idx (apart from every training step's); restorers of adversarial
        inputs use x_adv instead."""
        return self.make_pair(x, y, -1 - batch_idx, evaluation=True)

    def training_attack(self) -> dict[str, Any]:
        """The training attack as the export records it."""
        hp = self.hparams
        return {
            "adversarial_share": hp.adversarial_share,
            "attack": "linf-pgd",
            "attack_eps": hp.attack_eps,
            "attack_steps": hp.attack_steps,
            "classifier_loss": hp.classifier_loss,
            "classifier_weight": hp.classifier_weight,
        }

    def classifier_term(self, restored: Tensor, clean: Tensor, y: Tensor) -> Tensor:
        """The classifier-in-the-loop loss named by the `classifier_loss` hyperparameter (fp32)."""
        return self.classifier_term_of_logits(self.classifier(restored), clean, y)

    def classifier_term_of_logits(self, logits: Tensor, clean: Tensor, y: Tensor) -> Tensor:
        """classifier_term from the classifier's logits (N,K) on the restored images, already computed."""
        if self.hparams.classifier_loss == "ce":
            return F.cross_entropy(logits.float(), y)
        with torch.no_grad():
            reference = self.classifier(clean)
        if self.hparams.classifier_loss == "stability":
            return F.cross_entropy(logits.float(), reference.argmax(1))
        return F.l1_loss(logits.float(), reference.float())

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        inputs, target = self.make_pair(x, y, self.global_step)
        restored = self.restore(inputs)
        restoration = self.restoration_loss(restored, target, inputs)
        in_the_loop = (
            self.classifier_term(restored, x, y) if self.hparams.classifier_weight else restoration.new_zeros(())
        )
        loss = self.hparams.restoration_weight * restoration + self.hparams.classifier_weight * in_the_loop
        # No prog_bar: Lightning reads progress-bar values back with .item() after every step, a host sync
        # that stalls the GPU's queue (issue 18); TensorBoard gets them every log_every_n_steps.
        self.log_dict(
            {"train/loss": loss, f"train/{self.restoration_name}": restoration, "train/classifier_loss": in_the_loop}
        )
        return loss

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, batch_idx, "test")

    def _evaluate(self, batch: tuple[Tensor, Tensor], batch_idx: int, stage: str) -> None:
        x, y = batch
        x_adv = self.validation_attack(x, y, batch_idx)
        inputs, target = self.evaluation_pair(x, y, x_adv, batch_idx)
        defense = self.defense()
        restored = self.restore(inputs).clamp(0, 1).float()
        baseline = self.input_as_image(inputs, target).clamp(0, 1).float()
        self._update_image_metrics(baseline, restored, target.float(), stage)
        self.log(f"{stage}/acc", (self.classifier(defense(x)).argmax(1) == y).float().mean(), batch_size=len(y))
        self.log(
            f"{stage}/graybox_acc", (self.classifier(defense(x_adv)).argmax(1) == y).float().mean(), batch_size=len(y)
        )
        if batch_idx == 0 and stage == "val":
            self._log_grid(target, baseline, restored)

    def _update_image_metrics(self, baseline: Tensor, restored: Tensor, target: Tensor, stage: str) -> None:
        for metric, image in (
            (self.psnr_in, baseline),
            (self.ssim_in, baseline),
            (self.psnr_out, restored),
            (self.ssim_out, restored),
        ):
            metric.update(image, target)
        self.log_dict(
            {
                f"{stage}/psnr": self.psnr_out,
                f"{stage}/psnr_input": self.psnr_in,
                f"{stage}/ssim": self.ssim_out,
                f"{stage}/ssim_input": self.ssim_in,
            }
        )

    def _log_grid(self, clean: Tensor, degraded: Tensor, restored: Tensor) -> None:
        """clean / degraded / restored / residual (restored - degraded) x4 around grey."""
        writer = getattr(self.logger, "experiment", None)
        if writer is None or not hasattr(writer, "add_image") or self.trainer.sanity_checking:
            return
        k = self.hparams.grid_images
        residual = ((restored[:k] - degraded[:k]) * 4 + 0.5).clamp(0, 1)
        grid = make_grid(torch.cat([clean[:k].float(), degraded[:k], restored[:k], residual]), nrow=len(clean[:k]))
        writer.add_image("val/clean_degraded_restored_residual", grid, self.global_step)

    def configure_optimizers(self) -> dict[str, Any]:
        optimizer = torch.optim.AdamW(
            self.restorer.parameters(), lr=self.hparams.lr, weight_decay=self.hparams.weight_decay
        )
        total = int(self.trainer.estimated_stepping_batches)
        scheduler = (
            torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
            if self.hparams.schedule == "cosine"
            else torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def defense(self) -> Defense:
        """The defense this restorer gives at inference (sharing this module's network and classifier)."""
        return self.defense_around(self.restorer, self.classifier, **self.defense_settings())

    def to_export(self, meta: dict[str, Any]) -> dict[str, Any]:
        """The export dict (see engine.export): the restorer's weights, never the classifier's, and the
        two settings dicts that rebuild its network and its defense."""
        model = {
            "network": self.network_settings(),
            "defense": self.defense_settings(),
            "training": self.training_attack(),
            "victim": self.victim,
        }
        return make_export(self.kind, model, self.restorer.state_dict(), meta)

    @classmethod
    def defense_from_export(cls, export: dict[str, Any], classifier: nn.Module | None) -> Defense:
        """The defense of an export file of this kind (strict weight loading), around `classifier`."""
        model = export["model"]
        if export["version"] >= 2:
            network_settings, defense_settings = model["network"], model["defense"]
        else:
            network_settings, defense_settings = cls.settings_from_v1(model)
        network = cls.build_network(**network_settings)
        network.load_state_dict(export["state_dict"], strict=True)
        return cls.defense_around(network, classifier, **defense_settings)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["restorer_kind"] = self.kind  # lets restorers.export rebuild the module from a .ckpt
