"""The numbers DVC shows: each stage's full JSON report (notes, sources, per-pilot and
per-latent rows) stays a plain output, and a numeric view of it is the stage's DVC metrics
file, so `dvc exp show` gets one column per quantity instead of hundreds of strings."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from . import paths
from .atomic import read_json, write_text

# stage -> (full report, its numeric view); dvc.yaml declares the views as metrics.
VIEWS: dict[str, tuple[tuple[Path, Path], ...]] = {
    "fit_scaling_laws": ((paths.FIT_JSON, paths.METRICS_DIR / "fit.json"),
                         (paths.BUDGET_JSON, paths.METRICS_DIR / "budget.json")),
    "train_sae": ((paths.TRAIN_METRICS, paths.METRICS_DIR / "train.json"),),
    "interpret": ((paths.INTERPRET_METRICS, paths.METRICS_DIR / "interpret.json"),),
}


def _is_id(key: str) -> bool:
    return key.isdigit()


def numeric_view(report: Any) -> dict[str, Any]:
    """The finite numbers and flags of `report` reachable through named keys, nested as in
    `report`. Strings and nulls go; so do lists and id-keyed maps (pilot grids, per-GPU
    hours, per-latent rows, CI bounds): they are one column per item, and stay in the full
    report. A new numeric field anywhere under named keys shows up without a change here."""
    if not isinstance(report, dict):
        return {}
    out: dict[str, Any] = {}
    for key, value in report.items():
        if isinstance(value, dict):
            if value and all(_is_id(str(k)) for k in value):
                continue
            if sub := numeric_view(value):
                out[key] = sub
        elif isinstance(value, bool) or (isinstance(value, (int, float))
                                         and math.isfinite(value)):
            out[key] = value
    return out


def write_views(stage: str, root: Path = Path(".")) -> list[Path]:
    """Write the numeric views of `stage`'s reports; returns the views written."""
    written = []
    for full, view in VIEWS.get(stage, ()):
        report = read_json(root / full)
        if report is None:  # the stage wrote no report (e.g. it stopped with an error)
            continue
        (root / view).parent.mkdir(parents=True, exist_ok=True)
        write_text(root / view, json.dumps(numeric_view(report), indent=2) + "\n")
        written.append(root / view)
    return written
