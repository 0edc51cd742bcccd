"""What every script in benchmarks/ shares: time a span with the device synchronized only at its two
ends, name the device, and print one JSON line per measurement that says where and on what code it
was measured (benchmarks/run_all.py collects the lines into a table)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import torch

from engine.export import device_name, environment_meta


def synchronize(device: torch.device) -> float:
    """Wait for the device's queued work, then read the clock (seconds)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def timed(run: Callable[[int], object], steps: int, warmup: int, device: torch.device) -> float:
    """Seconds for run(warmup), ..., run(warmup + steps - 1) after `warmup` untimed calls; the device is
    synchronized before the first timed call and after the last, never in between."""
    for step in range(warmup):
        run(step)
    started = synchronize(device)
    for step in range(warmup, warmup + steps):
        run(step)
    return synchronize(device) - started


def emit(benchmark: str, device: torch.device, **measurement: Any) -> dict[str, Any]:
    """Print one measurement as a JSON line: the benchmark, the device, the measurement's fields and
    the code (commit, torch, Lightning); return it."""
    line = {"benchmark": benchmark, "device": device_name(device), **measurement, **environment_meta()}
    print(json.dumps(line), flush=True)
    return line
