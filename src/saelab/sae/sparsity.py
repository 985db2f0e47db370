"""The L0 controller of `sae.sparsity: target_l0`: lambda adapted so the SAE reaches L0*.

A fixed penalty only prefers an L0: Gemma Scope 2's quadratic lambda (2/L0*)(L0 - L0*)^2
settles where its pull balances the reconstruction's, above L0* (measured on the tiny
store: targets 8 / 16 reached 12.4 / 20.4). Here the penalty is Gemma Scope's lambda L0
and lambda is the controlled variable: after every step, proportional-integral control
of log lambda on the error e = log(L0 of the batch) - log(L0 target of the step):

    u += ki * clip(e),    lambda = l0_coeff * exp(u + kp * clip(e))
    (ki halved when e < 0, see KI_DOWN)

Log space makes the gains independent of the scale of lambda and of L0 (an error of +10%
is the same push at L0 8 and at L0 128). At equilibrium the integral holds the lambda at
which the batch L0 equals L0* exactly: the solution of "best reconstruction subject to
L0 = L0*", i.e. the plain penalty at the lambda that happens to give L0*.

Warm-up: Gemma Scope raises the sparsity pressure gradually over `l0_warmup_steps`
(lambda linear from 0). With a controller, the pressure follows the target, so the
warm-up moves the target: during it any L0 between L0* and a ceiling that falls
log-linearly from the L0 of the first batch (about half the latents fire at theta's init)
to L0* counts as on target; above the ceiling lambda rises, below L0* it falls. Ramping
lambda itself would wind the integral up while lambda is held small, then overshoot:
thetas shoot past every pre-activation and latents die for good (their STE gradient is
zero there). A single falling target fails the other way: early L0 falls on its own (the
encoder learns) faster than any ramp, and chasing the ramp drove lambda to ~1e-8 on the
tiny store, from where it could not climb back in time.

The state (u, log L0 of the first batch) is a float64 tensor on the training device, so
control needs no host sync, is checkpointed with the rest of the running state, and a
resumed run continues bit for bit.
"""
from __future__ import annotations

import logging
import math

import torch

from ..core.config import SAECfg
from .schedules import l0_factor

log = logging.getLogger(__name__)

# Gains per step in log space. Thresholds answer a change of lambda over tens of steps
# (Adam moves theta by ~lr a step), so the integral is slow and the proportional term
# does the quick work. The plant is lopsided: a larger lambda cuts L0 within a few steps,
# a smaller one lets it grow back only as fast as the reconstruction pulls thresholds
# down (through the narrow STE window), whatever lambda is. So lambda falls 2x slower
# than it rises (on the tiny store, equal rates let an early dip of L0, the encoder
# learning rather than lambda, wind lambda down 1,000x: target 32 ended at L0 58), and
# the integral is kept slow enough not to overshoot upwards (KI 0.1 with KP 1 and a
# 5x slower fall left L0 15% under targets 2-3 in tests/test_sparsity.py). Tuned there
# and on bench/l0_target.py (synthetic, tiny, smollm2-135m).
KI = 0.1
KI_DOWN = 0.5
KP = 2.0
# lambda stays within l0_coeff x e^(+-U_MAX) (1e4): a safety net against wind-up when the
# L0 cannot follow (say, latents killed by a far too large lr).
U_MAX = math.log(1e4)
# One batch's error counts at most this much (log units): the first batches after init
# fire half the latents, and must not throw lambda by orders of magnitude.
ERROR_CLIP = 1.0


class L0Controller:
    """Lambda for `target_l0` from the measured L0 of each batch; see the module docstring."""

    def __init__(self, cfg: SAECfg):
        self.cfg = cfg

    @staticmethod
    def fresh_state(device: torch.device) -> torch.Tensor:
        # [u, log L0 of the first batch (nan until it is seen), last clipped error]
        return torch.tensor([0.0, math.nan, 0.0], dtype=torch.float64, device=device)

    def target(self, state: torch.Tensor, step: int) -> torch.Tensor:
        """log of the L0 ceiling at `step`: the warm-up ramp, then log L0*."""
        p = l0_factor(step, self.cfg)
        start = torch.nan_to_num(state[1], nan=math.log(self.cfg.target_l0))
        return (1.0 - p) * start + p * math.log(self.cfg.target_l0)

    def lam(self, state: torch.Tensor) -> torch.Tensor:
        """The coefficient of the L0 term for the coming step."""
        return self.cfg.l0_coeff * torch.exp(state[0] + KP * state[2]).float()

    @torch.no_grad()
    def update(self, state: torch.Tensor, step: int, l0: torch.Tensor) -> None:
        """Account for the L0 (a scalar tensor, global across ranks) of step `step`."""
        log_l0 = torch.log(l0.double().clamp(min=1e-3))
        state[1] = torch.where(torch.isnan(state[1]), log_l0, state[1])  # no host sync
        # The band [L0*, ramp]: no error inside it (it closes when the warm-up ends).
        above = (log_l0 - self.target(state, step + 1)).clamp(min=0.0)
        below = (log_l0 - math.log(self.cfg.target_l0)).clamp(max=0.0)
        err = (above + below).clamp(-ERROR_CLIP, ERROR_CLIP)
        gain = torch.where(err > 0, KI, KI * KI_DOWN)
        state[0] = (state[0] + gain * err).clamp(-U_MAX, U_MAX)
        state[2] = err


def l0_target(cfg: SAECfg) -> float | None:
    """The L0 a configuration asks for: k for TopK/BatchTopK, L0* for JumpReLU under a
    target sparsity, none for JumpReLU's plain penalty."""
    if cfg.architecture != "jumprelu":
        return float(cfg.k)
    return None if cfg.sparsity == "l0" else float(cfg.target_l0)


# A final L0 further than this (relative) from its target is reported as a miss.
L0_TOLERANCE = 0.10


def l0_miss(l0: float, target: float | None, final_lambda: float | None) -> dict:
    """The target, the relative distance to it and the last lambda, as metrics; warns when
    the L0 (held-out when there was an evaluation set) misses the target by > 10%."""
    if target is None or not math.isfinite(l0):
        return {}
    rel = (l0 - target) / target
    if abs(rel) > L0_TOLERANCE:
        log.warning("L0 %.2f misses its target %g by %+.0f%% (more than %.0f%%): train longer "
                    "(sae.n_tokens), or for target_l0 start sae.l0_coeff nearer the lambda "
                    "it needs (this run ended at %s)", l0, target, 100 * rel,
                    100 * L0_TOLERANCE, "n/a" if final_lambda is None else f"{final_lambda:.3g}")
    out = {"l0_target": target, "l0_rel_error": rel}
    if final_lambda is not None:
        out["final_lambda"] = final_lambda
    return out
