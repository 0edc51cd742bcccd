"""The deep-image-prior defense: fit an untrained network to each input and read the classifier
along the way (Ding et al., ACM MM 2021, after DIPDefend, Dai et al., ACM MM 2020).

    python eval.py ... --defense configs/defenses/dip_cifar10.yaml

A network fitted to an image reproduces its low frequencies long before its high frequencies
(Ulyanov et al. 2018), and an adversarial perturbation lives in the high frequencies. The
reconstructions of an adversarial image therefore start on the data manifold, classified as the
true class, and cross the decision boundary into the adversarial class late in the fit. For
x (N,C,H,W) in [0,1] (our reading of the method; the papers' code is not public):

1. fit one small skip network per image, f_n(z_n) ~ x_n, Adam at `lr` on the pixel MSE for at
   most `iterations` steps, all N networks at once (grouped convolutions: one call per layer
   for the whole batch);
2. every `record_every` steps, keep the reconstruction and the classifier's label of it; the
   first `warmup_records` (too blurry to classify) do not count;
3. stopping: with `stop_psnr`, an image's trajectory ends once the moving average (factor
   `psnr_smoothing`) of PSNR(reconstruction, x) passes it (the fit is reproducing the input's
   finest detail), and the fit ends when every trajectory has; without it, at `iterations`;
4. boundary detection: the trajectory crosses into the input's own label y(x) at the first
   record after which every record has that label. If the records just before the crossing
   held one other label c for at least `min_run` records in a row (a label the reconstruction
   settled on, not the flicker of blurry early records), the input is taken to be adversarial:
   the last on-manifold records (label c, at most `stitch_records`) and the on-boundary record
   (the last one before the crossing), stepped away from x by `step_away` * (record - x), are
   averaged into the output;
5. otherwise (a clean input keeps its label; an unsettled one never reaches y(x)) the output is
   the last record.

The networks' weights and input noise are drawn from the defense's generator, so the defense is
randomized (eval.py scores several draws and attacks it with EOT), and the fit is an optimisation
loop, not differentiable: eval.py attacks it with BPDA (identity surrogate).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from defenses.base import Defense


class GroupedConv2d(nn.Module):
    """`count` independent k x k convolutions, one per image, run as one grouped convolution.

    (count, in_channels, H, W) -> (count, out_channels, H/stride, W/stride). Weights and biases are
    drawn as nn.Conv2d's default (uniform in +-1/sqrt(fan_in)) from `generator`.
    """

    def __init__(
        self,
        count: int,
        in_channels: int,
        out_channels: int,
        kernel: int,
        stride: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()
        device, bound = generator.device, 1 / math.sqrt(in_channels * kernel * kernel)

        def uniform(*shape: int) -> nn.Parameter:
            return nn.Parameter((torch.rand(*shape, generator=generator, device=device) * 2 - 1) * bound)

        self.weight = uniform(count * out_channels, in_channels, kernel, kernel)
        self.bias = uniform(count * out_channels)
        self.count = count
        self.out_channels = out_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        out = F.conv2d(
            x.reshape(1, -1, height, width),
            self.weight,
            self.bias,
            self.stride,
            self.weight.shape[-1] // 2,
            groups=self.count,
        )
        return out.view(self.count, self.out_channels, *out.shape[-2:])


class GroupedSkipNetwork(nn.Module):
    """`count` small skip networks (DIP's encoder-decoder with skip connections), one per image.

    noise (count, noise_channels, H, W) -> images (count, out_channels, H, W) in (0,1). Each level
    halves the resolution (stride-2 conv, conv); the decoder upsamples bilinearly, concatenates a
    `skip_channels` 1x1 projection of the encoder's input at that level and convolves. Instance
    normalisation (DIP's BatchNorm on one image) and LeakyReLU(0.2) after every 3x3 convolution.
    """

    def __init__(
        self,
        count: int,
        noise_channels: int,
        out_channels: int,
        widths: Sequence[int],
        skip_channels: int,
        generator: torch.Generator,
    ) -> None:
        super().__init__()

        def conv(in_channels: int, out: int, kernel: int = 3, stride: int = 1) -> GroupedConv2d:
            return GroupedConv2d(count, in_channels, out, kernel, stride, generator)

        self.down = nn.ModuleList()
        self.skips = nn.ModuleList()
        self.up = nn.ModuleList()
        channels = noise_channels
        for width in widths:
            self.skips.append(conv(channels, skip_channels, kernel=1))
            self.down.append(nn.ModuleList([conv(channels, width, stride=2), conv(width, width)]))
            channels = width
        for width in reversed(widths):
            self.up.append(conv(channels + skip_channels, width))
            channels = width
        self.out = conv(channels, out_channels, kernel=1)

    @staticmethod
    def _act(x: Tensor) -> Tensor:
        return F.leaky_relu(F.instance_norm(x), 0.2)

    def forward(self, noise: Tensor) -> Tensor:
        skips, x = [], noise
        for skip, (strided, conv) in zip(self.skips, self.down):
            skips.append(skip(x))
            x = self._act(conv(self._act(strided(x))))
        for conv, skip in zip(self.up, reversed(skips)):
            x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = self._act(conv(torch.cat([x, skip], dim=1)))
        return torch.sigmoid(self.out(x))


def _suffix_all(values: Tensor) -> Tensor:
    """values: (K,N) bool -> (K,N) bool, True at k when every value at k and after is True."""
    return values.flip(0).int().cumprod(0).flip(0).bool()


def _run_lengths(labels: Tensor, valid: Tensor) -> Tensor:
    """(K,N) -> (K,N) long: how many valid records in a row, ending at k, have record k's label (0 where invalid)."""
    runs = [valid[0].long()]
    for k in range(1, len(labels)):
        same = valid[k - 1] & (labels[k] == labels[k - 1])
        runs.append(torch.where(valid[k], torch.where(same, runs[-1] + 1, 1), 0))
    return torch.stack(runs)


def stitch_trajectory(
    records: Tensor,
    labels: Tensor,
    valid: Tensor,
    x: Tensor,
    input_labels: Tensor,
    min_run: int,
    stitch_records: int,
    step_away: float,
) -> Tensor:
    """Steps 4-5 of the module docstring, for every image at once.

    records: (K,N,C,H,W) reconstructions in [0,1]; labels: (K,N) their predicted labels; valid:
    (K,N) bool, records that count (after warm-up, before the image stopped; at least one per
    image); x: (N,C,H,W) the inputs; input_labels: (N,) y(x); min_run: records in a row the
    on-manifold label must hold up to the boundary for a crossing to count. Returns (N,C,H,W) in [0,1].
    """
    order = torch.arange(len(records), device=records.device).unsqueeze(1)
    settled = valid & _suffix_all((labels == input_labels) | ~valid)
    last_valid = torch.where(valid, order, -1).amax(0)
    crossing = torch.where(settled, order, len(records)).amin(0)  # K: never settles on y(x)
    boundary = torch.where(valid & (order < crossing), order, -1).amax(0)  # the last valid record before it
    held = _run_lengths(labels, valid).gather(0, boundary.clamp_min(0).unsqueeze(0)).squeeze(0)
    crossed = (crossing < len(records)) & (boundary >= 0) & (held >= min_run)
    manifold_label = labels.gather(0, boundary.clamp_min(0).unsqueeze(0)).squeeze(0)
    on_manifold = valid & (order < crossing) & (labels == manifold_label)
    on_manifold &= on_manifold.flip(0).int().cumsum(0).flip(0) <= stitch_records  # the last ones
    is_boundary = (order == boundary).view(*labels.shape, 1, 1, 1)
    stepped = torch.where(is_boundary, records + step_away * (records - x), records)
    selected = torch.where(crossed, on_manifold, order == last_valid)  # (K,N)
    weights = selected.float().view(*labels.shape, 1, 1, 1)
    return ((weights * stepped).sum(0) / weights.sum(0)).clamp(0, 1)


class DipDefense(Defense):
    """The deep-image-prior defense (module docstring). Settings: the fit (iterations, lr,
    widths, skip_channels, noise_channels, noise_scale), the trajectory (record_every,
    warmup_records, stop_psnr, psnr_smoothing) and the stitching (stitch_records, step_away)."""

    differentiable = False
    randomized = True
    needs_classifier = True

    def __init__(
        self,
        classifier: nn.Module,
        iterations: int = 300,
        lr: float = 0.01,
        record_every: int = 10,
        warmup_records: int = 5,
        min_run: int = 2,
        stop_psnr: float | None = None,
        psnr_smoothing: float = 0.9,
        stitch_records: int = 5,
        step_away: float = 0.5,
        widths: Sequence[int] = (16, 32),
        skip_channels: int = 4,
        noise_channels: int = 8,
        noise_scale: float = 0.1,
    ) -> None:
        super().__init__()
        if record_every < 1 or iterations < record_every * (warmup_records + 1):
            raise ValueError(
                f"iterations ({iterations}) must leave at least one record after the warm-up: "
                f"iterations >= record_every * (warmup_records + 1) = {record_every * (warmup_records + 1)}"
            )
        if lr <= 0 or min(min_run, stitch_records) < 1 or not widths or not 0 <= psnr_smoothing < 1:
            raise ValueError(
                "lr must be > 0, min_run and stitch_records >= 1, widths non-empty and psnr_smoothing in [0, 1)"
            )
        self.classifier = classifier
        self.iterations = iterations
        self.lr = lr
        self.record_every = record_every
        self.warmup_records = warmup_records
        self.min_run = min_run
        self.stop_psnr = stop_psnr
        self.psnr_smoothing = psnr_smoothing
        self.stitch_records = stitch_records
        self.step_away = step_away
        self.widths = tuple(widths)
        self.skip_channels = skip_channels
        self.noise_channels = noise_channels
        self.noise_scale = noise_scale

    def spec(self) -> dict[str, Any]:
        return {
            "name": "dip",
            "iterations": self.iterations,
            "lr": self.lr,
            "record_every": self.record_every,
            "warmup_records": self.warmup_records,
            "min_run": self.min_run,
            "stop_psnr": self.stop_psnr,
            "psnr_smoothing": self.psnr_smoothing,
            "stitch_records": self.stitch_records,
            "step_away": self.step_away,
            "widths": list(self.widths),
            "skip_channels": self.skip_channels,
            "noise_channels": self.noise_channels,
            "noise_scale": self.noise_scale,
        }

    def fit(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Steps 1-3: (records (K,N,C,H,W), their labels (K,N), valid (K,N) bool) for x (N,C,H,W) in [0,1]."""
        generator = self.generator(x.device)
        network = GroupedSkipNetwork(
            len(x), self.noise_channels, x.shape[1], self.widths, self.skip_channels, generator
        )
        noise = (
            torch.rand(len(x), self.noise_channels, *x.shape[-2:], generator=generator, device=x.device)
            * self.noise_scale
        )
        optimizer = torch.optim.Adam(network.parameters(), lr=self.lr)
        records, labels, valid = [], [], []
        running = torch.ones(len(x), dtype=torch.bool, device=x.device)
        smoothed_psnr = torch.zeros(len(x), device=x.device)
        for step in range(1, self.iterations + 1):
            with torch.enable_grad():
                reconstruction = network(noise)
                error = (reconstruction - x).square().flatten(1).mean(1)
                optimizer.zero_grad(set_to_none=True)
                error.sum().backward()  # a sum: each network's gradient is its own image's, whatever N is
            optimizer.step()
            if step % self.record_every:
                continue
            records.append(reconstruction.detach())
            labels.append(self.classifier(records[-1]).argmax(1))
            valid.append(running & (len(records) > self.warmup_records))
            if self.stop_psnr is not None and len(records) > self.warmup_records:
                psnr = -10 * torch.log10(error.detach().clamp_min(1e-10))
                first = len(records) == self.warmup_records + 1
                smoothed_psnr = (
                    psnr if first else self.psnr_smoothing * smoothed_psnr + (1 - self.psnr_smoothing) * psnr
                )
                running &= smoothed_psnr < self.stop_psnr
                if not running.any():  # one host sync per record, not per step
                    break
        return torch.stack(records), torch.stack(labels), torch.stack(valid)

    def forward(self, x: Tensor) -> Tensor:
        x = x.detach().float()
        with torch.no_grad():
            records, labels, valid = self.fit(x)
            input_labels = self.classifier(x).argmax(1)
            return stitch_trajectory(
                records, labels, valid, x, input_labels, self.min_run, self.stitch_records, self.step_away
            )
