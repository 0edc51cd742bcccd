from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from datamodules import (
    CIFAR10,
    SHAPE_CLASSES,
    STL10,
    SVHN,
    DataNotFoundError,
    FashionMNIST,
    ImageFolderStream,
    ImageFolderTensors,
    Shapes,
    image_folder,
    render_shapes,
)
from datamodules.base import crop_and_flip
from tests.data_files import accept_written_files, write_data_set, write_fashion_mnist


def batches(datamodule, loader, count: int = 3):
    return [datamodule.on_after_batch_transfer(batch, 0) for _, batch in zip(range(count), loader)]


def test_shapes_are_deterministic_balanced_and_in_range():
    images, labels = render_shapes(200, seed=3)
    again, same_labels = render_shapes(200, seed=3)
    other, _ = render_shapes(200, seed=4)
    assert images.shape == (200, 3, 32, 32) and images.dtype == torch.uint8
    assert torch.equal(images, again) and torch.equal(labels, same_labels)
    assert not torch.equal(images, other)
    assert labels.bincount(minlength=10).tolist() == [20] * 10
    # Not flat: every image has edges and texture (std of pixel values well above zero).
    assert images.float().flatten(1).std(dim=1).min() > 5


def test_colour_statistics_do_not_give_the_class_away():
    # A nearest-centroid classifier on per-image colour mean and spread stays near chance (10%):
    # a classifier has to learn the shapes. (That a CNN does is tested in test_training.py.)
    def colour_features(images: torch.Tensor) -> torch.Tensor:
        pixels = images.float().flatten(2)
        return torch.cat([pixels.mean(2), pixels.std(2)], dim=1)

    train_images, train_labels = render_shapes(3000, seed=0)
    test_images, test_labels = render_shapes(1000, seed=1)
    centroids = torch.stack(
        [colour_features(train_images[train_labels == k]).mean(0) for k in range(len(SHAPE_CLASSES))]
    )
    predicted = torch.cdist(colour_features(test_images), centroids).argmin(1)
    assert (predicted == test_labels).float().mean() < 0.2


def test_batches_are_unit_floats_and_resident_mode_gives_the_same_batches():
    host = Shapes(num_train=300, num_test=100, val_images=100, batch_size=64, eval_batch_size=50, seed=5)
    resident = Shapes(
        num_train=300, num_test=100, val_images=100, batch_size=64, eval_batch_size=50, seed=5, on_device=True
    )
    for datamodule in (host, resident):
        datamodule.setup("fit")
    for make_loader in ("train_dataloader", "val_dataloader"):
        for (x, y), (x_resident, y_resident) in zip(
            batches(host, getattr(host, make_loader)()), batches(resident, getattr(resident, make_loader)())
        ):
            assert x.dtype == torch.float32 and y.dtype == torch.int64
            assert x.shape[1:] == (3, 32, 32) and 0.0 <= x.min() and x.max() <= 1.0
            assert torch.equal(x, x_resident) and torch.equal(y, y_resident)


def test_validation_is_held_out_of_the_training_split():
    """Seeded and class-balanced, removed from training, the same whatever the training seed, nested
    across sizes; fitting never reads the test split (it is for `train.py test` and eval.py only)."""

    def fitted(**settings) -> Shapes:
        datamodule = Shapes(num_train=400, num_test=50, **settings)
        datamodule.setup("fit")
        return datamodule

    datamodule = fitted(val_images=100)
    assert set(datamodule.splits) == {"train", "val"}
    train, val = datamodule.splits["train"], datamodule.splits["val"]
    assert len(train.labels) == 300 and val.labels.bincount().tolist() == [10] * 10
    # What was held out is exactly what training lost (no image in both, none dropped).
    full_images, _ = render_shapes(400, seed=0)
    assert torch.equal(val.images, full_images[datamodule.val_indices])
    kept = torch.ones(400, dtype=torch.bool)
    kept[datamodule.val_indices] = False
    assert torch.equal(train.images, full_images[kept])
    assert torch.equal(fitted(val_images=100, seed=7).val_indices, datamodule.val_indices)
    assert not torch.equal(fitted(val_images=100, val_seed=1).val_indices, datamodule.val_indices)
    assert set(fitted(val_images=50).val_indices.tolist()) < set(datamodule.val_indices.tolist())
    everything = fitted(val_images=0)
    assert len(everything.splits["train"].labels) == 400 and everything.val_dataloader() == []


def test_a_validation_split_too_large_names_the_setting_and_the_fix():
    with pytest.raises(ValueError, match=r"val_images=500 .*Shapes.*data\.init_args\.val_images"):
        Shapes(num_train=400, num_test=50, val_images=500).setup("fit")


def test_crop_and_flip_matches_a_per_image_reference():
    images = torch.randint(0, 256, (6, 3, 8, 10), dtype=torch.uint8)
    offsets = torch.randint(0, 5, (6, 2))
    flips = torch.tensor([True, False, True, True, False, False])
    out = crop_and_flip(images, offsets, flips, padding=2)
    for image, (row, column), flip, result in zip(images, offsets, flips, out):
        padded = F.pad(image, (2, 2, 2, 2))
        expected = padded[:, row : row + 8, column : column + 10]
        if flip:
            expected = expected.flip(-1)
        assert torch.equal(result, expected)


def test_augmentation_is_a_function_of_seed_and_epoch():
    def first_batch(seed: int, epoch: int) -> torch.Tensor:
        datamodule = Shapes(num_train=220, num_test=20, val_images=20, batch_size=200, seed=seed)
        datamodule.setup("fit")
        datamodule._epoch = lambda: epoch  # what the trainer's current_epoch would say
        loader = datamodule.train_dataloader()
        loader.sampler.set_epoch(epoch)
        return batches(datamodule, loader, 1)[0][0]

    assert torch.equal(first_batch(0, 1), first_batch(0, 1))
    assert not torch.equal(first_batch(0, 1), first_batch(0, 2))
    assert not torch.equal(first_batch(0, 1), first_batch(1, 1))


def test_training_order_is_sharded_across_ranks():
    datamodule = Shapes(num_train=100, num_test=20, val_images=0, batch_size=10)
    datamodule.setup("fit")

    class FakeTrainer:
        world_size, current_epoch = 2, 0

    shards = []
    for rank in (0, 1):
        FakeTrainer.global_rank = rank
        datamodule.trainer = FakeTrainer()
        shards.append(set(datamodule.train_dataloader().sampler))
    assert shards[0].isdisjoint(shards[1]) and shards[0] | shards[1] == set(range(100))


def test_missing_cifar_names_the_expected_path_and_the_fix(tmp_path: Path):
    with pytest.raises(DataNotFoundError, match=str(tmp_path)) as error:
        CIFAR10(root=str(tmp_path)).setup("test")
    assert "download: true" in str(error.value) and "train/<class>" in str(error.value)


@pytest.fixture
def fashion_root(tmp_path: Path) -> Path:
    """A tiny Fashion-MNIST in torchvision's raw idx format (4 train, 3 test images)."""
    for split, count in (("train", 4), ("test", 3)):
        images = torch.arange(count * 28 * 28, dtype=torch.int64).remainder(256).to(torch.uint8).view(count, 1, 28, 28)
        write_fashion_mnist(tmp_path, split, images, torch.arange(count))
    return tmp_path


@pytest.mark.parametrize("as_rgb, channels", [(False, 1), (True, 3)])
def test_fashion_mnist_keeps_one_channel_or_repeats_it(fashion_root: Path, as_rgb: bool, channels: int):
    datamodule = FashionMNIST(root=str(fashion_root), as_rgb=as_rgb, eval_batch_size=8)
    datamodule.setup("test")
    x, y = batches(datamodule, datamodule.test_dataloader(), 1)[0]
    assert datamodule.channels == channels and x.shape == (3, channels, 28, 28)
    assert y.tolist() == [0, 1, 2] and torch.equal(x[:, :1].expand_as(x), x)


def test_cifar10_from_the_real_jpeg_tree(cifar_tree: Path):
    datamodule = CIFAR10(root=str(cifar_tree), eval_batch_size=1000)
    datamodule.setup(None)
    train, val, test = (datamodule.splits[split] for split in ("train", "val", "test"))
    # The default validation: 5,000 training images, 500 per class, held out of the 50,000.
    assert train.images.shape == (45000, 3, 32, 32) and test.images.shape == (10000, 3, 32, 32)
    assert train.labels.bincount().tolist() == [4500] * 10 and val.labels.bincount().tolist() == [500] * 10
    assert test.labels.bincount().tolist() == [1000] * 10
    x, _ = batches(datamodule, datamodule.val_dataloader(), 1)[0]
    assert x.shape == (1000, 3, 32, 32) and 0.2 < x.mean() < 0.8
    assert sum(len(y) for _, y in batches(datamodule, datamodule.test_dataloader(), 20)) == 10000
    # The generic in-memory ImageFolder reads the same tree to the same tensors.
    generic = ImageFolderTensors(root=str(cifar_tree))
    assert generic.class_names == CIFAR10.class_names
    assert torch.equal(generic.load_split("test").images, test.images)


@pytest.mark.parametrize(
    "datamodule_class, expected",
    [
        (CIFAR10, "cifar-10-batches-py"),
        (SVHN, "test_32x32.mat"),
        (STL10, "stl10_binary"),
        (FashionMNIST, "-ubyte"),
    ],
)
def test_every_torchvision_set_names_its_missing_files(tmp_path: Path, datamodule_class, expected: str):
    with pytest.raises(DataNotFoundError, match=expected) as error:
        datamodule_class(root=str(tmp_path)).setup("test")
    assert str(tmp_path) in str(error.value)


@pytest.mark.parametrize("name, datamodule_class", [("svhn", SVHN), ("fashion_mnist", FashionMNIST), ("stl10", STL10)])
def test_torchvision_formats_read_back_pixel_for_pixel(tmp_path: Path, name: str, datamodule_class):
    """Our SVHN, Fashion-MNIST and STL10 modules on files in each format (tests/data_files.py):
    orientation, channel order and label coding (SVHN's 10 for 0, STL10's 1-based) all come back exact."""
    written = write_data_set(name, tmp_path, train=30, test=20)
    with accept_written_files():
        datamodule = datamodule_class(root=str(tmp_path))
        for split, (images, labels) in written.items():
            read = datamodule.load_split(split)
            assert torch.equal(read.images, images) and torch.equal(read.labels, labels), split
    assert read.images.shape[1:] == (datamodule.channels, datamodule.image_size, datamodule.image_size)


def _write_tree(root: Path, sizes: dict[str, tuple[int, int]]) -> None:
    """root/<split>/<class>/<i>.png with random pixels; sizes maps class -> (height, width)."""
    generator = torch.Generator().manual_seed(0)
    for split in ("train", "val"):
        for name, (height, width) in sizes.items():
            (root / split / name).mkdir(parents=True)
            for index in range(3):
                pixels = torch.randint(0, 256, (height, width, 3), generator=generator, dtype=torch.uint8)
                Image.fromarray(pixels.numpy()).save(root / split / name / f"{index}.png")


def test_a_decoded_tree_is_cached_until_the_tree_changes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    _write_tree(tmp_path, {"cat": (8, 8), "dog": (8, 8)})
    first = ImageFolderTensors(root=str(tmp_path), image_size=8).load_split("train")
    assert len(list((tmp_path / ".decoded").glob("train-*.pt"))) == 1

    def no_decoding(path: Path) -> torch.Tensor:
        raise AssertionError(f"decoded {path} although the cache holds the unchanged tree")

    with monkeypatch.context() as patch:
        patch.setattr(image_folder, "_read_rgb", no_decoding)
        again = ImageFolderTensors(root=str(tmp_path), image_size=8).load_split("train")
    assert torch.equal(again.images, first.images) and torch.equal(again.labels, first.labels)

    Image.fromarray(torch.zeros(8, 8, 3, dtype=torch.uint8).numpy()).save(tmp_path / "train" / "dog" / "0.png")
    changed = ImageFolderTensors(root=str(tmp_path), image_size=8).load_split("train")
    assert changed.images[3].sum() == 0 and not torch.equal(changed.images, first.images)

    for stale in (tmp_path / ".decoded").glob("*.pt"):
        stale.write_bytes(b"truncated")
    assert torch.equal(ImageFolderTensors(root=str(tmp_path), image_size=8).load_split("train").images, changed.images)

    uncached = tmp_path / "uncached"
    _write_tree(uncached, {"cat": (8, 8)})
    ImageFolderTensors(root=str(uncached), image_size=8, cache_decoded=False).load_split("train")
    assert not (uncached / ".decoded").exists()


def test_image_folder_stream_resizes_any_tree_to_unit_float_batches(tmp_path: Path):
    _write_tree(tmp_path, {"cat": (40, 60), "dog": (50, 30)})
    datamodule = ImageFolderStream(
        root=str(tmp_path), image_size=24, resize_size=28, batch_size=4, eval_batch_size=6, num_workers=0, val_images=2
    )
    assert datamodule.class_names == ("cat", "dog") and datamodule.num_classes == 2
    datamodule.setup("fit")
    assert "test" not in datamodule.datasets  # fitting never reads the test split
    datamodule.setup("test")
    sizes = {}
    for split in ("train", "val", "test"):
        x, y = datamodule.on_after_batch_transfer(next(iter(getattr(datamodule, f"{split}_dataloader")())), 0)
        assert x.dtype == torch.float32 and x.shape[1:] == (3, 24, 24) and 0 <= x.min() and x.max() <= 1
        sizes[split] = y.bincount(minlength=2).tolist()
    # Two of the six training images (one per class) held out; the test split is the tree's val/ folder.
    assert sizes == {"train": [2, 2], "val": [1, 1], "test": [3, 3]}
    held_out = {datamodule.datasets["val"].dataset.samples[i][0] for i in datamodule.datasets["val"].indices}
    trained = {datamodule.datasets["train"].dataset.samples[i][0] for i in datamodule.datasets["train"].indices}
    assert not held_out & trained and all("/train/" in path for path in held_out)


def test_in_memory_image_folder_refuses_mixed_sizes(tmp_path: Path):
    _write_tree(tmp_path, {"cat": (40, 60), "dog": (50, 30)})
    with pytest.raises(ValueError, match="ImageFolderStream"):
        ImageFolderTensors(root=str(tmp_path)).setup("test")
