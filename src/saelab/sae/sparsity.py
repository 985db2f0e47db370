"""The L0 controller of `sae.sparsity: target_l0`: lambda adapted so the SAE reaches L0*.

A fixed penalty only prefers an L0: Gemma Scope 2's quadratic lambda (2/L0*)(L0 - L0*)^2
settles where its pull balances the reconstruction's, above L0* (measured on the tiny
store: targets 8 / 16 reached 12.4 / 20.4). Here the penalty is Gemma Scope's lambda L0
and lambda is the controlled variable: after every step, proportional-integral control
of log lambda on the error e = log(L0 of the batch) - log(L0 target of the step):

    u += ki * clip(e),    lambda = l0_coeff * exp(u + kp * clip(e))
    (ki halved when e < 0, see KI_DOWN; u and the exponent held above a floor, see
    anti-windup below)

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

Anti-windup: lambda never goes below SLOPE_MIN x MSE / L0* (MSE a moving average of the
batches' squared error, in the units of the loss), neither the integral nor the lambda
used. At the plain penalty's optimum lambda is the reconstruction a latent buys back,
-dMSE/dL0 = s MSE / L0 with s = -dlog MSE / dlog L0 the slope of the (L0, MSE) curve;
measured at convergence s is 0.07-1.8 (synthetic, tiny, smollm2-135m, targets 8-128).
A lambda far below the flattest of those has no say in where the thresholds go: the
L0 then rises only as fast as the encoder learns to use more latents, and an integral
left to fall winds up. On the tiny store, target 64, the L0 dipped to ~22 while the
encoder learnt and then rose by itself for 600 steps; lambda wound down 3,000x to 1e-7
(s ~ 1e-5), and when the L0 crossed 64 lambda took 250 steps to climb back: the L0
overshot to 84 and ended at 72 (+12.5%).

What training cannot settle, `calibrate` settles after the last step: see there.

The state (u, log L0 of the first batch, error, the MSE's average) is a float64 tensor
on the training device, so control needs no host sync, is checkpointed with the rest of
the running state, and a resumed run continues bit for bit.
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
# The floor of lambda as a slope of the (L0, MSE) curve (see the module docstring), and
# the rate of the MSE's moving average (1/10 steps).
SLOPE_MIN = 0.01
MSE_RATE = 0.1


class L0Controller:
    """Lambda for `target_l0` from the measured L0 of each batch; see the module docstring."""

    def __init__(self, cfg: SAECfg):
        self.cfg = cfg

    @staticmethod
    def fresh_state(device: torch.device) -> torch.Tensor:
        # [u, log L0 of the first batch (nan until it is seen), last clipped error,
        #  moving average of the MSE (nan until the first batch)]
        return torch.tensor([0.0, math.nan, 0.0, math.nan], dtype=torch.float64,
                            device=device)

    def target(self, state: torch.Tensor, step: int) -> torch.Tensor:
        """log of the L0 ceiling at `step`: the warm-up ramp, then log L0*."""
        p = l0_factor(step, self.cfg)
        start = torch.nan_to_num(state[1], nan=math.log(self.cfg.target_l0))
        return (1.0 - p) * start + p * math.log(self.cfg.target_l0)

    def floor(self, state: torch.Tensor) -> torch.Tensor:
        """log(lambda / l0_coeff) below which lambda no longer acts (anti-windup)."""
        mse = torch.nan_to_num(state[3], nan=0.0).clamp(min=1e-30)
        return torch.log(SLOPE_MIN * mse / (self.cfg.target_l0 * self.cfg.l0_coeff))

    def lam(self, state: torch.Tensor) -> torch.Tensor:
        """The coefficient of the L0 term for the coming step."""
        u = torch.maximum(state[0] + KP * state[2], self.floor(state))
        return self.cfg.l0_coeff * torch.exp(u).float()

    @torch.no_grad()
    def update(self, state: torch.Tensor, step: int, l0: torch.Tensor,
               mse: torch.Tensor) -> None:
        """Account for the L0 and the MSE (scalar tensors, global across ranks) of step
        `step`."""
        log_l0 = torch.log(l0.double().clamp(min=1e-3))
        state[1] = torch.where(torch.isnan(state[1]), log_l0, state[1])  # no host sync
        state[3] = torch.where(torch.isnan(state[3]), mse.double(),
                               state[3] + MSE_RATE * (mse.double() - state[3]))
        # The band [L0*, ramp]: no error inside it (it closes when the warm-up ends).
        above = (log_l0 - self.target(state, step + 1)).clamp(min=0.0)
        below = (log_l0 - math.log(self.cfg.target_l0)).clamp(max=0.0)
        err = (above + below).clamp(-ERROR_CLIP, ERROR_CLIP)
        gain = torch.where(err > 0, KI, KI * KI_DOWN)
        u = torch.maximum(state[0] + gain * err, self.floor(state))
        state[0] = u.clamp(-U_MAX, U_MAX)
        state[2] = err

    def at_floor(self, state: torch.Tensor) -> bool:
        """Whether lambda is held at its anti-windup floor (one host sync: call at the end)."""
        return bool(state[0] <= self.floor(state) + 1e-9)


def l0_target(cfg: SAECfg) -> float | None:
    """The L0 a configuration asks for: k for TopK/BatchTopK, L0* for JumpReLU under a
    target sparsity, none for JumpReLU's plain penalty."""
    if cfg.architecture != "jumprelu":
        return float(cfg.k)
    return None if cfg.sparsity == "l0" else float(cfg.target_l0)


# A final L0 further than this (relative) from its target is reported as a miss.
L0_TOLERANCE = 0.10


def l0_miss(l0: float, target: float | None, final_lambda: float | None,
            at_floor: bool = False) -> dict:
    """The target, the relative distance to it and the last lambda, as metrics; warns when
    the L0 (held-out when there was an evaluation set) misses the target by > 10%, with the
    fix that fits the direction of the miss."""
    if target is None or not math.isfinite(l0):
        return {}
    rel = (l0 - target) / target
    if abs(rel) > L0_TOLERANCE:
        if rel < 0 and at_floor:
            # The L0 term trains thresholds only: with lambda at its floor the thresholds
            # sit near 0 and the SAE is a ReLU one, whose L0 no lambda can raise.
            fix = ("lambda ended at its floor, so this SAE fires on fewer latents than the "
                   "target with no sparsity pressure at all: the target is denser than "
                   "reconstruction needs here; lower sae.target_l0 (or use topk, which fixes k)")
        else:
            fix = ("train longer (sae.n_tokens), or start sae.l0_coeff nearer the lambda it "
                   "needs (this run ended at "
                   + ("n/a" if final_lambda is None else f"{final_lambda:.3g}") + ")")
        log.warning("L0 %.2f misses its target %g by %+.0f%% (more than %.0f%%): %s", l0,
                    target, 100 * rel, 100 * L0_TOLERANCE, fix)
    out = {"l0_target": target, "l0_rel_error": rel}
    if final_lambda is not None:
        out["final_lambda"] = final_lambda
    return out


# Tokens of the last training steps that `calibrate` measures the L0 on (per process; at
# 16,384 the L0 of a batch is known to ~1%).
CALIBRATION_TOKENS = 16_384
# `calibrate` moves JumpReLU thresholds by at most this factor either way: a larger
# correction means training did not get near the target, and is reported as a miss
# rather than papered over with thresholds the decoder never saw.
CALIBRATION_MAX = 2.0
_BISECTIONS = 40


def needs_calibration(cfg: SAECfg) -> bool:
    """JumpReLU under `target_l0`, and BatchTopK (its inference threshold)."""
    return cfg.architecture == "batchtopk" or (
        cfg.architecture == "jumprelu" and cfg.sparsity == "target_l0")


@torch.no_grad()
def calibrate(sae, batches: list[torch.Tensor], world: int = 1) -> float | None:
    """Set the thresholds so the L0 on `batches` (the last training batches) is the target;
    returns the factor applied to JumpReLU's thresholds, or BatchTopK's new threshold.

    JumpReLU (`target_l0`): every threshold times one factor c in [1/2, 2], found by
    bisection. The controller brings the L0 of the batches to L0*, but only as closely as
    the thresholds can still move: under cosine decay the lr ends at a tenth, and the L0
    of the final weights sits wherever the last oscillation left it (smollm2-135m, target
    16: the batch L0 crept from 14.7 to 15.0 over the last 60 steps while lambda fell
    15%). One common factor keeps every latent's threshold relative to the others, as
    trained; it is the constraint L0 = L0* imposed on the final weights.
    BatchTopK: the threshold that keeps k x the tokens on these batches, i.e. what the
    running average of each batch's smallest kept activation estimates, without its lag
    (rate 0.01: a 100-step memory of a threshold that grows as the encoder does; held-out
    L0 ended 20-25% above k on smollm2-135m after 192 steps).
    Under DDP each process passes its own batches; the counts are summed over processes.
    """
    if not batches:
        log.warning("no training batches left to calibrate the thresholds on; the L0 stays "
                    "where training left it")
        return None
    cfg = sae.cfg
    dev = batches[0].device
    n_rows = torch.tensor(float(sum(len(x) for x in batches)), dtype=torch.float64, device=dev)
    if world > 1:
        torch.distributed.all_reduce(n_rows)

    def bisect(values: torch.Tensor, always: torch.Tensor, lo: float, hi: float,
               target: float) -> float:
        """The smallest t in [lo, hi] with (#values > t + always) / rows <= target."""
        def l0(t: float) -> float:
            fired = (values > t).sum(dtype=torch.float64) + always
            if world > 1:
                torch.distributed.all_reduce(fired)
            return float(fired / n_rows)

        if l0(lo) <= target:
            return lo
        if l0(hi) > target:
            return hi
        for _ in range(_BISECTIONS):
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if l0(mid) > target else (lo, mid)
        return hi

    # Only the entries that could fire at some threshold in the search range are kept
    # (a few per token), not the [tokens, d_sae] pre-activations.
    keep, always = [], torch.zeros((), dtype=torch.float64, device=dev)
    if sae.arch == "batchtopk":
        for x in batches:  # a batch's 2k x rows largest: the threshold sits among them
            z = sae.pre_acts(x).float().flatten()
            keep.append(z.topk(min(len(z), 2 * cfg.k * len(x)), sorted=False).values)
        vals = torch.cat(keep)
        top = vals.max()
        if world > 1:
            torch.distributed.all_reduce(top, op=torch.distributed.ReduceOp.MAX)
        t = bisect(vals, always, 0.0, float(top), float(cfg.k))
        sae.batch_threshold.fill_(t)
        return t
    theta = sae.threshold.detach().float()
    for x in batches:  # z / theta: a latent fires at factor c where z / theta > c
        z = sae.pre_acts(x).float()
        pos = theta > 0
        always += ((z > 0) & ~pos).sum(dtype=torch.float64)
        r = z[:, pos] / theta[pos]
        keep.append(r[r > 1.0 / CALIBRATION_MAX])
    log_c = bisect(torch.cat(keep).log(), always, -math.log(CALIBRATION_MAX),
                   math.log(CALIBRATION_MAX), float(cfg.target_l0))
    if cfg.theta_param == "log":
        sae.log_threshold.add_(log_c)
    else:
        sae.raw_threshold.mul_(math.exp(log_c))
    return math.exp(log_c)
