"""Seeds derived from integer keys: every random draw in the project is a function of them."""

from __future__ import annotations

import torch


def seeded_generator(device: torch.device | str, *keys: int) -> torch.Generator:
    """A generator on `device` seeded from integer keys, e.g. (seed, global_step, rank) or (seed, epoch)."""
    seed = 0
    for key in keys:
        seed = (seed * 1_000_003 + int(key)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)
