"""Stage stamps: a re-run with other settings is refused instead of reusing a stale artifact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tina.config import load_config
from tina.errors import ConfigError
from tina.stamps import STAMP, check_stamp, stamp_of

TINY = Path(__file__).parent / "tiny.yaml"


def test_same_settings_pass_and_placement_settings_do_not_count(tmp_path: Path):
    cfg = load_config(TINY)
    check_stamp(tmp_path / "zoo", stamp_of(cfg, "zoo", [(0, 1), (2, 3)]))
    assert json.loads((tmp_path / "zoo" / STAMP).read_text())["zoo.epochs"] == cfg.zoo.epochs
    other = load_config(TINY, ["train.threads=2", "data.root=/elsewhere"])
    check_stamp(tmp_path / "zoo", stamp_of(other, "zoo", [(0, 1), (2, 3)]))


@pytest.mark.parametrize("overrides, tasks, key", [
    (["zoo.lr=0.5"], [(0, 1), (2, 3)], "zoo.lr"),
    (["generic.max_epochs=3"], [(0, 1), (2, 3)], "generic.max_epochs"),  # the zoo's start
    ([], [(1, 0), (2, 3)], "tasks_sha256"),
    (["seed=1"], [(0, 1), (2, 3)], "seed"),
])
def test_other_settings_are_refused_with_the_keys_and_the_fix(tmp_path: Path, overrides, tasks,
                                                              key):
    check_stamp(tmp_path / "zoo", stamp_of(load_config(TINY), "zoo", [(0, 1), (2, 3)]))
    with pytest.raises(ConfigError, match=rf"{key}: built with .*Delete it"):
        check_stamp(tmp_path / "zoo", stamp_of(load_config(TINY, overrides), "zoo", tasks))


def test_an_unstamped_artifact_is_refused_and_an_empty_folder_is_stamped(tmp_path: Path):
    cfg = load_config(TINY)
    (tmp_path / "generic").mkdir()
    (tmp_path / "generic" / "model.safetensors").write_bytes(b"old")
    with pytest.raises(ConfigError, match="without stamp.json"):
        check_stamp(tmp_path / "generic", stamp_of(cfg, "generic"))
    (tmp_path / "generator").mkdir()
    check_stamp(tmp_path / "generator", stamp_of(cfg, "generator", []))
    assert (tmp_path / "generator" / STAMP).is_file()


def test_generator_stamp_ignores_evaluation_and_sampling_settings():
    a = stamp_of(load_config(TINY), "generator", [])
    b = stamp_of(load_config(TINY, ["eval.bootstrap=7", "sample.steps=3"]), "generator", [])
    assert a == b
    assert stamp_of(load_config(TINY, ["dit.depth=2"]), "generator", []) != a
