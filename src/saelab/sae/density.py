"""Feature density: the histogram of log10 firing frequency over latents (SAELens and
Anthropic's standard health check). A healthy SAE shows one hump well below 1e-1; a
second hump near 1 is dense latents, a bar at the left edge is latents that never fired
in the evaluation tokens (the frequency floor is 1 / tokens, below it nothing is
measurable)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from ..core.plots import new_figure, save, write_csv

# Frequencies > these are "dense" in the metrics (frac_active_gt_1pct / gt_10pct).
DENSE = (0.01, 0.1)


def histogram_rows(density: torch.Tensor, n_tokens: int, bins: int = 40) -> list[dict]:
    """Counts of the latents that fired, per log10-frequency bin from the measurable floor
    (1 / n_tokens) to 1. The never-fired ones (log10 frequency -inf) are not in a bin."""
    d = density.double().numpy()
    lo = math.floor(math.log10(1.0 / max(n_tokens, 1)) * 4) / 4
    edges = np.linspace(lo, 0.0, bins + 1)
    counts, _ = np.histogram(np.log10(d[d > 0]), bins=edges)
    return [{"log10_freq": round(float(a), 4), "latents": int(c)}
            for a, c in zip(edges[:-1], counts)]


def write_density(density: torch.Tensor, n_tokens: int, png: Path, title: str) -> list[Path]:
    """The histogram as a PNG (never-fired latents as a red bar left of the floor) and its
    table as a CSV beside it (for `dvc plots`); the dense and never-fired fractions are
    written on the figure."""
    rows = histogram_rows(density, n_tokens)
    d = density.double()
    dead, g1, g10 = (float((d == 0).double().mean()), float((d > DENSE[0]).double().mean()),
                     float((d > DENSE[1]).double().mean()))
    fig, ax = new_figure(title, "log10 firing frequency", "latents")
    width = rows[1]["log10_freq"] - rows[0]["log10_freq"]
    ax.bar([r["log10_freq"] for r in rows], [r["latents"] for r in rows], width=width,
           align="edge", color="tab:blue")
    ax.bar([rows[0]["log10_freq"] - 2 * width], [int((d == 0).sum())], width=width,
           align="edge", color="tab:red", label=f"never fired ({100 * dead:.1f}%)")
    for f, share in zip(DENSE, (g1, g10)):
        ax.axvline(math.log10(f), color="gray", ls="--", lw=0.8)
        ax.text(math.log10(f), ax.get_ylim()[1] * 0.95, f" >{100 * f:g}%: {100 * share:.1f}%",
                fontsize=8, va="top")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{title}\n{len(d)} latents, {n_tokens} tokens", fontsize=9)
    csv = png.with_suffix(".csv")
    return [save(fig, png), write_csv(csv, rows)]
