"""Stage stamps: the settings a pipeline stage's artifact was built with, kept beside it.

Every stage of `tina.pipeline` skips its work when its artifact exists (that is how a stopped run
resumes). Without a record of what built the artifact, a re-run with another recipe would
silently pair, say, a new config with an old zoo and report numbers for neither. So each stage
folder holds `stamp.json`: the config sections the stage depends on (its own and those of the
stages it reads), the master seed and a digest of its task list. A re-run whose settings differ
is refused with the differing keys and what to do.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tina.config import PipelineConfig
from tina.errors import ConfigError

STAMP = "stamp.json"
# config sections each stage's artifact depends on (directly or through an earlier stage)
SECTIONS: dict[str, tuple[str, ...]] = {
    "generic": ("data", "arch", "generic"),
    "zoo": ("data", "arch", "generic", "zoo"),
    "finetuned": ("data", "arch", "generic", "zoo"),
    "image_encoder": ("data", "arch", "generic", "encoder"),
    "generator": ("data", "arch", "generic", "zoo", "encoder", "tokens", "dit", "diffusion",
                  "train"),
}
# where the data sits, how many threads or which device: they do not change what is built
IGNORED = {"data.root", "data.download", "train.threads", "encoder.device", "encoder.cache_dir",
           "encoder.clip_cache_dir", "encoder.batch_size"}


def _flat(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out |= _flat(f"{prefix}.{k}", v)
        return out
    return {} if prefix in IGNORED else {prefix: value}


def stamp_of(cfg: PipelineConfig, stage: str, tasks: list | None = None) -> dict[str, Any]:
    """The settings `stage` depends on as a flat {dotted key: value} dict (JSON values).

    Args:
        stage: a key of SECTIONS; tasks: the stage's task list (ordered class-id tuples), if any.
    """
    cfg_dict = cfg.to_dict()
    out: dict[str, Any] = {"seed": cfg.seed}
    for section in SECTIONS[stage]:
        out |= _flat(section, cfg_dict[section])
    if tasks is not None:
        out["tasks_sha256"] = hashlib.sha256(json.dumps([list(t) for t in tasks]).encode()
                                             ).hexdigest()
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from the file


def check_stamp(folder: Path, stamp: dict[str, Any]) -> None:
    """Write `stamp` into `folder` (made if missing), or, when the folder already holds a stage
    artifact, check that it was built with the same settings.

    Raises:
        ConfigError: the folder has files but no stamp (built by an older version), or its stamp
            differs from `stamp`; the message lists the differing keys and the fix.
    """
    path = folder / STAMP
    if path.is_file():
        old = json.loads(path.read_text())
        diff = sorted(k for k in old.keys() | stamp.keys() if old.get(k) != stamp.get(k))
        if diff:
            shown = "; ".join(f"{k}: built with {old.get(k)!r}, now {stamp.get(k)!r}"
                              for k in diff[:6])
            raise ConfigError(f"{folder} was built with other settings ({shown}). Delete it and "
                              "the stages after it, or write to another --out.")
        return
    if folder.is_dir() and any(folder.iterdir()):
        raise ConfigError(f"{folder} holds an artifact without {STAMP} (made by an older "
                          "version), so its settings are unknown. Delete it, or write to "
                          "another --out.")
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(stamp, indent=2, sort_keys=True))
    tmp.replace(path)
