"""report.json, report.md and plots (stub while evaluate is debugged)."""

from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, out_dir: Path) -> None:
    Path(out_dir).mkdir(parents=True, exist_ok=True)
    (Path(out_dir) / "report.json").write_text(json.dumps(report, indent=2))
