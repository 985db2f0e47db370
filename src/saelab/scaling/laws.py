"""The `fit_scaling_laws` stage: a pilot grid of small SAEs, scaling-law fits, the budget.

Pilots: every d_sae in scaling.d_sae_grid x every lr in scaling.lr_grid x scaling.seeds
seeds, trained by the shared trainer with train_sae's recipe (short warm-ups,
scaling.n_tokens tokens); then every d_sae x seed at each count of scaling.tokens_grid, at
that size's lr* from the sweep. Pilots with the same seed see the same batches in the
same order, so lr is the only thing that differs along a curve. The widths are meant to be
over-complete like the trained SAE (issue 17: under-complete pilots fall with rank, which
says nothing about sparse dictionaries).

Held-out data: the last sae.eval_tokens vectors of the store. The store keeps corpus
order, so they come from the last documents extracted (one document may straddle the
cut); pilots train on shuffled batches of everything before them and never see them.

The loss of the laws is the training objective on that held-out slice, in the
normalised space the SAE is trained in (E||x||^2 = 1), at the full sparsity coefficient:
    ||x - x_hat||^2 + lambda L0           (sae.sparsity = l0)
    ||x - x_hat||^2 + lambda (2/L0*)(L0 - L0*)^2 at the mean L0   (target_l0,
                                                                   quadratic_l0)
    ||x - x_hat||^2                       (topk / batchtopk: L0 is fixed by k)
Reconstruction error alone would reward an lr that merely buys density; the objective
is what the optimiser is asked to minimise, so its best lr is the one to carry over.
The squared error is per token, so at E||x||^2 = 1 it is on the scale of the FVU.

Fits (saelab.scaling.powerlaw) on the mean over seeds, method `grid`: per size, lr* from a
parabola in log lr around the best grid lr; the loss law on each (size, token count)'s
best loss: L(N, D) = E + A N^-alpha + B D^-beta with a tokens_grid, else L(N) = a N^-b + c
at the sweep's count; lr*(d_sae) as a power law, used only if `lr_check` passes (else the
measured lr* of the nearest width). Intervals (`uncertainty`): a bootstrap over pilots
(each width's seeds redrawn), leave-one-size-out refits and the laws' seed-noise band,
united. The largest width is fitted without and predicted (`holdout`); measured outside
its interval (widened by the measurement's seed noise), the status says so. Method
`two_step` (the seed's): the loss law through the two smallest sizes at one lr, lr* of the
same two sizes, the lr law through them; any further sizes check the prediction.
"""
from __future__ import annotations

import concurrent.futures as cf
import dataclasses
import json
import logging
import math
import multiprocessing
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from ..core import atomic, paths, plots
from ..core.progress import Progress
from .budget import budget_markdown, write_budget
from ..core.config import Params, SAECfg, ScalingCfg
from ..core.errors import SaelabError
from .powerlaw import (Fit, FitError, JointFit, best_lr_parabola, fit_joint, fit_loss_vs_size,
                       fit_lr_vs_size)
from ..core.runtime import resolve_device
from ..core.stage import run_stage
from ..activations.store import ActivationStore
from ..core.tracking import log_artifact, log_metrics, nested_run
from ..sae.train import train

log = logging.getLogger(__name__)

PILOTS_CSV = paths.SCALING_DIR / "pilots.csv"
LOSS_CSV = paths.SCALING_DIR / "loss_vs_size.csv"
LR_CSV = paths.SCALING_DIR / "lr_star_vs_size.csv"
LOSS_PNG = paths.SCALING_DIR / "loss_vs_size.png"
LR_CURVES_PNG = paths.SCALING_DIR / "lr_curves.png"
LR_STAR_PNG = paths.SCALING_DIR / "lr_star_vs_size.png"
# No timings (tokens/s, seconds): pilots.csv and fit.json are tracked by DVC and must be
# byte-identical on rerun; each pilot's MLflow run has them.
PILOT_COLUMNS = ["d_sae", "lr", "seed", "n_tokens", "phase", "status", "loss", "mse", "fvu", "l0",
                 "dead_fraction",
                 "tokens", "error"]


# --- one pilot -------------------------------------------------------------------------

# train_sae settings that pilots do not use (each pilot has its own lr and token count and
# trains from the store, without checkpoints): reset in pilot_cfg so that no pilot can
# depend on them, and left out of fit_scaling_laws' params in dvc.yaml, so that a sweep
# over them does not rerun the pilot grid. (sae.n_tokens is read before the reset: the
# pilots' warm-ups are the same fraction of their steps as train_sae's of its steps.)
TRAIN_ONLY = ("lr", "n_tokens", "max_epochs", "stream", "shuffle_buffer", "stream_lanes",
              "checkpoint_every")
# Of those, the ones pilot_cfg reads before the reset (so fit_scaling_laws declares them).
PILOT_READS = ("n_tokens",)


def pilot_k(k: int, d_sae: int, d_pilot: int) -> int:
    """TopK/BatchTopK k at pilot width: the final SAE's fraction of active latents,
    k / d_sae, kept at every width (a fixed k can exceed a small pilot's width)."""
    return max(1, min(d_pilot, round(k * d_pilot / d_sae)))


def pilot_batch(params: Params) -> int:
    """The pilots' batch: train_sae's unless scaling.batch_size sets another."""
    return params.scaling.batch_size or params.sae.batch_size


def pilot_cfg(params: Params, d_sae: int) -> SAECfg:
    """train_sae's recipe at pilot size and scaling.n_tokens tokens: its batch, its
    warm-ups scaled to the same fraction of the pilot's steps (unless scaling.* sets them),
    k scaled with the width."""
    s, sae = params.scaling, params.sae
    batch = pilot_batch(params)
    # train_sae's steps; sae.n_tokens is null only before the budget resolves it (the
    # stage fills it in), and then the pilot itself is the run the warm-ups are sized for.
    full_steps = max(1, (sae.n_tokens or s.n_tokens) // sae.batch_size)
    steps = max(1, s.n_tokens // batch)

    def warm(override: int | None, train_steps: int) -> int:
        return override if override is not None else round(train_steps * steps / full_steps)

    unused = {k: getattr(SAECfg(), k) for k in TRAIN_ONLY}
    return dataclasses.replace(sae, d_sae=d_sae, batch_size=batch,
                               lr_warmup_steps=warm(s.lr_warmup_steps, sae.lr_warmup_steps),
                               l0_warmup_steps=warm(s.l0_warmup_steps, sae.l0_warmup_steps),
                               k=pilot_k(sae.k, sae.d_sae, d_sae), **unused)


def pilot_loss(metrics: dict[str, Any], cfg: SAECfg, d_in: int) -> float:
    """The held-out training objective (module docstring) from the trainer's eval metrics."""
    sq_err = metrics["mse"] * d_in  # evals report MSE per element; the objective sums over d
    if cfg.architecture != "jumprelu":
        return float(sq_err)
    if cfg.sparsity == "l0":
        return float(sq_err + cfg.l0_coeff * metrics["l0"])
    return float(sq_err + cfg.l0_coeff * (2.0 / cfg.target_l0) * (metrics["l0"] - cfg.target_l0) ** 2)


def heldout_split(n_tokens: int, eval_tokens: int, batch_size: int) -> int:
    """Number of leading store vectors pilots may train on; the rest is held out."""
    n_train = n_tokens - eval_tokens
    if eval_tokens < 1 or n_train < batch_size:
        raise SaelabError(
            f"the store holds {n_tokens} vectors; holding out sae.eval_tokens = {eval_tokens} "
            f"leaves {n_train} for pilots, fewer than one batch (the pilots' batch, "
            f"scaling.batch_size or sae.batch_size: {batch_size}) or no held-out data; raise "
            "extract.n_tokens or lower those")
    return n_train


def run_pilot(params: Params, d_sae: int, lr: float, seed: int, store_dir: str,
              threads: int | None = None) -> dict[str, Any]:
    """Train one pilot and evaluate it on the held-out slice. A pilot the trainer stops
    (NaN/Inf) is a result, not a crash: status `diverged` and a NaN loss."""
    if threads:
        torch.set_num_threads(threads)
    store = ActivationStore(store_dir)
    cfg = pilot_cfg(params, d_sae)
    s, batch = params.scaling, cfg.batch_size
    n_train = heldout_split(store.n_tokens, params.sae.eval_tokens, batch)
    heldout = store.gather(np.arange(n_train, store.n_tokens))
    row: dict[str, Any] = {"d_sae": d_sae, "lr": lr, "seed": seed, "n_tokens": s.n_tokens,
                           "status": "ok", "error": "", "history": []}
    t0 = time.perf_counter()
    try:
        result = train(cfg, store.iter_batches(batch, seed=seed, n_tokens=n_train),
                       d_in=store.d, n_tokens=s.n_tokens, lr=lr,
                       device=resolve_device(params), seed=seed,
                       eval_batches=iter(heldout.split(batch)),
                       eval_n_batches=math.ceil(len(heldout) / batch))
    except SaelabError as e:
        # The trainer's NaN/Inf guard is a result; any other error is a set-up problem that
        # every pilot would share, so it stops the stage with the trainer's message.
        if "NaN/Inf" not in str(e):
            raise
        row.update(status="diverged", loss=math.nan, error=str(e),
                   seconds=time.perf_counter() - t0)
        return row
    m = result.metrics
    loss = pilot_loss(m, cfg, store.d)
    row.update(loss=loss if math.isfinite(loss) else math.nan,
               status="ok" if math.isfinite(loss) else "diverged",
               mse=m["mse"], fvu=m["fvu"], l0=m["l0"], dead_fraction=m["dead_fraction"],
               tokens=m["tokens"], tokens_per_s=m["tokens_per_s"],
               seconds=time.perf_counter() - t0, history=result.history)
    return row


# --- the grid --------------------------------------------------------------------------

PilotFn = Callable[..., dict[str, Any]]


def _log_pilot(row: dict[str, Any], params: Params) -> None:
    name = (f"pilot d_sae={row['d_sae']} lr={row['lr']:.2e} seed={row['seed']} "
            f"tokens={row['n_tokens']}")
    spec = {"d_sae": row["d_sae"], "lr": row["lr"], "seed": row["seed"],
            "n_tokens": row["n_tokens"], "batch_size": pilot_batch(params)}
    with nested_run(name, spec, tags={"saelab.pilot": "true", "status": row["status"]}):
        for h in row.get("history", []):
            # Under train_sae's metric names (train.lr is the schedule; the param lr the
            # peak): no name is both, and pilot and final-SAE curves share chart axes.
            log_metrics({"train": {k: v for k, v in h.items() if k != "step"}},
                        step=int(h["step"]))
        # Training curves keep the trainer's names; the held-out result is apart from them.
        log_metrics({f"heldout_{k}": row[k] for k in ("loss", "mse", "fvu", "l0") if k in row})
        log_metrics({k: row[k] for k in ("dead_fraction", "tokens_per_s", "seconds") if k in row})


def _with_tokens(params: Params, n_tokens: int) -> Params:
    return dataclasses.replace(params, scaling=dataclasses.replace(params.scaling,
                                                                   n_tokens=n_tokens))


def _run_jobs(params: Params, jobs: list[tuple[int, float, int, int]], store_dir: str,
              pilot_fn: PilotFn, bar, phase: str) -> list[dict[str, Any]]:
    """(d_sae, lr, seed, n_tokens) pilots in `scaling.workers` processes; each logged as a
    nested run (from this process, so all of them land under the stage's run). `phase`:
    sweep, tokens (tokens_grid) or guard (the dead-latent guard's lower lrs)."""
    def done(row: dict[str, Any], n_tokens: int) -> dict[str, Any]:
        row.setdefault("n_tokens", n_tokens)
        row["phase"] = phase
        _log_pilot(row, params)
        bar.update(n_tokens, last=f"{phase} d_sae={row['d_sae']} lr={row['lr']:.3g}",
                   loss=row.get("loss", math.nan))
        return row

    workers = min(params.scaling.workers, len(jobs))
    rows: list[dict[str, Any]] = []
    if workers <= 1:
        for d, lr, seed, n in jobs:
            rows.append(done(pilot_fn(_with_tokens(params, n), d, lr, seed, store_dir), n))
        return rows
    # Split the cores between workers; spawn, because forking a process that already
    # ran torch can deadlock in its thread pools.
    threads = max(1, (params.run.num_threads or os.cpu_count() or 1) // workers)
    ctx = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
        futures = {pool.submit(pilot_fn, _with_tokens(params, n), d, lr, seed, store_dir,
                               threads): n for d, lr, seed, n in jobs}
        try:
            for fut in cf.as_completed(futures):
                rows.append(done(fut.result(), futures[fut]))
        except BaseException:
            # Do not sit through the rest of the grid after a failure or Ctrl-C.
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return rows


def run_grid(params: Params, store_dir: str | Path = paths.ACTIVATIONS_DIR,
             pilot_fn: PilotFn = run_pilot) -> list[dict[str, Any]]:
    """The lr sweep (every d_sae x lr x seed at scaling.n_tokens), then, for each count in
    scaling.tokens_grid, every d_sae x seed at that size's lr* from the sweep: the token
    axis of L(N, D) costs one lr per size, not a sweep (its lr* is the sweep's, a caveat).
    Last the dead-latent guard (`dead_guard_jobs`) at the largest count."""
    s = params.scaling
    seeds = [params.run.seed + i for i in range(s.seeds)]
    sizes = sorted(set(s.d_sae_grid))
    sweep = [(d, lr, seed, s.n_tokens) for d in sizes for lr in sorted(set(s.lr_grid))
             for seed in seeds]
    counts = [n for n in sorted(set(s.tokens_grid)) if n != s.n_tokens]
    # Progress in pilot tokens (a pilot's cost grows with its tokens), so the ETA holds
    # across the sweep's short pilots and the long ones at the largest count.
    bar = Progress("pilots", sum(j[3] for j in sweep) + sum(counts) * len(sizes) * len(seeds),
                   unit="pilot token")
    rows = _run_jobs(params, sweep, str(store_dir), pilot_fn, bar, "sweep")
    best = swept_lr_star(rows, s)
    extra = [(d, best[d], seed, n) for n in counts for d in sizes
             if math.isfinite(best[d]) for seed in seeds]
    rows += _run_jobs(params, extra, str(store_dir), pilot_fn, bar, "tokens")
    for _ in range(DEAD_MAX_STEPS + 1):
        jobs = dead_guard_jobs(rows, s, best, seeds)
        if not jobs:
            break
        bar.extend(sum(j[3] for j in jobs))
        rows += _run_jobs(params, jobs, str(store_dir), pilot_fn, bar, "guard")
    bar.close()
    return sorted(rows, key=lambda r: (r["d_sae"], r["n_tokens"], r["lr"], r["seed"]))


def swept_lr_star(rows: Sequence[dict[str, Any]], cfg: ScalingCfg) -> dict[int, float]:
    """Each width's lr* from the sweep: the parabola's where there is one (grid points are
    3x apart; the best of them can sit far up the curve's steep side), else the best grid
    lr."""
    return {e["d_sae"]: e.get("lr_star", e["best_grid_lr"]) for e in sizes_of(rows, cfg)}


# The dead-latent guard steps a width's lr down by this factor (a loss curve is flat near
# its optimum: an lr sqrt(2) below lr* costs little loss) at most this many times (8x).
DEAD_LR_STEP = math.sqrt(2.0)
DEAD_MAX_STEPS = 6


def guard_tokens(cfg: ScalingCfg) -> int:
    """The token count the dead-latent guard measures at: the largest the pilots run (dead
    latents accumulate with steps at a high lr, so the longest run is the one closest to
    train_sae's)."""
    return max((cfg.n_tokens, *cfg.tokens_grid))


def _group_means(rows: Sequence[dict[str, Any]], key: str,
                 sweep_tokens: int) -> dict[tuple[int, int, float], float]:
    """(d_sae, n_tokens, lr) -> mean of `key` over seeds (NaN if any seed lacks it); rows
    without a count are the sweep's."""
    groups: dict[tuple[int, int, float], list[float]] = {}
    for r in rows:
        v = r.get(key)
        groups.setdefault((r["d_sae"], r.get("n_tokens", sweep_tokens), r["lr"]), []).append(
            math.nan if v is None or v == "" else float(v))
    return {k: float(np.mean(v)) for k, v in groups.items()}


def dead_guard(rows: Sequence[dict[str, Any]], cfg: ScalingCfg,
               lr_star: dict[int, float]) -> dict[int, dict[str, Any]]:
    """Per width, the highest lr its pilots at guard_tokens show to keep dead latents
    within scaling.max_dead_fraction (mean over seeds): lr* itself when no lr run there
    up to lr* left more dead, else the largest lr below the smallest such one.
    `state`: `ok` (lr* kept), `lowered`, `pending` (no safe lr run yet: run_grid runs the
    next step down) or `failed` (still dead DEAD_MAX_STEPS steps below lr*: the lowest
    tried is used, and the status says so)."""
    if cfg.max_dead_fraction is None:
        return {}
    n_max = guard_tokens(cfg)
    dead = _group_means(rows, "dead_fraction", cfg.n_tokens)
    loss = _group_means(rows, "loss", cfg.n_tokens)
    out = {}
    for d, star in lr_star.items():
        if not math.isfinite(star):
            continue
        at = {lr: v for (dd, n, lr), v in dead.items() if dd == d and n == n_max}
        if not any(math.isfinite(v) for v in at.values()):
            continue  # pilots that report no dead fraction (a table from before the guard)
        # A diverged pilot (NaN loss) is as unusable as a dead one; one without a dead
        # fraction otherwise (a pilot table from before the guard) is not held against it.
        bad = [lr for lr, v in at.items()
               if v > cfg.max_dead_fraction or not math.isfinite(loss[(d, n_max, lr)])]
        cap = min(bad, default=math.inf)
        entry: dict[str, Any] = {"tokens": n_max, "lr_star": star,
                                 "dead_at_lr": {f"{lr:.6g}": at[lr] for lr in sorted(at)}}
        if cap > star * (1 + 1e-9):  # nothing at or below lr* is dead
            tried = any(math.isclose(lr, star, rel_tol=1e-9) for lr in at)
            entry.update(state="ok" if tried else "pending", lr=star)
        else:
            safe = max((lr for lr in at if lr < cap), default=0.0)
            step = cap / DEAD_LR_STEP
            if safe >= step * (1 - 1e-9):
                entry.update(state="lowered", lr=safe)
            elif step < star / DEAD_LR_STEP ** DEAD_MAX_STEPS * (1 - 1e-9):
                entry.update(state="failed", lr=cap)
            else:
                entry.update(state="pending", lr=step)
        out[d] = entry
    return out


def dead_guard_jobs(rows: Sequence[dict[str, Any]], cfg: ScalingCfg,
                    lr_star: dict[int, float], seeds: list[int]) -> list[tuple[int, float, int, int]]:
    """The pilots the guard still needs: every seed of each `pending` width at the next lr
    to try, at guard_tokens."""
    n_max = guard_tokens(cfg)
    return [(d, g["lr"], seed, n_max) for d, g in sorted(dead_guard(rows, cfg, lr_star).items())
            if g["state"] == "pending" for seed in seeds]


# --- fits (pure) -----------------------------------------------------------------------

Means = dict[tuple[int, float], tuple[float, float]]


def mean_losses(rows: Sequence[dict[str, Any]]) -> Means:
    """(d_sae, lr) -> (mean loss over seeds, its standard error). A diverged seed makes the
    mean NaN: an lr that diverges sometimes is not a safe optimum. The error is NaN with
    fewer than two seeds."""
    groups: dict[tuple[int, float], list[float]] = {}
    for r in rows:
        groups.setdefault((r["d_sae"], r["lr"]), []).append(r["loss"])
    out = {}
    for key, losses in groups.items():
        v = np.asarray(losses, dtype=float)
        if not np.all(np.isfinite(v)):
            out[key] = (math.nan, math.nan)
        else:
            se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else math.nan
            out[key] = (float(v.mean()), se)
    return out


def per_size(table: Means, neighbours: int,
             unsafe: frozenset[tuple[int, float]] = frozenset()) -> list[dict[str, Any]]:
    """lr curve of each size (means over seeds), its parabola lr* (or why there is none)
    and its best loss, over the lrs not in `unsafe` (the dead-latent guard's; the parabola
    goes through every lr: a dead-heavy run is still a measurement of the curve)."""
    out = []
    for d in sorted({d for d, _ in table}):
        lrs = sorted(lr for dd, lr in table if dd == d)
        losses = [table[(d, lr)][0] for lr in lrs]
        ses = [table[(d, lr)][1] for lr in lrs]
        finite = [(lo, lr) for lo, lr in zip(losses, lrs)
                  if math.isfinite(lo) and (d, lr) not in unsafe]
        entry: dict[str, Any] = {"d_sae": d, "lrs": lrs, "losses": losses, "loss_ses": ses,
                                 "best_loss": min(finite)[0] if finite else math.nan,
                                 "best_grid_lr": min(finite)[1] if finite else math.nan}
        try:
            entry["lr_star"], entry["parabola"] = best_lr_parabola(
                lrs, losses, neighbours=neighbours, sigma=ses)
        except FitError as e:
            entry["error"] = str(e)
        out.append(entry)
    return out


def _sigmas(sizes: list[dict[str, Any]]) -> tuple[list[float] | None, list[float] | None]:
    """Per-size errors of the best loss (seed spread pooled over the parabola's points) and
    of ln lr*; None when any size lacks one (then the fits resample residuals)."""
    se = [e["parabola"]["loss_se"] for e in sizes]
    lse = [e["parabola"]["log10_lr_star_se"] for e in sizes]
    loss_sigma = None if any(v is None for v in se) else se
    lr_sigma = None if any(v is None for v in lse) else [math.log(10) * v for v in lse]
    return loss_sigma, lr_sigma


def _require_parabolas(sizes: list[dict[str, Any]]) -> None:
    bad = [f"d_sae={e['d_sae']}: {e['error']}" for e in sizes if "error" in e]
    if bad:
        raise FitError("no best learning rate for " + " | ".join(bad))


def sweep_rows(rows: Sequence[dict[str, Any]], cfg: ScalingCfg) -> list[dict[str, Any]]:
    """The lr sweep's pilots (scaling.n_tokens; not the guard's at that count, which would
    move the parabola they were placed by); rows without a count or phase are the sweep's."""
    return [r for r in rows if r.get("n_tokens", cfg.n_tokens) == cfg.n_tokens
            and r.get("phase", "sweep") == "sweep"]


def unsafe_cells(rows: Sequence[dict[str, Any]], cfg: ScalingCfg) -> frozenset[tuple[int, int, float]]:
    """(d_sae, n_tokens, lr) whose pilots left more than scaling.max_dead_fraction of their
    latents dead (mean over seeds): the laws do not fit their losses. Pilots without a
    dead fraction (diverged ones, whose loss is NaN anyway) are not counted."""
    if cfg.max_dead_fraction is None:
        return frozenset()
    return frozenset(k for k, v in _group_means(rows, "dead_fraction", cfg.n_tokens).items()
                     if v > cfg.max_dead_fraction)


def sizes_of(rows: Sequence[dict[str, Any]], cfg: ScalingCfg) -> list[dict[str, Any]]:
    """Each width's sweep (per_size, its best loss over the lrs the guard allows) and
    `lr_used`: lr*, or the dead-latent guard's lower lr (`dead_guard`, where it has one)."""
    unsafe = unsafe_cells(rows, cfg)
    sizes = per_size(mean_losses(sweep_rows(rows, cfg)), cfg.parabola_neighbours,
                     frozenset((d, lr) for d, n, lr in unsafe if n == cfg.n_tokens))
    guard = dead_guard(rows, cfg, {e["d_sae"]: e["lr_star"] for e in sizes if "lr_star" in e})
    for e in sizes:
        if "lr_star" in e:
            g = guard.get(e["d_sae"])
            e["lr_used"] = g["lr"] if g else e["lr_star"]
            if g:
                e["dead_guard"] = g
    return sizes


def best_cells(rows: Sequence[dict[str, Any]], sweep_tokens: int,
               unsafe: frozenset[tuple[int, int, float]] = frozenset(),
               ) -> list[tuple[int, int, float]]:
    """(d_sae, tokens, loss) of every width and token count: the lowest mean over seeds
    across the lrs run there (the sweep's lrs, or the one best lr of a tokens_grid count,
    and the guard's lower ones), leaving out `unsafe` ones."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in rows:
        n = r.get("n_tokens", sweep_tokens)
        if (r["d_sae"], n, r["lr"]) not in unsafe:
            groups.setdefault((r["d_sae"], n), []).append(r)
    out = []
    for (d, n), group in sorted(groups.items()):
        means = [m for m, _ in mean_losses(group).values() if math.isfinite(m)]
        out.append((d, n, min(means) if means else math.nan))
    return out


@dataclasses.dataclass
class Laws:
    """The fitted laws of one set of pilots. `loss` is L(N, D) with scaling.tokens_grid,
    else L(N) at the sweep's token count (which it cannot leave)."""
    sizes: list[dict[str, Any]]
    loss: Fit | JointFit
    lr: Fit
    sweep_tokens: int

    def predict_loss(self, n: float, d: float) -> float | None:
        if isinstance(self.loss, JointFit):
            return self.loss.predict(n, d)
        return self.loss.predict(n) if d == self.sweep_tokens else None


def fit_laws(rows: Sequence[dict[str, Any]], cfg: ScalingCfg, seed: int, *,
             bootstrap: int | None = None, start: Laws | None = None) -> Laws:
    """The laws of method `grid` from pilot rows; `bootstrap` overrides scaling.bootstrap
    (0 for refits inside the interval estimates, which warm-start from `start`)."""
    reps = cfg.bootstrap if bootstrap is None else bootstrap
    sizes = sizes_of(rows, cfg)
    _require_parabolas(sizes)
    loss_sigma, lr_sigma = _sigmas(sizes)
    d = [e["d_sae"] for e in sizes]
    loss: Fit | JointFit
    if cfg.tokens_grid:
        cells = [c for c in best_cells(rows, cfg.n_tokens, unsafe_cells(rows, cfg))
                 if c[0] in d and math.isfinite(c[2])]
        n, t, v = zip(*cells)
        warm = start.loss if start and isinstance(start.loss, JointFit) else None
        loss = fit_joint(n, t, v, start=warm)
    else:
        loss = fit_loss_vs_size(d, [e["best_loss"] for e in sizes], sigma=loss_sigma,
                                bootstrap=reps, seed=seed)
    lr_fit = fit_lr_vs_size(d, [e["lr_star"] for e in sizes], sigma_log=lr_sigma,
                            bootstrap=reps, seed=seed)
    return Laws(sizes, loss, lr_fit, cfg.n_tokens)


Target = tuple[str, int, int]  # name, d_sae, tokens


def _interval(point: float | None, boot: list[float], loso: list[float],
              seed_ci: list[float] | None, min_reps: int = 20) -> dict[str, Any]:
    """The reported interval: the union of the bootstrap-over-pilots 95% interval, the
    range of the leave-one-size-out refits, the law's own seed-noise interval (parametric
    bootstrap, where it has one) and the point itself."""
    b = ([float(np.percentile(boot, 2.5)), float(np.percentile(boot, 97.5))]
         if len(boot) >= min_reps else None)
    lo = [min(loso), max(loso)] if loso else None
    parts = [v for v in (b, lo, seed_ci, [point, point] if point is not None else None) if v]
    return {"ci": ([min(p[0] for p in parts), max(p[1] for p in parts)]
                   if (b or lo or seed_ci) else None),
            "ci_bootstrap": b, "ci_loso": lo, "ci_seed_noise": seed_ci, "loso": loso,
            "bootstrap_reps": len(boot)}


def uncertainty(rows: Sequence[dict[str, Any]], cfg: ScalingCfg, laws: Laws,
                targets: Sequence[Target], seed: int) -> dict[str, dict[str, Any]]:
    """Intervals of the predicted loss and lr* at each target, from the pilots themselves:
    a bootstrap over pilots (each width's seeds redrawn with replacement, so a seed's lr
    curve moves as one, and everything refitted) and leave-one-size-out refits (how far
    the prediction moves when one width is dropped: the law's own instability, which seed
    noise alone does not show)."""
    fitted = [e["d_sae"] for e in laws.sizes]
    by_size: dict[int, dict[int, list[dict[str, Any]]]] = {}
    for r in rows:
        if r["d_sae"] in fitted:
            by_size.setdefault(r["d_sae"], {}).setdefault(r["seed"], []).append(r)

    def predict(l: Laws) -> list[tuple[float | None, float]]:
        return [(l.predict_loss(n, dd), l.lr.predict(n)) for _, n, dd in targets]

    boot: list[list[tuple[float | None, float]]] = []
    rng = np.random.default_rng(seed)
    n_seeds = min(len(v) for v in by_size.values()) if by_size else 0
    for _ in range(cfg.bootstrap if n_seeds > 1 else 0):
        drawn = []
        for d in fitted:
            keys = sorted(by_size[d])
            for i in rng.integers(0, len(keys), len(keys)):
                drawn += by_size[d][keys[i]]
        try:
            boot.append(predict(fit_laws(drawn, cfg, seed, bootstrap=0, start=laws)))
        except FitError:
            continue
    loso: list[list[tuple[float | None, float]]] = []
    if len(fitted) >= 3:
        for d in fitted:
            try:
                loso.append(predict(fit_laws([r for r in rows if r["d_sae"] != d and
                                               r["d_sae"] in fitted], cfg, seed, bootstrap=0)))
            except FitError:
                continue
    out = {}
    for i, (name, n, dd) in enumerate(targets):
        point_loss, point_lr = laws.predict_loss(n, dd), laws.lr.predict(n)
        loss_b = [p[i][0] for p in boot if p[i][0] is not None and math.isfinite(p[i][0])]
        loss_l = [p[i][0] for p in loso if p[i][0] is not None and math.isfinite(p[i][0])]
        lr_b = [p[i][1] for p in boot if math.isfinite(p[i][1])]
        lr_l = [p[i][1] for p in loso if math.isfinite(p[i][1])]
        seed_ci = laws.loss.predict_ci(n) if isinstance(laws.loss, Fit) else None
        out[name] = {"loss": point_loss,
                     "loss_interval": _interval(point_loss, loss_b, loss_l, seed_ci)
                     if point_loss is not None else None,
                     "lr": point_lr,
                     "lr_interval": _interval(point_lr, lr_b, lr_l, laws.lr.predict_ci(n))}
    return out


def _two_step_lr(means: Means, pair: list[int], cfg: ScalingCfg) -> float:
    """The one lr of the two-step loss law: scaling.two_step_lr, else the grid lr with the
    lowest summed loss over the two sizes."""
    lrs = sorted({lr for _, lr in means})
    if cfg.two_step_lr is not None:
        match = [lr for lr in lrs if math.isclose(lr, cfg.two_step_lr, rel_tol=1e-9)]
        if not match:
            raise FitError(f"scaling.two_step_lr = {cfg.two_step_lr} is not in "
                           f"scaling.lr_grid {lrs}; add it or set two_step_lr to null")
        return match[0]
    sums = {lr: means[(pair[0], lr)][0] + means[(pair[1], lr)][0] for lr in lrs}
    finite = {lr: v for lr, v in sums.items() if math.isfinite(v)}
    if not finite:
        raise FitError(f"every lr diverged at d_sae {pair}; lower scaling.lr_grid")
    return min(finite, key=finite.get)


def _fit_two_step(means: Means, sizes: list[dict[str, Any]], cfg: ScalingCfg,
                  seed: int) -> tuple[Fit, Fit, float]:
    if len(sizes) < 2:
        raise FitError(f"method two_step needs 2 sizes in scaling.d_sae_grid, got "
                       f"{[e['d_sae'] for e in sizes]}")
    pair = sizes[:2]
    _require_parabolas(pair)
    d = [e["d_sae"] for e in pair]
    lr0 = _two_step_lr(means, d, cfg)
    se = [means[(n, lr0)][1] for n in d]
    loss_fit = fit_loss_vs_size(d, [means[(n, lr0)][0] for n in d],
                                sigma=se if all(math.isfinite(v) for v in se) else None,
                                bootstrap=cfg.bootstrap, seed=seed)
    lr_fit = fit_lr_vs_size(d, [e["lr_star"] for e in pair], sigma_log=_sigmas(pair)[1],
                            bootstrap=cfg.bootstrap, seed=seed)
    return loss_fit, lr_fit, lr0


def _check(loss_fit: Fit, lr_fit: Fit | None, d: int, trained_loss: float,
           trained_lr_star: float | None) -> dict[str, Any]:
    """Prediction at a size the fit did not see against what was trained there."""
    pred = loss_fit.predict(d)
    ci = loss_fit.predict_ci(d)
    out = {"d_sae": d, "predicted_loss": pred, "predicted_loss_ci": ci,
           "trained_loss": trained_loss, "gap": pred - trained_loss,
           "rel_gap": (pred - trained_loss) / trained_loss,
           "rel_error_pct": 100 * (pred - trained_loss) / trained_loss,
           "trained_within_ci": None if ci is None else bool(ci[0] <= trained_loss <= ci[1])}
    if lr_fit is not None and trained_lr_star is not None:
        out["predicted_lr_star"] = lr_fit.predict(d)
        out["trained_lr_star"] = trained_lr_star
        out["lr_star_ratio"] = out["predicted_lr_star"] / trained_lr_star
    return out


def measurement_interval(pred: float, ci: list[float] | None,
                         se: float | None) -> list[float] | None:
    """Where a measurement of the predicted loss should land: the law's interval widened,
    in quadrature at 95%, by the measurement's own noise (a mean over seeds)."""
    if ci is None or se is None:
        return ci
    z = 1.96 * se
    return [pred - math.hypot(pred - ci[0], z), pred + math.hypot(ci[1] - pred, z)]


def _holdout_grid(rows: Sequence[dict[str, Any]], sizes: list[dict[str, Any]],
                  cfg: ScalingCfg, seed: int) -> dict[str, Any]:
    """Fit without the largest width, predict it, and compare: the loss at the sweep's
    token count (its best lr) and lr*, with the same intervals as every prediction."""
    if not cfg.holdout_largest:
        return {"status": "off"}
    if len(sizes) < 3:
        return {"status": "skipped", "reason": f"holding out one of {len(sizes)} sizes leaves "
                "fewer than 2 to fit; add sizes to scaling.d_sae_grid"}
    last = sizes[-1]
    kept = [r for r in rows if r["d_sae"] != last["d_sae"]]
    try:
        laws = fit_laws(kept, cfg, seed)
    except FitError as e:
        return {"status": "degenerate", "reason": str(e)}
    d, n = last["d_sae"], cfg.n_tokens
    u = uncertainty(kept, cfg, laws, [("holdout", d, n)], seed)["holdout"]
    pred, measured, ci = u["loss"], last["best_loss"], u["loss_interval"]["ci"]
    se = (last.get("parabola") or {}).get("loss_se")
    pi = measurement_interval(pred, ci, se)
    return {"status": "ok", "fit_sizes": [e["d_sae"] for e in laws.sizes], "d_sae": d,
            "n_tokens": n, "beyond_largest_fitted": d / max(e["d_sae"] for e in laws.sizes),
            "loss_fit": laws.loss.to_dict(), "lr_fit": laws.lr.to_dict(),
            "predicted_loss": pred, "trained_loss": measured, "gap": pred - measured,
            "rel_gap": (pred - measured) / measured,
            "rel_error_pct": 100 * (pred - measured) / measured,
            "predicted_loss_ci": ci,
            "predicted_loss_ci_bootstrap": u["loss_interval"]["ci_bootstrap"],
            "predicted_loss_ci_loso": u["loss_interval"]["ci_loso"],
            "measured_loss_se": se, "measurement_interval": pi,
            "trained_within_ci": None if pi is None else bool(pi[0] <= measured <= pi[1]),
            "predicted_lr_star": u["lr"], "predicted_lr_star_ci": u["lr_interval"]["ci"],
            "trained_lr_star": last["lr_star"], "lr_star_ratio": u["lr"] / last["lr_star"],
            "trained_lr_guarded": last.get("lr_used")}


def _holdout_two_step(means: Means, sizes: list[dict[str, Any]], loss_fit: Fit, lr_fit: Fit,
                      lr0: float) -> dict[str, Any]:
    rest = sizes[2:]
    if not rest:
        return {"status": "skipped", "reason": "no size beyond the two fitted ones"}
    checks = [_check(loss_fit, lr_fit, e["d_sae"], means[(e["d_sae"], lr0)][0],
                     e.get("lr_star")) for e in rest]
    return {"status": "ok", "lr": lr0, "checks": checks}


def _last_check(holdout: dict[str, Any]) -> dict[str, Any] | None:
    """The held-out comparison at the largest size the fit did not see, if any."""
    checks = holdout.get("checks") or ([holdout] if "rel_gap" in holdout else [])
    return checks[-1] if checks else None


def _curve(predict: Callable[[float], float | None],
           ci: Callable[[float], list[float] | None], lo: float, hi: float,
           n: int = 60) -> list[dict[str, float]]:
    out = []
    for d in np.geomspace(lo, hi, n):
        band = ci(d)
        out.append({"d_sae": float(d), "value": predict(d),
                    "lo": band[0] if band else math.nan, "hi": band[1] if band else math.nan})
    return out


def _fallback_lr(sizes: list[dict[str, Any]], d_sae: int) -> tuple[float, int] | None:
    """The best measured lr at the pilot width nearest d_sae (in log width): its parabola
    lr* (or the dead-latent guard's lower lr) where it has one, else its best grid lr."""
    e = _nearest([e for e in sizes if "lr_star" in e or math.isfinite(e["best_grid_lr"])],
                 d_sae)
    return None if e is None else (e.get("lr_used", e["best_grid_lr"]), e["d_sae"])


def _nearest(sizes: list[dict[str, Any]], d_sae: int) -> dict[str, Any] | None:
    """The pilot width nearest d_sae in log width (the wider one on a tie), or None."""
    return min(sizes, key=lambda e: (abs(math.log(e["d_sae"] / d_sae)), -e["d_sae"]),
               default=None)


def _guard_cap(sizes: list[dict[str, Any]], d_sae: int) -> tuple[float, int, int] | None:
    """(lr, width, tokens) the dead-latent guard caps train_sae's lr at: the guarded lr of
    the pilot width nearest d_sae (in log width), where the guard lowered it. lr* itself is
    the loss's optimum and extrapolates with width; the guard's limit is a measurement
    (narrower pilots with no dead latents say nothing of where a wider SAE's start)."""
    e = _nearest([e for e in sizes if e.get("dead_guard")], d_sae)
    if e is None:
        return None
    g = e["dead_guard"]
    return (g["lr"], e["d_sae"], g["tokens"]) if g["state"] in ("lowered", "failed") else None


def lr_check(laws: Laws, d_sae: int, cfg: ScalingCfg) -> dict[str, Any]:
    """Whether lr*(d_sae) from the law may be used: the exponent's sign (lr* rising with
    width extrapolates into divergence: issue 17 measured +10% to +51% over-prediction at
    2x-8x), how much of the lr* spread the law explains, and whether its answer lies
    inside the swept lrs (outside, no pilot measured anything like it)."""
    lrs = [lr for e in laws.sizes for lr in e["lrs"]]
    b, r2, lr = laws.lr.coef["b"], laws.lr.r2, laws.lr.predict(d_sae)
    failures = []
    if b > cfg.lr_max_exponent:
        failures.append(f"lr* = a N^b has b = {b:.3g} > scaling.lr_max_exponent = "
                        f"{cfg.lr_max_exponent:g} (lr* rising with width)")
    if r2 is not None and r2 < cfg.lr_min_r2:
        failures.append(f"R^2 of the lr law is {r2:.2f} < scaling.lr_min_r2 = "
                        f"{cfg.lr_min_r2:g}: it explains little of the lr* spread")
    if not min(lrs) <= lr <= max(lrs):
        failures.append(f"lr*(d_sae={d_sae}) = {lr:.3g} lies outside the swept lrs "
                        f"[{min(lrs):.3g}, {max(lrs):.3g}]")
    return {"ok": not failures, "exponent": b, "r2": r2, "lr_at_target": lr,
            "swept_lr_min": min(lrs), "swept_lr_max": max(lrs), "failures": failures}


def fit_pilots(rows: Sequence[dict[str, Any]], cfg: ScalingCfg, *, d_sae: int, n_tokens: int,
               real_d_sae: int | None = None, train_tokens: int | None = None,
               seed: int = 0) -> dict[str, Any]:
    """Everything fit.json says, from the pilot table alone (no training, no I/O).

    `d_sae` is the size to recommend an lr for (train_sae's), trained on `train_tokens`
    (default `n_tokens`); `real_d_sae` another size to extrapolate to (the budget's);
    `n_tokens` the token budget passed through. A fit the data cannot support gives
    `status: degenerate` with the reason; an lr law that fails `lr_check` gives
    `lr_fallback`; a held-out width measured outside its interval gives
    `holdout_outside_interval`. The recommended lr then comes from the nearest pilot width
    where the law is not to be trusted, and `recommended.source` says so.
    """
    means = mean_losses(sweep_rows(rows, cfg))
    sizes = sizes_of(rows, cfg)
    train_tokens = train_tokens or n_tokens
    result: dict[str, Any] = {
        "method": cfg.method,
        "loss_definition": "held-out training objective (squared error per token in the "
                           "normalised space + sparsity penalty at the final coefficient)",
        "pilot_tokens": cfg.n_tokens,
        "tokens_grid": sorted({cfg.n_tokens, *cfg.tokens_grid}),
        "seeds": cfg.seeds,
        "max_dead_fraction": cfg.max_dead_fraction,
        "per_size": sizes,
    }
    targets = {"train_sae": d_sae, **({"budget": real_d_sae} if real_d_sae else {})}
    tokens = {"train_sae": train_tokens, "budget": n_tokens}

    def fallback(status: str, why: str) -> dict[str, Any]:
        fb = _fallback_lr(sizes, d_sae)
        return {"lr": fb[0] if fb else None, "d_sae": d_sae, "n_tokens": n_tokens,
                "lr_source": ("fallback_best_pilot" if status == "degenerate"
                              else "fallback_nearest_width") if fb else "none",
                "source": (f"FALLBACK, not the law: the best measured lr at d_sae={fb[1]} "
                           f"(the pilot width nearest d_sae={d_sae}), because {why}" if fb
                           else f"no lr: every pilot failed and {why}")
                          + "; n_tokens: compute budget (reports/budget.json)"}

    try:
        if cfg.method == "grid":
            laws = fit_laws(rows, cfg, seed)
            loss_fit, lr_fit = laws.loss, laws.lr
            holdout = _holdout_grid(rows, sizes, cfg, seed)
        else:
            loss_fit, lr_fit, lr0 = _fit_two_step(means, sizes, cfg, seed)
            laws = Laws(sizes[:2], loss_fit, lr_fit, cfg.n_tokens)
            result["two_step_lr"] = lr0
            holdout = _holdout_two_step(means, sizes, loss_fit, lr_fit, lr0)
    except FitError as e:
        result.update(status="degenerate", reason=str(e), problems=[f"degenerate: {e}"],
                      holdout={"status": "skipped"})
        result["recommended"] = fallback("degenerate", f"the fit is degenerate: {e}")
        return result

    joint = isinstance(loss_fit, JointFit)
    at = {name: (tokens[name] if joint else cfg.n_tokens) for name in targets}
    unc = (uncertainty(rows, cfg, laws, [(k, n, at[k]) for k, n in targets.items()], seed)
           if cfg.method == "grid" else {})
    check = lr_check(laws, d_sae, cfg)
    problems = []
    if not check["ok"]:
        problems.append(("lr_fallback", "; ".join(check["failures"])))
    stuck = [e for e in sizes if e.get("dead_guard", {}).get("state") in ("failed", "pending")]
    if stuck:
        problems.append(("dead_latents", "; ".join(
            f"d_sae={e['d_sae']}: more than scaling.max_dead_fraction = "
            f"{cfg.max_dead_fraction:g} of latents dead at {e['dead_guard']['tokens']} tokens "
            f"down to lr {e['dead_guard']['lr']:.3g} ({e['dead_guard']['state']}); lower "
            "scaling.lr_grid or raise scaling.max_dead_fraction" for e in stuck)))
    h = _last_check(holdout)
    if h and h["trained_within_ci"] is False:
        iv = h.get("measurement_interval") or h["predicted_loss_ci"]
        problems.append(("holdout_outside_interval",
                         f"the held-out d_sae={h['d_sae']} measured {h['trained_loss']:.4g}, "
                         f"outside the predicted interval [{iv[0]:.4g}, {iv[1]:.4g}] (error "
                         f"{h['rel_error_pct']:+.1f}%)"))
    result.update(status=problems[0][0] if problems else "ok",
                  reason="; ".join(f"{k}: {v}" for k, v in problems),
                  problems=[f"{k}: {v}" for k, v in problems],
                  loss_fit=loss_fit.to_dict(), lr_fit=lr_fit.to_dict(), lr_check=check,
                  holdout=holdout)
    d_fit = [e["d_sae"] for e in laws.sizes]
    extrapolation = {}
    for name, n in targets.items():
        u = unc.get(name, {})
        loss_iv = (u.get("loss_interval") or {})
        lr_iv = u.get("lr_interval") or {}
        t = {"d_sae": n, "n_tokens": at[name], "beyond_largest_pilot": n / max(d_fit),
             "loss": laws.predict_loss(n, at[name]),
             "loss_ci": loss_iv.get("ci") if unc else loss_fit.predict_ci(n),
             "loss_ci_bootstrap": loss_iv.get("ci_bootstrap"),
             "loss_ci_loso": loss_iv.get("ci_loso"),
             "lr": lr_fit.predict(n),
             "lr_ci": lr_iv.get("ci") if unc else lr_fit.predict_ci(n)}
        if joint:
            t["beyond_largest_pilot_tokens"] = at[name] / max(result["tokens_grid"])
            # The token budget the law asks for: where more data buys < 1% of the loss.
            t["tokens_for_1pct_of_floor"] = loss_fit.tokens_for(n, 0.01)
        else:
            t["loss_note"] = f"at the pilots' {cfg.n_tokens} tokens, not the token budget"
        extrapolation[name] = t
    result["extrapolation"] = extrapolation
    if check["ok"]:
        result["recommended"] = {
            "lr": lr_fit.predict(d_sae), "d_sae": d_sae, "n_tokens": n_tokens,
            "lr_source": "fit",
            "source": f"lr: power law lr*(d_sae) from the pilot grid (method {cfg.method}) "
                      f"evaluated at d_sae={d_sae}; n_tokens: compute budget "
                      "(reports/budget.json)"}
        cap = _guard_cap(sizes, d_sae)
        if cap is not None and cap[0] < result["recommended"]["lr"]:
            law_lr = result["recommended"]["lr"]
            result["recommended"].update(
                lr=cap[0], lr_source="fit_capped_dead", lr_law=law_lr,
                source=f"lr: the dead-latent guard's {cap[0]:.3g} at d_sae={cap[1]}, below the "
                       f"power law's lr*(d_sae={d_sae}) = {law_lr:.3g}: at that lr more than "
                       f"scaling.max_dead_fraction = {cfg.max_dead_fraction:g} of latents "
                       f"died in the pilots of {cap[2]} tokens; n_tokens: compute budget "
                       "(reports/budget.json)")
    else:
        result["recommended"] = fallback("lr_fallback", "the lr law failed its check: "
                                         + "; ".join(check["failures"]))
    top = max(max(d_fit), *targets.values())
    lo = min(d_fit) / 1.5
    if joint:  # the law at every pilot token count (the plot); the sweep's is the CSV's
        by_tokens = {n: _curve(lambda x, n=n: loss_fit.predict(x, n), lambda x: None,
                               lo, top * 1.5) for n in result["tokens_grid"]}
    else:
        by_tokens = {cfg.n_tokens: _curve(loss_fit.predict, loss_fit.predict_ci, lo, top * 1.5)}
    result["curves"] = {"loss": by_tokens[cfg.n_tokens], "loss_by_tokens": by_tokens,
                        "lr": _curve(lr_fit.predict, lr_fit.predict_ci, lo, top * 1.5)}
    return result


# --- outputs ---------------------------------------------------------------------------

def _plot_fit(ax, curve: list[dict[str, float]], law: str) -> None:
    """A fitted law and, where the parametric bootstrap gave one, its 95% seed-noise band."""
    x = [p["d_sae"] for p in curve]
    ax.plot(x, [p["value"] for p in curve], color="C1", label="fit " + law)
    if all(math.isfinite(p["lo"]) for p in curve):
        ax.fill_between(x, [p["lo"] for p in curve], [p["hi"] for p in curve],
                        color="C1", alpha=0.2, label="95% seed-noise band")


def _plot_loss(result: dict[str, Any], rows, path: Path) -> None:
    """Pilots (grey), the best loss per width and token count, the law at each count, the
    held-out width (measured, predicted with its interval and the error) and the
    extrapolations with theirs; log-log."""
    fig, ax = plots.new_figure("Held-out loss against SAE width", "d_sae (latents)",
                               "held-out loss (training objective)", logx=True, logy=True)
    sweep = result["pilot_tokens"]
    ok = [r for r in rows if math.isfinite(r["loss"])]
    ax.scatter([r["d_sae"] for r in ok], [r["loss"] for r in ok], s=10, color="0.75",
               label="pilots (every lr and seed)")
    counts = result.get("tokens_grid") or [sweep]
    color = {n: f"C{i}" for i, n in enumerate(counts)}
    cells = best_cells(rows, sweep)
    for n in counts:
        ax.plot([d for d, nn, _ in cells if nn == n], [v for _, nn, v in cells if nn == n], "o",
                color=color[n], zorder=3, label=f"best lr, {n:,} tokens")
        curve = (result.get("curves") or {}).get("loss_by_tokens", {}).get(n)
        if curve:
            ax.plot([p["d_sae"] for p in curve], [p["value"] for p in curve], "-",
                    color=color[n], alpha=0.7)
            band = [p for p in curve if math.isfinite(p["lo"])]
            if band:
                ax.fill_between([p["d_sae"] for p in band], [p["lo"] for p in band],
                                [p["hi"] for p in band], color=color[n], alpha=0.15)
    if result["status"] != "degenerate":
        law = result["loss_fit"]["law"]
        ax.plot([], [], "-", color="0.3", label=f"fit: {law}")
        h = _last_check(result["holdout"])
        if h:
            ci = h.get("measurement_interval") or h["predicted_loss_ci"]
            yerr = None if ci is None else [[max(h["predicted_loss"] - ci[0], 0)],
                                            [max(ci[1] - h["predicted_loss"], 0)]]
            ax.errorbar([h["d_sae"]], [h["predicted_loss"]], yerr=yerr, fmt="x", color="C3",
                        capsize=4, zorder=5,
                        label=f"held-out d_sae={h['d_sae']} predicted (interval): error "
                              f"{h['rel_error_pct']:+.1f}%, measured "
                              f"{'inside' if h['trained_within_ci'] else 'OUTSIDE'}")
            ax.scatter([h["d_sae"]], [h["trained_loss"]], marker="s", facecolor="none",
                       edgecolor="C3", s=60, zorder=5, label="held-out d_sae measured")
        for i, (name, t) in enumerate(result["extrapolation"].items()):
            if t["loss"] is None:
                continue
            c = f"C{5 + i}"
            ax.scatter([t["d_sae"]], [t["loss"]], marker="*", s=100, color=c, zorder=4,
                       label=f"predicted {name}: d_sae={t['d_sae']}, {t['n_tokens']:.3g} tokens"
                             + _meaningless(t))
            if t["loss_ci"] is not None:
                # A percentile interval need not contain the point estimate: draw it as is.
                ax.vlines(t["d_sae"], *t["loss_ci"], color=c)
        if result["status"] != "ok":
            ax.text(0.02, 0.02, f"status: {result['status']} (see fit.json)",
                    transform=ax.transAxes, color="C3")
    else:
        ax.text(0.02, 0.02, "fit degenerate: see fit.json", transform=ax.transAxes)
    ax.legend(fontsize=6, loc="upper right")
    plots.save(fig, path)


def _meaningless(t: dict[str, Any]) -> str:
    """The label suffix of an extrapolation flag_transfer marked as another model's."""
    return " (MEANINGLESS: another model's d_in)" if t.get("meaningful") is False else ""


def _plot_lr_curves(result: dict[str, Any], path: Path) -> None:
    fig, ax = plots.new_figure("Held-out loss against learning rate", "learning rate", "loss",
                               logx=True)
    for i, e in enumerate(result["per_size"]):
        color = f"C{i % 10}"
        ax.plot(e["lrs"], e["losses"], "o:", color=color, lw=0.8, label=f"d_sae={e['d_sae']}")
        if "parabola" in e:
            p2, p1, p0 = e["parabola"]["coef"]
            window = e["parabola"]["window_lrs"]  # drawn only where it was fitted
            x = np.linspace(math.log10(window[0]), math.log10(window[-1]), 50)
            ax.plot(10 ** x, p2 * x ** 2 + p1 * x + p0, "-", color=color, alpha=0.6)
            ax.axvline(e["lr_star"], color=color, ls=":", alpha=0.8)
    ax.legend(fontsize=7)
    plots.save(fig, path)


def _plot_lr_star(result: dict[str, Any], path: Path) -> None:
    fig, ax = plots.new_figure("Best learning rate against SAE size", "d_sae", "lr*",
                               logx=True, logy=True)
    found = [e for e in result["per_size"] if "lr_star" in e]
    ax.scatter([e["d_sae"] for e in found], [e["lr_star"] for e in found], color="C0",
               zorder=3, label="lr* (parabola)")
    guarded = [e for e in found if e.get("dead_guard", {}).get("state") in ("lowered", "failed")]
    if guarded:
        ax.scatter([e["d_sae"] for e in guarded], [e["lr_used"] for e in guarded], marker="v",
                   color="C3", zorder=3, label="dead-latent guard: highest lr with <= "
                   f"{result.get('max_dead_fraction', 0):.0%} dead at "
                   f"{guarded[0]['dead_guard']['tokens']:,} tokens")
    if result["status"] != "degenerate":
        _plot_fit(ax, result["curves"]["lr"], result["lr_fit"]["law"])
        for name, t in result["extrapolation"].items():
            ax.scatter([t["d_sae"]], [t["lr"]], marker="*", s=100, zorder=4,
                       label=f"law at {name}: {t['lr']:.2e}" + _meaningless(t))
        rec = result["recommended"]
        if rec["lr_source"] != "fit" and rec["lr"] is not None:
            why = ("capped by the dead-latent guard" if rec["lr_source"] == "fit_capped_dead"
                   else "FALLBACK, lr law failed its check")
            ax.scatter([rec["d_sae"]], [rec["lr"]], marker="D", color="C3", zorder=5,
                       label=f"used: {rec['lr']:.2e} ({why})")
    else:
        ax.text(0.02, 0.02, "fit degenerate: see fit.json", transform=ax.transAxes)
    ax.legend(fontsize=7)
    plots.save(fig, path)


def _json_safe(obj: Any) -> Any:
    """NaN/inf -> null (strict JSON, which DVC and browsers parse)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_json_safe(v) for v in obj]
    return obj


def write_outputs(result: dict[str, Any], rows: Sequence[dict[str, Any]],
                  out_dir: Path = paths.SCALING_DIR) -> dict[str, Path]:
    """fit.json, the CSV tables behind the plots (DVC plots) and the PNGs."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    table = [{k: r.get(k, "") for k in PILOT_COLUMNS} for r in rows]
    written = {"pilots_csv": plots.write_csv(out_dir / PILOTS_CSV.name, table, PILOT_COLUMNS)}
    # Written even without a fit (header only): DVC fails a stage that leaves an out missing.
    curves = result.get("curves", {})
    for key, name in (("loss", LOSS_CSV.name), ("lr", LR_CSV.name)):
        pts = [{"d_sae": p["d_sae"], key: p["value"], "lo": p["lo"], "hi": p["hi"]}
               for p in curves.get(key, [])]
        written[f"{key}_csv"] = plots.write_csv(out_dir / name, pts, ["d_sae", key, "lo", "hi"])
    _plot_loss(result, rows, out_dir / LOSS_PNG.name)
    _plot_lr_curves(result, out_dir / LR_CURVES_PNG.name)
    _plot_lr_star(result, out_dir / LR_STAR_PNG.name)
    written.update(loss_png=out_dir / LOSS_PNG.name, lr_curves_png=out_dir / LR_CURVES_PNG.name,
                   lr_star_png=out_dir / LR_STAR_PNG.name)
    report = {k: v for k, v in result.items() if k != "curves"}
    report["pilots"] = table
    fit_json = out_dir / paths.FIT_JSON.name
    atomic.write_text(fit_json, json.dumps(_json_safe(report), indent=2) + "\n")
    written["fit_json"] = fit_json
    return written


def _summary_metrics(result: dict[str, Any]) -> dict[str, Any]:
    """fit.json's headline numbers for MLflow (the stage run)."""
    out: dict[str, Any] = {"degenerate": int(result["status"] == "degenerate"),
                           "status_ok": int(result["status"] == "ok")}
    rec = result["recommended"]
    if rec["lr"] is not None:
        out["recommended_lr"] = rec["lr"]
        out["recommended_lr_from_law"] = int(rec["lr_source"] == "fit")
        out["recommended_lr_capped_dead"] = int(rec["lr_source"] == "fit_capped_dead")
    if result["status"] == "degenerate":
        return out
    out.update({f"loss_fit_{k}": v for k, v in result["loss_fit"]["coef"].items()})
    out.update({f"lr_fit_{k}": v for k, v in result["lr_fit"]["coef"].items()})
    for key in ("loss_fit", "lr_fit"):
        if result[key]["r2"] is not None:
            out[f"{key}_r2"] = result[key]["r2"]
    for name, t in result["extrapolation"].items():
        if t.get("meaningful") is False:  # kept in fit.json with its note, never logged plainly
            continue
        if t["loss"] is not None:
            out[f"predicted_loss_{name}"] = t["loss"]
        if t["loss_ci"] is not None:
            out[f"predicted_loss_{name}_lo"], out[f"predicted_loss_{name}_hi"] = t["loss_ci"]
    h = _last_check(result["holdout"])
    if h:  # the largest size the fit did not see
        out["holdout_rel_gap"] = h["rel_gap"]
        out["holdout_rel_error_pct"] = h["rel_error_pct"]
        if h["trained_within_ci"] is not None:
            out["holdout_inside_interval"] = int(h["trained_within_ci"])
        if h.get("lr_star_ratio") is not None:
            out["holdout_lr_star_ratio"] = h["lr_star_ratio"]
    return out


def caveats(params: Params) -> list[str]:
    """What the recommended lr does not account for, in words, for fit.json."""
    s, sae = params.scaling, params.sae
    out = [f"lr* was measured on pilots of {s.n_tokens} tokens; the best lr of a longer run "
           "is often lower (the token axis of the loss law runs at each size's swept lr*)"]
    if pilot_batch(params) != sae.batch_size:
        out.append(f"pilots use batch {pilot_batch(params)} but train_sae uses "
                   f"sae.batch_size = {sae.batch_size}; lr* depends on the batch size")
    return out


def flag_batch(result: dict[str, Any], params: Params) -> None:
    """Mark the loss predicted for train_sae when it trains at another batch than the
    pilots: the law's token axis is tokens at the pilots' batch (on tiny, 1,048,576 tokens
    at batch 4,096 measured 0.204 where the law said 0.137: the same tokens are 16x fewer
    steps)."""
    t = result.get("extrapolation", {}).get("train_sae")
    if t is None:
        return
    pilot, final = pilot_batch(params), params.sae.batch_size
    t["batch_matched"] = pilot == final
    if pilot != final:
        t["loss_note"] = (f"pilots ran at batch {pilot}, train_sae at {final}: the law's tokens "
                          f"are tokens at batch {pilot}, so this loss is not train_sae's "
                          "(same tokens, a different number of steps)")


def flag_transfer(result: dict[str, Any], store_d_in: int, budget_d_in: int) -> None:
    """Mark the extrapolation to the budget's SAE when the pilots read another model's
    activations (tiny's d_in 64, smollm2's 576, against the 1B's 2048): a loss or lr law
    fitted on one model's activations says nothing about another's, so the number is
    kept for the record but labelled meaningless wherever it is shown."""
    t = result.get("extrapolation", {}).get("budget")
    if t is None:
        return
    t["meaningful"] = store_d_in == budget_d_in
    if store_d_in != budget_d_in:
        t["loss_note"] = (f"MEANINGLESS here: the pilots ran on d_in={store_d_in} activations "
                          f"and the budget's SAE reads d_in={budget_d_in} (another model); a "
                          "law does not transfer across models")


def lr_markdown(result: dict[str, Any]) -> str:
    """budget.md's line on the learning rate train_sae will take, fallback or not."""
    rec = result["recommended"]
    lr = "none" if rec["lr"] is None else f"{rec['lr']:.3g}"
    return (f"\n## Learning rate (reports/scaling/fit.json, status {result['status']})\n\n"
            f"- d_sae {rec['d_sae']}: **{lr}** ({rec['lr_source']}): {rec['source']}\n")


def _run(params: Params) -> None:
    budget = write_budget(params)
    # A missing, unfinished or damaged store fails here, once, before any pilot trains.
    store = ActivationStore(paths.ACTIVATIONS_DIR)
    store.check()
    # The pilots' warm-ups are fractions of train_sae's steps (pilot_cfg), which need its
    # token count: the budget's when sae.n_tokens is null.
    params = dataclasses.replace(params, sae=dataclasses.replace(
        params.sae, n_tokens=params.sae.n_tokens or int(budget["tokens"])))
    rows = run_grid(params)
    result = fit_pilots(rows, params.scaling, d_sae=params.sae.d_sae,
                        n_tokens=int(budget["tokens"]), real_d_sae=params.budget.d_sae,
                        train_tokens=params.sae.n_tokens, seed=params.run.seed)
    result["recommended"]["caveats"] = caveats(params)
    flag_batch(result, params)
    flag_transfer(result, store.d, params.budget.d_in)
    written = write_outputs(result, rows)
    atomic.write_text(paths.BUDGET_MD, budget_markdown(budget) + lr_markdown(result))
    log_metrics(_summary_metrics(result))
    for p in (*written.values(), paths.BUDGET_JSON, paths.BUDGET_MD):
        log_artifact(p, "scaling")
    rec = result["recommended"]
    for problem in result["problems"]:
        log.warning("scaling fit %s", problem)
    h = _last_check(result.get("holdout", {}))
    if h:
        log.info("held-out d_sae=%d: predicted loss %.4g, measured %.4g (%+.1f%%), interval %s",
                 h["d_sae"], h["predicted_loss"], h["trained_loss"], h["rel_error_pct"],
                 h.get("measurement_interval") or h["predicted_loss_ci"])
    log.info("recommended lr %s for d_sae=%d (%s: %s)", rec["lr"], rec["d_sae"],
             rec["lr_source"], rec["source"])


def main() -> None:
    run_stage("fit_scaling_laws", _run)
