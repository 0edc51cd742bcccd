from __future__ import annotations

import errno
import pickle
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from pytorch_lightning.trainer.states import TrainerFn

from engine import callbacks
from engine import export as engine_export
from engine.callbacks import TrainThroughput
from engine.checkpointing import AtomicCheckpointIO, MidEpochCheckpoint
from engine.cli import RestorationCLI
from engine.export import atomic_save, atomic_write_bytes, make_export
from tests.conftest import REPO_ROOT


def test_atomic_save_keeps_the_old_file_when_writing_fails(tmp_path: Path):
    path = atomic_save({"version": torch.tensor(1)}, tmp_path / "model.pt")
    with pytest.raises((pickle.PicklingError, AttributeError)):  # which one depends on what fails to pickle
        atomic_save({"unpicklable": lambda: None}, path)
    assert torch.load(path, weights_only=True)["version"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # no temporary file left behind


def test_throughput_counts_training_images_and_excludes_validation(monkeypatch: pytest.MonkeyPatch):
    clock = iter([10.0, 12.0])  # epoch start, validation start
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    logged = {}
    module = SimpleNamespace(device=torch.device("cpu"), log=lambda name, value, **kw: logged.update({name: value}))
    trainer = SimpleNamespace(state=SimpleNamespace(fn=TrainerFn.FITTING), sanity_checking=False, world_size=2)

    throughput = TrainThroughput()
    throughput.on_train_epoch_start(trainer, module)
    for index in range(3):
        throughput.on_train_batch_end(trainer, module, None, (torch.zeros(10, 3, 4, 4), torch.zeros(10)), index)
    throughput.on_validation_epoch_start(trainer, module)  # t = 12: training took 2 s
    throughput.on_train_epoch_end(trainer, module)  # any time later: validation is not counted
    assert logged == {"perf/train_img_per_s": 30 * 2 / 2.0}


def test_export_records_the_commit_the_fit_started_from(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    commits = iter(["commit-at-start", "commit-at-end"])
    monkeypatch.setattr(callbacks, "git_commit", lambda: next(commits))
    export = callbacks.ExportOnFitEnd(str(tmp_path / "model.pt"))
    module = SimpleNamespace(to_export=lambda meta: make_export("classifier", {}, {}, meta))
    trainer = SimpleNamespace(
        is_global_zero=True,
        current_epoch=1,
        global_step=5,
        datamodule=None,
        callback_metrics={},
        precision="32-true",
        world_size=1,
    )
    export.on_fit_start(trainer, module)
    export.on_fit_end(trainer, module)
    assert torch.load(tmp_path / "model.pt", weights_only=True)["meta"]["commit"] == "commit-at-start"


@pytest.mark.parametrize("config", sorted(p.name for p in (REPO_ROOT / "configs").glob("*.yaml")))
def test_every_config_parses_against_the_signatures(config: str, capsys: pytest.CaptureFixture):
    """A misspelt or mistyped key in any config (GPU ones included) fails here, not on a GPU node."""
    with pytest.raises(SystemExit) as exited:
        RestorationCLI(args=["fit", "--config", str(REPO_ROOT / "configs" / config), "--print_config"])
    assert exited.value.code in (0, None)
    assert "class_path" in capsys.readouterr().out


def test_a_full_disk_mid_write_leaves_the_previous_checkpoint_and_results_whole(tmp_path: Path, monkeypatch):
    """The write fails halfway (ENOSPC after some bytes): the file keeps its old bytes, no temporary
    file is left behind, and the error reaches the caller."""
    checkpoint = AtomicCheckpointIO()
    last = tmp_path / "last.ckpt"
    checkpoint.save_checkpoint({"step": torch.tensor(1)}, last)
    results = atomic_write_bytes(b'{"rows": 1}', tmp_path / "results.json")
    old = {path: path.read_bytes() for path in (last, results)}

    def full_disk(stream) -> None:
        stream.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", lambda obj, stream: full_disk(stream))
    with pytest.raises(OSError, match="No space left"):
        checkpoint.save_checkpoint({"step": torch.tensor(2)}, last)
    with pytest.raises(OSError, match="No space left"):
        engine_export._atomic_write(results, full_disk)
    assert {path: path.read_bytes() for path in (last, results)} == old
    assert (tmp_path / "previous.ckpt").read_bytes() == old[last]  # kept before the write began
    assert sorted(path.name for path in tmp_path.iterdir()) == ["last.ckpt", "previous.ckpt", "results.json"]


def test_mid_epoch_checkpoints_are_written_only_where_an_optimizer_step_ended(tmp_path: Path):
    """With gradient accumulation (2 batches per optimizer step) the batch ends see global_step 0, 1, 1,
    2, 2, ...: last.ckpt every 3 steps is written once at the batch that made step 3 (and 6); never at
    step 0, twice for one step, or inside an accumulation, whose gradients no checkpoint holds."""
    saved: list[int] = []
    trainer = SimpleNamespace(global_step=0, strategy=SimpleNamespace(broadcast=lambda value: value))
    trainer.save_checkpoint = lambda path: saved.append(trainer.global_step)
    callback = MidEpochCheckpoint(tmp_path, every_n_steps=3)
    callback.on_train_start(trainer, None)
    for batch in range(14):
        trainer.global_step = (batch + 1) // 2
        callback.on_train_batch_end(trainer, None, None, None, batch)
    assert saved == [3, 6]
