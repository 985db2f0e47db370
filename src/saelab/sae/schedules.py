"""Learning-rate and sparsity-coefficient schedules: pure functions of the step.

Being functions of the step alone, they resume exactly from a checkpoint's step.
"""
from __future__ import annotations

import math

from ..core.config import SAECfg

# Floor of the cosine decay as a fraction of lr (SAELens's `lr_end` default is lr / 10).
COSINE_FLOOR = 0.1


def lr_factor(step: int, total_steps: int, cfg: SAECfg) -> float:
    """Multiplier of the peak lr at `step` (0-based).

    Warm-up (Gemma Scope): cosine from `lr_warmup_start` to 1 over `lr_warmup_steps`.
    Then `constant` holds 1 (Gemma Scope as published); `cosine` anneals from 1 to
    COSINE_FLOOR over the remaining steps (SAELens's `cosineannealing`).
    """
    w = cfg.lr_warmup_steps
    if step < w:
        s = cfg.lr_warmup_start
        return s + (1.0 - s) * 0.5 * (1.0 - math.cos(math.pi * step / w))
    if cfg.lr_decay == "constant":
        return 1.0
    span = max(1, total_steps - w - 1)
    p = min(1.0, (step - w) / span)
    return COSINE_FLOOR + (1.0 - COSINE_FLOOR) * 0.5 * (1.0 + math.cos(math.pi * p))


def l0_factor(step: int, cfg: SAECfg) -> float:
    """Multiplier of the sparsity coefficient: linear from 0 over `l0_warmup_steps`."""
    w = cfg.l0_warmup_steps
    return 1.0 if w == 0 else min(1.0, step / w)
