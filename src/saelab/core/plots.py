"""Matplotlib helpers shared by the stages: headless figures, saved as PNG, plus CSV tables
that `dvc plots` can render and diff across experiments."""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Any, Iterable

import matplotlib

matplotlib.use("Agg")  # stages run headless (DVC, CI, queued experiments)
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402

from .atomic import atomic_path  # noqa: E402


def new_figure(title: str, xlabel: str, ylabel: str, *, logx: bool = False,
               logy: bool = False, size: tuple[float, float] = (6.0, 4.0)) -> tuple[Figure, Axes]:
    fig, ax = plt.subplots(figsize=size)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if logx:
        ax.set_xscale("log")
    if logy:
        ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def save(fig: Figure, path: str | Path) -> Path:
    """Write the figure as PNG and free it (stages draw many figures in one process)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_csv(path: str | Path, rows: Iterable[dict[str, Any]],
              columns: list[str] | None = None) -> Path:
    """Rows of dicts as CSV (written whole, then renamed into place); the columns are
    `columns` or the first row's keys, other keys are left out."""
    rows = list(rows)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = columns or (list(rows[0]) if rows else [])
    with atomic_path(path) as tmp, tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path
