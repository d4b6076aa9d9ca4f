"""The search space of jobs.tune_dit, in one place: defaults, overrides, Tune domains, and a
trial's values applied to a PipelineConfig.

Entries are dotted config fields -> {choice: [...]}, {loguniform: [lo, hi]}, {uniform: [lo, hi]},
{randint: [lo, hi]} (hi excluded) or a fixed value; `python -m jobs.tune_dit --space-file F
--space KEY=YAML` override them (a null value drops a field).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from tina.config import PipelineConfig, from_dict
from tina.dit import PRESETS
from tina.errors import ConfigError

# The search space, in one place: dotted config field -> {choice: [...]}, {loguniform: [lo, hi]},
# {uniform: [lo, hi]}, {randint: [lo, hi]} (hi excluded), or a fixed value. --space-file (YAML,
# same form; a null value drops a field) and --space KEY=YAML override entries.
SEARCH_SPACE: dict[str, Any] = {
    "train.lr": {"loguniform": [1e-4, 1e-3]},
    "dit.width": {"choice": [128, 256]},
    "dit.depth": {"choice": [2, 4, 6]},
    "tokens.chunk_size": {"choice": [64, 144, 576]},
    "tokens.normalization": {"choice": ["layer", "global"]},
    "train.ema_decay": {"choice": [0.99, 0.999, 0.9999]},
    # sampling settings: they change only the val scoring of a trial, never its training
    "sample.guidance": {"choice": [1.0, 1.5, 2.0]},
    "sample.steps": {"choice": [10, 20, 50]},
}


def parse_space(base: dict[str, Any], overrides: list[str] | None = None,
                space_file: str | Path | None = None) -> dict[str, Any]:
    """`base` updated with a YAML file's entries and `KEY=YAML` overrides (null drops a key).

    Raises:
        ConfigError: unreadable file, an override without '=', or a malformed distribution.
    """
    space = dict(base)
    updates: dict[str, Any] = {}
    if space_file is not None:
        p = Path(space_file)
        try:
            loaded = yaml.safe_load(p.read_text()) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"search space file {p}: {e}") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"search space file {p}: expected a mapping of dotted fields")
        updates |= loaded
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--space {item!r}: expected key.sub=YAML, "
                              "e.g. 'dit.depth={choice: [4, 6]}' or train.lr=3e-4")
        key, raw = item.split("=", 1)
        updates[key.strip()] = yaml.safe_load(raw)
    for key, spec in updates.items():
        if spec is None:
            space.pop(key, None)
        else:
            space[key] = spec
    for key, spec in space.items():
        distribution(key, spec)  # validates
    return space


def distribution(key: str, spec: Any):
    """One search-space entry as a Tune domain (or the fixed value itself)."""
    from ray import tune

    if not isinstance(spec, dict):
        return spec
    if len(spec) != 1:
        raise ConfigError(f"search space {key}: one of choice/loguniform/uniform/randint, "
                          f"got {spec!r}")
    (kind, args), = spec.items()
    if kind == "choice" and isinstance(args, list) and args:
        return tune.choice(args)
    if kind in ("loguniform", "uniform", "randint") and isinstance(args, list) and len(args) == 2:
        try:
            lo, hi = (float(a) for a in args)  # PyYAML reads 1e-4 as a string
        except (TypeError, ValueError):
            raise ConfigError(f"search space {key}: {kind} bounds must be numbers") from None
        if kind == "randint":
            return tune.randint(int(lo), int(hi))
        return (tune.loguniform if kind == "loguniform" else tune.uniform)(lo, hi)
    raise ConfigError(f"search space {key}: {kind} needs a non-empty list (choice) or [lo, hi]")


def _values(spec: Any) -> list:
    """The values a search-space entry can take, [] for a continuous range."""
    if not isinstance(spec, dict):
        return [spec]
    return list(spec.get("choice", []))


def check_space(cfg: PipelineConfig, space: dict[str, Any]) -> None:
    """Fail before any trial starts: unknown fields, mistyped values, a width that some head
    count does not divide. Raises ConfigError."""
    tuned_config(cfg, {k: _values(v)[0] for k, v in space.items() if _values(v)})
    heads = PRESETS[cfg.dit.preset][2] if cfg.dit.preset else cfg.dit.heads
    for w in _values(space["dit.width"]) if "dit.width" in space else []:
        for h in _values(space.get("dit.heads", heads)):
            if int(w) % int(h):
                raise ConfigError(f"search space dit.width: {w} is not a multiple of "
                                  f"dit.heads {h}")


def tuned_config(base: PipelineConfig, values: dict[str, Any]) -> PipelineConfig:
    """`base` with dotted fields set to `values` (a trial's config).

    A tuned dit.width/depth/heads turns a preset into its explicit sizes (the preset would
    override them); a tuned sample.steps also sets train.val_sample_steps, the steps of the
    in-training val scoring. Raises ConfigError for an unknown field or a mistyped value.
    """
    d = base.to_dict()
    if d["dit"]["preset"] is not None and {"dit.width", "dit.depth", "dit.heads"} & set(values):
        d["dit"]["width"], d["dit"]["depth"], d["dit"]["heads"] = PRESETS[d["dit"]["preset"]]
        d["dit"]["preset"] = None
    for key, value in values.items():
        node, parts = d, key.split(".")
        for part in parts[:-1]:
            if not isinstance(node.get(part), dict):
                raise ConfigError(f"search space {key}: {part} is not a config section")
            node = node[part]
        if parts[-1] not in node:
            raise ConfigError(f"search space {key}: unknown config field")
        node[parts[-1]] = value
    if "sample.steps" in values:
        d["train"]["val_sample_steps"] = d["sample"]["steps"]
    return from_dict(d)
