"""The `fit_scaling_laws` stage: a pilot grid of small SAEs, scaling-law fits, the budget.

Pilots: every d_sae in scaling.d_sae_grid x every lr in scaling.lr_grid x scaling.seeds
seeds, trained by the shared trainer with train_sae's recipe (short warm-ups,
scaling.n_tokens tokens). Pilots with the same seed see the same batches in the same
order, so lr is the only thing that differs along a curve; the spread over seeds is the
noise the fits' confidence intervals are built from.

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
parabola in log lr around the best grid lr; the loss law on each size's best trained
loss (its mean at the best grid lr); lr*(d_sae) as a power law. Method `two_step`
(the seed's): the loss law through the two smallest sizes at one lr, lr* of the same two
sizes, the lr law through them; any further sizes check the prediction.
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
from tqdm import tqdm

from ..core import atomic, paths, plots
from .budget import write_budget
from ..core.config import Params, SAECfg, ScalingCfg
from ..core.errors import SaelabError
from .powerlaw import Fit, FitError, best_lr_parabola, fit_loss_vs_size, fit_lr_vs_size
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
PILOT_COLUMNS = ["d_sae", "lr", "seed", "status", "loss", "mse", "fvu", "l0", "dead_fraction",
                 "tokens", "error"]


# --- one pilot -------------------------------------------------------------------------

# train_sae settings that pilots do not use (each pilot has its own lr and token count and
# trains from the store, without checkpoints): reset in pilot_cfg so that no pilot can
# depend on them, and left out of fit_scaling_laws' params in dvc.yaml, so that a sweep
# over them does not rerun the pilot grid.
TRAIN_ONLY = ("lr", "n_tokens", "max_epochs", "stream", "shuffle_buffer", "stream_lanes",
              "checkpoint_every")
# sae keys pilot_cfg replaces with the scaling section's (sae.batch_size is still read: the
# caveats compare it with the pilots').
PILOT_REPLACED = ("lr_warmup_steps", "l0_warmup_steps")


def pilot_k(k: int, d_sae: int, d_pilot: int) -> int:
    """TopK/BatchTopK k at pilot width: the final SAE's fraction of active latents,
    k / d_sae, kept at every width (a fixed k can exceed a small pilot's width)."""
    return max(1, min(d_pilot, round(k * d_pilot / d_sae)))


def pilot_cfg(params: Params, d_sae: int) -> SAECfg:
    """train_sae's recipe at pilot size, with warm-ups sized for pilot token counts and
    k scaled with the width."""
    s = params.scaling
    unused = {k: getattr(SAECfg(), k) for k in TRAIN_ONLY}
    return dataclasses.replace(params.sae, d_sae=d_sae, lr_warmup_steps=s.lr_warmup_steps,
                               l0_warmup_steps=s.l0_warmup_steps, batch_size=s.batch_size,
                               k=pilot_k(params.sae.k, params.sae.d_sae, d_sae), **unused)


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
            f"leaves {n_train} for pilots, fewer than one batch (scaling.batch_size = "
            f"{batch_size}) or no held-out data; raise extract.n_tokens or lower those")
    return n_train


def run_pilot(params: Params, d_sae: int, lr: float, seed: int, store_dir: str,
              threads: int | None = None) -> dict[str, Any]:
    """Train one pilot and evaluate it on the held-out slice. A pilot the trainer stops
    (NaN/Inf) is a result, not a crash: status `diverged` and a NaN loss."""
    if threads:
        torch.set_num_threads(threads)
    store = ActivationStore(store_dir)
    cfg = pilot_cfg(params, d_sae)
    s = params.scaling
    n_train = heldout_split(store.n_tokens, params.sae.eval_tokens, s.batch_size)
    heldout = store.gather(np.arange(n_train, store.n_tokens))
    row: dict[str, Any] = {"d_sae": d_sae, "lr": lr, "seed": seed, "status": "ok",
                           "error": "", "history": []}
    t0 = time.perf_counter()
    try:
        result = train(cfg, store.iter_batches(s.batch_size, seed=seed, n_tokens=n_train),
                       d_in=store.d, n_tokens=s.n_tokens, lr=lr,
                       device=resolve_device(params), seed=seed,
                       eval_batches=iter(heldout.split(s.batch_size)),
                       eval_n_batches=math.ceil(len(heldout) / s.batch_size))
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
    name = f"pilot d_sae={row['d_sae']} lr={row['lr']:.2e} seed={row['seed']}"
    spec = {"d_sae": row["d_sae"], "lr": row["lr"], "seed": row["seed"],
            "n_tokens": params.scaling.n_tokens, "batch_size": params.scaling.batch_size}
    with nested_run(name, spec, tags={"saelab.pilot": "true", "status": row["status"]}):
        for h in row.get("history", []):
            # Under train_sae's metric names (train.lr is the schedule; the param lr the
            # peak): no name is both, and pilot and final-SAE curves share chart axes.
            log_metrics({"train": {k: v for k, v in h.items() if k != "step"}},
                        step=int(h["step"]))
        # Training curves keep the trainer's names; the held-out result is apart from them.
        log_metrics({f"heldout_{k}": row[k] for k in ("loss", "mse", "fvu", "l0") if k in row})
        log_metrics({k: row[k] for k in ("dead_fraction", "tokens_per_s", "seconds") if k in row})


def run_grid(params: Params, store_dir: str | Path = paths.ACTIVATIONS_DIR,
             pilot_fn: PilotFn = run_pilot) -> list[dict[str, Any]]:
    """Every (d_sae, lr, seed) pilot, in `scaling.workers` processes; each logged as a nested
    run (from this process, so all of them land under the stage's run)."""
    s = params.scaling
    seeds = [params.run.seed + i for i in range(s.seeds)]
    grid = [(d, lr, seed) for d in sorted(set(s.d_sae_grid)) for lr in sorted(set(s.lr_grid))
            for seed in seeds]
    workers = min(s.workers, len(grid))
    rows: list[dict[str, Any]] = []
    bar = tqdm(total=len(grid), desc="pilots", disable=None)
    if workers <= 1:
        for d, lr, seed in grid:
            rows.append(pilot_fn(params, d, lr, seed, str(store_dir)))
            _log_pilot(rows[-1], params)
            bar.update()
    else:
        # Split the cores between workers; spawn, because forking a process that already
        # ran torch can deadlock in its thread pools.
        threads = max(1, (params.run.num_threads or os.cpu_count() or 1) // workers)
        ctx = multiprocessing.get_context("spawn")
        with cf.ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            futures = [pool.submit(pilot_fn, params, d, lr, seed, str(store_dir), threads)
                       for d, lr, seed in grid]
            try:
                for fut in cf.as_completed(futures):
                    rows.append(fut.result())
                    _log_pilot(rows[-1], params)
                    bar.update()
            except BaseException:
                # Do not sit through the rest of the grid after a failure or Ctrl-C.
                pool.shutdown(wait=False, cancel_futures=True)
                raise
    bar.close()
    return sorted(rows, key=lambda r: (r["d_sae"], r["lr"], r["seed"]))


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


def _per_size(table: Means, neighbours: int) -> list[dict[str, Any]]:
    """lr curve of each size (means over seeds), its parabola lr* (or why there is none)
    and its best loss."""
    out = []
    for d in sorted({d for d, _ in table}):
        lrs = sorted(lr for dd, lr in table if dd == d)
        losses = [table[(d, lr)][0] for lr in lrs]
        ses = [table[(d, lr)][1] for lr in lrs]
        finite = [(lo, lr) for lo, lr in zip(losses, lrs) if math.isfinite(lo)]
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


def _fit_grid(sizes: list[dict[str, Any]], cfg: ScalingCfg, seed: int) -> tuple[Fit, Fit]:
    _require_parabolas(sizes)
    loss_sigma, lr_sigma = _sigmas(sizes)
    d = [e["d_sae"] for e in sizes]
    loss_fit = fit_loss_vs_size(d, [e["best_loss"] for e in sizes], sigma=loss_sigma,
                                bootstrap=cfg.bootstrap, seed=seed)
    lr_fit = fit_lr_vs_size(d, [e["lr_star"] for e in sizes], sigma_log=lr_sigma,
                            bootstrap=cfg.bootstrap, seed=seed)
    return loss_fit, lr_fit


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
           "trained_within_ci": None if ci is None else bool(ci[0] <= trained_loss <= ci[1])}
    if lr_fit is not None and trained_lr_star is not None:
        out["predicted_lr_star"] = lr_fit.predict(d)
        out["trained_lr_star"] = trained_lr_star
        out["lr_star_ratio"] = out["predicted_lr_star"] / trained_lr_star
    return out


def _holdout_grid(sizes: list[dict[str, Any]], cfg: ScalingCfg, seed: int) -> dict[str, Any]:
    if not cfg.holdout_largest:
        return {"status": "off"}
    if len(sizes) < 3:
        return {"status": "skipped", "reason": f"holding out one of {len(sizes)} sizes leaves "
                "fewer than 2 to fit; add sizes to scaling.d_sae_grid"}
    try:
        loss_fit, lr_fit = _fit_grid(sizes[:-1], cfg, seed)
    except FitError as e:
        return {"status": "degenerate", "reason": str(e)}
    last = sizes[-1]
    return {"status": "ok", "fit_sizes": [e["d_sae"] for e in sizes[:-1]],
            "loss_fit": loss_fit.to_dict(), "lr_fit": lr_fit.to_dict(),
            **_check(loss_fit, lr_fit, last["d_sae"], last["best_loss"], last["lr_star"])}


def _holdout_two_step(means: Means, sizes: list[dict[str, Any]], loss_fit: Fit, lr_fit: Fit,
                      lr0: float) -> dict[str, Any]:
    rest = sizes[2:]
    if not rest:
        return {"status": "skipped", "reason": "no size beyond the two fitted ones"}
    checks = [_check(loss_fit, lr_fit, e["d_sae"], means[(e["d_sae"], lr0)][0],
                     e.get("lr_star")) for e in rest]
    return {"status": "ok", "lr": lr0, "checks": checks}


def _curve(fit: Fit, lo: float, hi: float, n: int = 60) -> list[dict[str, float]]:
    out = []
    for d in np.geomspace(lo, hi, n):
        ci = fit.predict_ci(d)
        out.append({"d_sae": float(d), "value": fit.predict(d),
                    "lo": ci[0] if ci else math.nan, "hi": ci[1] if ci else math.nan})
    return out


def _fallback_lr(sizes: list[dict[str, Any]]) -> tuple[float, int] | None:
    for e in reversed(sizes):
        if math.isfinite(e["best_grid_lr"]):
            return e["best_grid_lr"], e["d_sae"]
    return None


def fit_pilots(rows: Sequence[dict[str, Any]], cfg: ScalingCfg, *, d_sae: int, n_tokens: int,
               real_d_sae: int | None = None, seed: int = 0) -> dict[str, Any]:
    """Everything fit.json says, from the pilot table alone (no training, no I/O).

    `d_sae` is the size to recommend an lr for (train_sae's), `real_d_sae` another size to
    extrapolate to (the budget's), `n_tokens` the token budget passed through. A fit the
    data cannot support gives `status: degenerate` with the reason; the recommended lr
    then falls back to the best pilot's, and `recommended.source` says so.
    """
    means = mean_losses(rows)
    sizes = _per_size(means, cfg.parabola_neighbours)
    result: dict[str, Any] = {
        "method": cfg.method,
        "loss_definition": "held-out training objective (squared error per token in the "
                           "normalised space + sparsity penalty at the final coefficient)",
        "pilot_tokens": cfg.n_tokens,
        "seeds": cfg.seeds,
        "per_size": sizes,
    }
    targets = {"train_sae": d_sae, **({"budget": real_d_sae} if real_d_sae else {})}
    try:
        if cfg.method == "grid":
            loss_fit, lr_fit = _fit_grid(sizes, cfg, seed)
            holdout = _holdout_grid(sizes, cfg, seed)
        else:
            loss_fit, lr_fit, lr0 = _fit_two_step(means, sizes, cfg, seed)
            result["two_step_lr"] = lr0
            holdout = _holdout_two_step(means, sizes, loss_fit, lr_fit, lr0)
    except FitError as e:
        fb = _fallback_lr(sizes)
        result.update(status="degenerate", reason=str(e), holdout={"status": "skipped"})
        result["recommended"] = {
            "lr": fb[0] if fb else None, "d_sae": d_sae, "n_tokens": n_tokens,
            "lr_source": "fallback_best_pilot" if fb else "none",
            "source": (f"FALLBACK, not a fit: the best pilot lr at d_sae={fb[1]} (the largest "
                       f"pilot size with a finite loss), not extrapolated to d_sae={d_sae}, "
                       f"because the fit is degenerate: {e}" if fb else
                       f"no lr: every pilot failed and the fit is degenerate: {e}")
                      + "; n_tokens: compute budget (reports/budget.json)",
        }
        return result

    result.update(status="ok", reason="", loss_fit=loss_fit.to_dict(), lr_fit=lr_fit.to_dict(),
                  holdout=holdout)
    d_fit = loss_fit.x
    result["extrapolation"] = {
        name: {"d_sae": n, "beyond_largest_pilot": n / max(d_fit),
               "loss": loss_fit.predict(n), "loss_ci": loss_fit.predict_ci(n),
               "loss_note": f"at the pilots' {cfg.n_tokens} tokens, not the token budget",
               "lr": lr_fit.predict(n), "lr_ci": lr_fit.predict_ci(n)}
        for name, n in targets.items()}
    result["recommended"] = {
        "lr": lr_fit.predict(d_sae), "d_sae": d_sae, "n_tokens": n_tokens, "lr_source": "fit",
        "source": f"lr: power law lr*(d_sae) from the pilot grid (method {cfg.method}) "
                  f"evaluated at d_sae={d_sae}; n_tokens: compute budget (reports/budget.json)",
    }
    top = max(max(d_fit), *targets.values())
    lo = min(d_fit) / 1.5
    result["curves"] = {"loss": _curve(loss_fit, lo, top * 1.5),
                        "lr": _curve(lr_fit, lo, top * 1.5)}
    return result


# --- outputs ---------------------------------------------------------------------------

def _plot_fit(ax, curve: list[dict[str, float]], law: str) -> None:
    """A fitted law and, where the bootstrap gave one, its 95% band."""
    x = [p["d_sae"] for p in curve]
    ax.plot(x, [p["value"] for p in curve], color="C1", label="fit " + law)
    if all(math.isfinite(p["lo"]) for p in curve):
        ax.fill_between(x, [p["lo"] for p in curve], [p["hi"] for p in curve],
                        color="C1", alpha=0.2, label="95% bootstrap band")


def _plot_loss(result: dict[str, Any], rows, path: Path) -> None:
    fig, ax = plots.new_figure("Held-out loss against SAE size", "d_sae", "loss",
                               logx=True, logy=True)
    ok = [r for r in rows if math.isfinite(r["loss"])]
    ax.scatter([r["d_sae"] for r in ok], [r["loss"] for r in ok], s=12, color="0.7",
               label="pilots (all lrs)")
    best = [e for e in result["per_size"] if math.isfinite(e["best_loss"])]
    ax.scatter([e["d_sae"] for e in best], [e["best_loss"] for e in best], color="C0",
               zorder=3, label="best lr per size")
    if result["status"] == "ok":
        _plot_fit(ax, result["curves"]["loss"], result["loss_fit"]["law"])
        for i, (name, t) in enumerate(result["extrapolation"].items()):
            color = f"C{4 + i}"
            ax.scatter([t["d_sae"]], [t["loss"]], marker="*", s=100, color=color, zorder=4,
                       label=f"extrapolated ({name}, d_sae={t['d_sae']})")
            if t["loss_ci"] is not None:
                # A percentile interval need not contain the point estimate: draw it as is.
                ax.vlines(t["d_sae"], *t["loss_ci"], color=color)
        h = result["holdout"]
        if h.get("status") == "ok" and "predicted_loss" in h:
            ax.scatter([h["d_sae"]], [h["predicted_loss"]], marker="x", color="C3", zorder=4,
                       label=f"held-out size predicted (gap {h['rel_gap']:+.1%})")
    else:
        ax.text(0.02, 0.02, "fit degenerate: see fit.json", transform=ax.transAxes)
    ax.legend(fontsize=7)
    plots.save(fig, path)


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
    if result["status"] == "ok":
        _plot_fit(ax, result["curves"]["lr"], result["lr_fit"]["law"])
        for name, t in result["extrapolation"].items():
            ax.scatter([t["d_sae"]], [t["lr"]], marker="*", s=100, zorder=4,
                       label=f"extrapolated ({name}): {t['lr']:.2e}")
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
    out: dict[str, Any] = {"degenerate": int(result["status"] != "ok")}
    rec = result["recommended"]
    if rec["lr"] is not None:
        out["recommended_lr"] = rec["lr"]
    if result["status"] == "ok":
        out.update({f"loss_fit_{k}": v for k, v in result["loss_fit"]["coef"].items()})
        out.update({f"lr_fit_{k}": v for k, v in result["lr_fit"]["coef"].items()})
        for key in ("loss_fit", "lr_fit"):
            if result[key]["r2"] is not None:
                out[f"{key}_r2"] = result[key]["r2"]
        for name, t in result["extrapolation"].items():
            out[f"predicted_loss_{name}"] = t["loss"]
        h = result["holdout"]
        checks = h.get("checks") or ([h] if "rel_gap" in h else [])
        if checks:  # the largest size the fit did not see
            out["holdout_rel_gap"] = checks[-1]["rel_gap"]
    return out


def caveats(params: Params) -> list[str]:
    """What the recommended lr does not account for, in words, for fit.json."""
    s, sae = params.scaling, params.sae
    out = [f"lr* was measured on pilots of {s.n_tokens} tokens; the best lr of a longer run "
           "is often lower (the fit has no token axis)"]
    if s.batch_size != sae.batch_size:
        out.append(f"pilots use batch {s.batch_size} but train_sae uses sae.batch_size = "
                   f"{sae.batch_size}; lr* depends on the batch size")
    return out


def _run(params: Params) -> None:
    budget = write_budget(params)
    # A missing, unfinished or damaged store fails here, once, before any pilot trains.
    ActivationStore(paths.ACTIVATIONS_DIR).check()
    rows = run_grid(params)
    result = fit_pilots(rows, params.scaling, d_sae=params.sae.d_sae,
                        n_tokens=int(budget["tokens"]), real_d_sae=params.budget.d_sae,
                        seed=params.run.seed)
    result["recommended"]["caveats"] = caveats(params)
    written = write_outputs(result, rows)
    log_metrics(_summary_metrics(result))
    for p in (*written.values(), paths.BUDGET_JSON, paths.BUDGET_MD):
        log_artifact(p, "scaling")
    rec = result["recommended"]
    if result["status"] != "ok":
        log.warning("scaling fit degenerate: %s", result["reason"])
    log.info("recommended lr %s for d_sae=%d (%s)", rec["lr"], rec["d_sae"], rec["source"])


def main() -> None:
    run_stage("fit_scaling_laws", _run)
