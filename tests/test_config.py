"""Specification of tina.config: YAML configs, strict keys, --set overrides, seeds."""

from __future__ import annotations

from pathlib import Path

import pytest

from tina.backbones import ARCHS
from tina.config import PipelineConfig, from_dict, load_config
from tina.data import DATASETS
from tina.dit import PRESETS
from tina.encoders import ENCODERS
from tina.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parent.parent / "configs").glob("*.yaml"))



def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return path


def test_yaml_sections_set_fields_and_the_rest_keep_their_defaults(tmp_path: Path) -> None:
    path = write(tmp_path, """
data:
  dataset: cifar100
  held_out: [apple, bee]
arch:
  name: cnn-5k
zoo:
  n_pmodels: 40
train:
  lr: 1.0e-3
note: hello
""")
    cfg = load_config(path)
    assert cfg.data.dataset == "cifar100" and cfg.data.held_out == ["apple", "bee"]
    assert cfg.arch.name == "cnn-5k" and cfg.zoo.n_pmodels == 40 and cfg.train.lr == 1e-3
    assert cfg.note == "hello"
    default = PipelineConfig()
    assert cfg.zoo.k == default.zoo.k and cfg.dit == default.dit


def test_an_empty_file_and_no_file_give_the_defaults(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")) == PipelineConfig()
    assert load_config(None) == PipelineConfig()


@pytest.mark.parametrize(("text", "key"), [
    ("zoo:\n  n_pmodel: 40\n", "zoo.n_pmodel"),
    ("trian:\n  steps: 5\n", "trian"),
    ("dit:\n  preset: tina-s\n  widht: 64\n", "dit.widht"),
])
def test_an_unknown_key_is_a_config_error_naming_it(tmp_path: Path, text: str, key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(write(tmp_path, text))
    assert "unknown key" in str(info.value)


def test_a_section_given_a_scalar_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="zoo"):
        load_config(write(tmp_path, "zoo: 40\n"))


def test_a_file_that_is_not_a_mapping_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- zoo\n- train\n"))


def test_a_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")


def test_set_overrides_dotted_paths_with_yaml_parsed_values(tmp_path: Path) -> None:
    path = write(tmp_path, "zoo:\n  n_pmodels: 300\ntrain:\n  steps: 2500\n")
    cfg = load_config(path, ["zoo.n_pmodels=40", "train.augment=false", "dit.preset=null",
                             "data.held_out=[Shirt, digit 3]", "eval.variable_ks=[2, 4]",
                             "note=a=b"])
    assert cfg.zoo.n_pmodels == 40 and cfg.train.steps == 2500  # the file's other values stay
    assert cfg.train.augment is False and cfg.dit.preset is None
    assert cfg.data.held_out == ["Shirt", "digit 3"] and cfg.eval.variable_ks == [2, 4]
    assert cfg.note == "a=b"  # only the first '=' separates key and value


def test_float_fields_accept_yaml_exponents_and_integers() -> None:
    # PyYAML reads `1e-3` (no dot) as a string: a float field still gets the number
    cfg = load_config(None, ["train.lr=1e-3", "zoo.epochs=2", "train.grad_clip=1"])
    assert cfg.train.lr == 1e-3 and isinstance(cfg.train.lr, float)
    assert cfg.zoo.epochs == 2.0 and isinstance(cfg.zoo.epochs, float)
    with pytest.raises(ConfigError, match="train.lr"):
        load_config(None, ["train.lr=fast"])


@pytest.mark.parametrize(("override", "match"), [
    ("zoo.n_pmodels", "key.sub=value"),
    ("zoo.n_pmodel=4", r"zoo\.n_pmodel"),
    ("seed.x=1", "seed"),
])
def test_a_malformed_or_unknown_override_is_a_config_error(override: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, ["seed=3", override])


def test_seed_flag_sets_the_master_seed_and_every_stage_seed() -> None:
    cfg = load_config(None, seed=3)
    assert cfg.seed == 3
    assert (cfg.generic.seed, cfg.zoo.seed, cfg.train.seed, cfg.eval.seed) == (3, 3, 3, 3)
    assert load_config(None).train.seed == 0


def test_dict_round_trip_and_sha256_identify_the_resolved_config() -> None:
    cfg = load_config(None, ["zoo.n_pmodels=40"])
    assert from_dict(cfg.to_dict()) == cfg
    assert cfg.sha256() == load_config(None, ["zoo.n_pmodels=40"]).sha256()
    assert cfg.sha256() != PipelineConfig().sha256()


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_every_shipped_config_parses(path: Path) -> None:
    cfg = load_config(path)
    assert cfg.arch.name in ARCHS and cfg.dit.preset in (*PRESETS, None)
    assert cfg.encoder.name in ENCODERS and cfg.data.dataset in DATASETS and cfg.zoo.k >= 2
    assert all(len(pair) == 2 for pair in cfg.data.forbidden_pairs)


def test_configs_folder_holds_the_demo_and_the_papers_setups() -> None:
    assert {p.name for p in CONFIGS} >= {"demo.yaml", "cifar100-clip.yaml"}


@pytest.mark.parametrize("override, message", [
    ("zoo.n_pmodels=abc", "zoo.n_pmodels: expected a whole number"),
    ("zoo.n_pmodels=1.5", "zoo.n_pmodels: expected a whole number"),
    ("zoo.max_train_images=null", None),
    ("arch.head_only=maybe", "arch.head_only: expected true or false"),
])
def test_overrides_are_type_checked(override, message):
    if message is None:
        assert load_config(None, [override]).zoo.max_train_images is None
    else:
        with pytest.raises(ConfigError, match=message):
            load_config(None, [override])


def test_a_config_file_that_is_not_yaml_is_a_config_error(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("data:\n  dataset: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
