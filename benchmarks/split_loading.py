"""Loading an image-folder split into memory: decoding every JPEG, against reading the decoded cache
that the first process leaves beside the tree (datamodules.image_folder.decode_image_folder).
Prints one JSON line per measurement.

    python benchmarks/split_loading.py --root data/cifar10 --split train

The cache folder <root>/.decoded/ is moved aside for the decoding measurement and put back after.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import torch

from datamodules import CIFAR10
from engine.benchmarking import emit


def timed_load(root: Path, split: str) -> tuple[float, int]:
    started = time.perf_counter()
    images = CIFAR10(root=str(root)).load_split(split).images
    return time.perf_counter() - started, len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", required=True, help="a CIFAR-10 JPEG tree (train/<class>/, test/<class>/)")
    parser.add_argument("--split", default="train", choices=["train", "test"])
    args = parser.parse_args()
    root, cache = Path(args.root), Path(args.root) / ".decoded"
    with tempfile.TemporaryDirectory(dir=root) as aside:
        if cache.exists():
            shutil.move(str(cache), aside)
        try:
            for mode in ("decode", "cached"):  # the first load writes the cache the second reads
                seconds, count = timed_load(root, args.split)
                emit(
                    "split_loading",
                    torch.device("cpu"),
                    mode=mode,
                    split=args.split,
                    images=count,
                    seconds=round(seconds, 2),
                    img_per_s=round(count / seconds, 1),
                )
        finally:
            shutil.rmtree(cache, ignore_errors=True)
            if (Path(aside) / ".decoded").exists():
                shutil.move(str(Path(aside) / ".decoded"), str(cache))


if __name__ == "__main__":
    main()
