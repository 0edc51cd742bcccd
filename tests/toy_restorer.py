"""A toy restorer, to show and keep honest what adding one takes (docs/ARCHITECTURE.md): this one
module (registered under its kind), one registry line (for a real restorer: an import in
restorers/__init__.py; here the test imports it) and one config (tests/configs/toy_shapes.yaml).

Degradation: Gaussian noise of `noise_std`, seeded by (step, rank). Network: a residual of two
3x3 convolutions. Defense: the network on the input, clamped to [0,1].
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from defenses.base import Defense
from engine.seeding import seeded_generator
from restorers.base import RestorerModule
from restorers.registry import register_restorer


class ToyNetwork(nn.Module):
    """(N,C,H,W) -> (N,C,H,W): x plus two convolutions' correction; the last starts at zero, so an
    untrained network is the identity, as the project's restorers are."""

    def __init__(self, in_chans: int, features: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_chans, features, 3, padding=1), nn.ReLU(), nn.Conv2d(features, in_chans, 3, padding=1)
        )
        nn.init.zeros_(self.body[-1].weight)
        nn.init.zeros_(self.body[-1].bias)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.body(x)


class ToyDefense(Defense):
    def __init__(self, network: nn.Module) -> None:
        super().__init__()
        self.network = network

    def spec(self) -> dict[str, Any]:
        return {"name": "toy"}

    def forward(self, x: Tensor) -> Tensor:
        return self.network(x).clamp(0, 1)


@register_restorer
class ToyDenoiser(RestorerModule):
    """Args (besides RestorerModule's): noise_std, the degradation; features, the network's width."""

    kind = "toy"

    def __init__(self, classifier: str, noise_std: float = 0.1, features: int = 8, **kwargs: Any) -> None:
        super().__init__(classifier, **kwargs)

    def make_pair(self, x: Tensor, y: Tensor, step: int, evaluation: bool = False) -> tuple[Tensor, Tensor]:
        noise = torch.randn(x.shape, generator=seeded_generator(x.device, step, self.global_rank), device=x.device)
        return (x + self.hparams.noise_std * noise).clamp(0, 1), x

    def restore(self, inputs: Tensor) -> Tensor:
        return self.restorer(inputs)

    def input_as_image(self, inputs: Tensor, target: Tensor) -> Tensor:
        return inputs

    def network_settings(self) -> dict[str, Any]:
        return {"in_chans": self.hparams.in_chans, "features": self.hparams.features}

    @staticmethod
    def build_network(in_chans: int, features: int) -> nn.Module:
        return ToyNetwork(in_chans, features)

    def defense_settings(self) -> dict[str, Any]:
        return {}

    @staticmethod
    def defense_around(network: nn.Module, classifier: nn.Module | None, **settings: Any) -> ToyDefense:
        return ToyDefense(network)
