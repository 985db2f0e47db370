"""Does the scaling law predict? Fit on the smaller widths, train 2x and 4x beyond the
widest fitted one for real, and compare (issue 17).

The fitted widths are the profile's scaling.d_sae_grid less its largest (what
fit_scaling_laws fits when it holds that one out), with the profile's lr sweep, seeds and
token counts. The widths --beyond times the widest fitted one are trained by the same
pilot trainer (`saelab.scaling.laws.run_pilot`: same lrs, seeds, tokens, held-out slice)
and their best loss and lr* (parabola) measured as the stage measures every width. For
each: the law's prediction and interval (bootstrap over pilots, leave-one-size-out and
the seed-noise band, widened by the measurement's own seed noise), the measured value,
the error in %, whether the measurement is inside; lr* predicted and measured, their
ratio.

Then the lr train_sae would take (fit_scaling_laws on the profile's grid, from the same
pilots) is trained with train_sae's recipe (sae.* of the profile: width, batch, tokens,
warm-ups) on the store: its dead fraction and whether the training loss spikes.

Targets (issue 17): loss within 10% (tiny) / 5% (smollm2-135m) at 2x and 4x with the
measurement inside the interval; lr* within a factor 1.3; <= 5% dead, no spike.

    nice .venv/bin/python bench/scaling.py --params params.yaml --store data/activations
    # the real model, in a workspace after `dvc exp run -S profile=smollm2-135m extract_mlp8`
    # (a profile other than conf/'s is an experiment's override: README, Sweeps):
    nice .venv/bin/python bench/scaling.py --params params.yaml --store data/activations
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from saelab.activations.store import ActivationStore
from saelab.core.config import load_params
from saelab.scaling.laws import (fit_laws, fit_pilots, heldout_split, measurement_interval,
                                 pilot_batch, run_grid, sizes_of, uncertainty)
from saelab.sae.train import train

# A spike: a logging window whose mean training loss is this much above both neighbours
# (a ramp of the L0 penalty raises the loss smoothly; a spike jumps and falls back).
SPIKE_RATIO = 1.10


def spike_ratio(history: list[dict], after_step: int) -> float:
    """Largest loss of a window over the larger of its two neighbours, after `after_step`."""
    loss = [h["loss"] for h in history if h["step"] > after_step]
    ratios = [loss[i] / max(loss[i - 1], loss[i + 1]) for i in range(1, len(loss) - 1)]
    return max(ratios, default=math.nan)


def train_at(params, store_dir: str, lr: float) -> dict:
    """train_sae's recipe (the profile's sae section) at `lr`, evaluated on the store's
    held-out tail like the pilots."""
    cfg = params.sae
    store = ActivationStore(store_dir)
    n_train = heldout_split(store.n_tokens, cfg.eval_tokens, cfg.batch_size)
    heldout = store.gather(np.arange(n_train, store.n_tokens))
    n_tokens = cfg.n_tokens or 4 * n_train
    t0 = time.perf_counter()
    res = train(cfg, store.iter_batches(cfg.batch_size, seed=params.run.seed, n_tokens=n_train),
                d_in=store.d, n_tokens=n_tokens, lr=lr, device="cpu", seed=params.run.seed,
                eval_batches=iter(heldout.split(cfg.batch_size)),
                eval_n_batches=math.ceil(len(heldout) / cfg.batch_size))
    m = res.metrics
    ratio = spike_ratio(res.history, max(cfg.lr_warmup_steps, 0))
    return {"lr": lr, "d_sae": cfg.d_sae, "n_tokens": n_tokens, "batch_size": cfg.batch_size,
            "dead_fraction": m["dead_fraction"], "fvu": m["fvu"], "l0": m["l0"],
            "spike_ratio": ratio, "spike": bool(ratio > SPIKE_RATIO),
            "seconds": time.perf_counter() - t0}


def refine(params, held_cfg, held_rows: list[dict], factor: float, store: str,
           rows_file: str | None) -> list[dict]:
    """Pilots at lr* x factor^k (k = -2..2) of each held-out width, at the sweep's tokens
    and seeds: lr* measured on a grid 3x apart is uncertain by about a factor 1.2, the
    size of the target (1.3), so the measurement is refined where it is compared.
    Saved beside the other pilots (`held_out_refine`) when --rows is given."""
    saved = json.loads(Path(rows_file).read_text()) if rows_file else {}
    if "held_out_refine" in saved:
        return saved["held_out_refine"]
    extra: list[dict] = []
    for e in sizes_of(held_rows, held_cfg):
        if "lr_star" not in e:
            continue
        lrs = tuple(e["lr_star"] * factor ** k for k in range(-2, 3))
        cfg = dataclasses.replace(held_cfg, d_sae_grid=(e["d_sae"],), lr_grid=lrs,
                                  tokens_grid=(), max_dead_fraction=None)
        extra += run_grid(dataclasses.replace(params, scaling=cfg), store)
    if rows_file:
        saved["held_out_refine"] = [{k: v for k, v in r.items() if k != "history"}
                                    for r in extra]
        Path(rows_file).write_text(json.dumps(saved))
    return extra


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--store", default="data/activations")
    ap.add_argument("--beyond", default="2,4", help="held-out widths, x the widest fitted")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--no-train", action="store_true", help="skip the train_sae-recipe run")
    ap.add_argument("--json", help="write every figure here")
    ap.add_argument("--refine", type=float, default=0.0, metavar="F",
                    help="then train each held-out width at lr* x F^k, k = -2..2, and measure its "
                    "lr* by a least-squares parabola through the 5 best points, so that it is "
                    "not limited by the grid's 3x spacing (0: off)")
    ap.add_argument("--rows", help="save the pilots here (JSON); if the file exists, load them "
                    "instead of training (refit without rerunning)")
    args = ap.parse_args()
    os.environ.setdefault("SAELAB_TRACKING", "off")  # a bench, not a stage: no MLflow runs
    torch.set_num_threads(args.threads)

    params = load_params(args.params)
    params = dataclasses.replace(params, run=dataclasses.replace(
        params.run, device="cpu", num_threads=args.threads * args.workers))
    s = dataclasses.replace(params.scaling, workers=args.workers)
    grid = sorted(set(s.d_sae_grid))
    fit_sizes = grid[:-1]
    beyond = [int(float(b) * fit_sizes[-1]) for b in args.beyond.split(",")]
    print(f"profile {params.profile}: fit on d_sae {fit_sizes} (lrs {list(s.lr_grid)}, "
          f"{s.seeds} seeds, sweep {s.n_tokens} tokens, token counts {sorted(s.tokens_grid)}, "
          f"batch {pilot_batch(params)}, dead-latent guard {s.max_dead_fraction}), "
          f"held out {beyond}", flush=True)

    t0 = time.perf_counter()
    fit_cfg = dataclasses.replace(s, d_sae_grid=tuple(fit_sizes))
    # The same token counts: the dead-latent guard measures lr at the largest.
    held_cfg = dataclasses.replace(s, d_sae_grid=tuple(beyond))
    if args.rows and Path(args.rows).exists():
        saved = json.loads(Path(args.rows).read_text())
        rows, held_rows = saved["fit"], saved["held_out"]
    else:
        rows = run_grid(dataclasses.replace(params, scaling=fit_cfg), args.store)
        held_rows = run_grid(dataclasses.replace(params, scaling=held_cfg), args.store)
        if args.rows:
            Path(args.rows).write_text(json.dumps({
                part: [{k: v for k, v in r.items() if k != "history"} for r in got]
                for part, got in (("fit", rows), ("held_out", held_rows))}))
    refined = held_rows
    if args.refine:
        refined = held_rows + refine(params, held_cfg, held_rows, args.refine, args.store,
                                     args.rows)
    pilot_s = time.perf_counter() - t0

    laws = fit_laws(rows, fit_cfg, params.run.seed)
    pred = uncertainty(rows, fit_cfg, laws, [(str(w), w, s.n_tokens) for w in beyond],
                       params.run.seed)
    measured = {e["d_sae"]: e for e in sizes_of(held_rows, held_cfg)}
    # Near its bottom the objective is flat to within seed noise: the refined lr* is the
    # vertex of a least-squares parabola through the best point and 2 on each side.
    measured_lr = {e["d_sae"]: e for e in sizes_of(
        refined, dataclasses.replace(held_cfg, parabola_neighbours=2 if args.refine else
                                     held_cfg.parabola_neighbours))}
    out: dict = {"profile": params.profile, "fit_sizes": fit_sizes, "pilot_seconds": pilot_s,
                 "loss_law": laws.loss.to_dict(), "lr_law": laws.lr.to_dict(), "widths": []}
    print(f"\nloss law: {laws.loss.to_dict()['law']}, "
          + ", ".join(f"{k} {v:.4g}" for k, v in laws.loss.coef.items())
          + f"; lr law: lr* = {laws.lr.coef['a']:.3g} N^{laws.lr.coef['b']:+.3f} "
          f"(R^2 {laws.lr.r2 if laws.lr.r2 is None else round(laws.lr.r2, 3)})\n")
    print("| d_sae | x widest fitted | predicted loss [interval] | measured (s.e.) | error "
          "| inside | predicted lr* | measured lr* | ratio |")
    print("|---|---|---|---|---|---|---|---|---|")
    for w in beyond:
        p, m = pred[str(w)], measured[w]
        se = (m.get("parabola") or {}).get("loss_se")
        iv = measurement_interval(p["loss"], p["loss_interval"]["ci"], se)
        err = 100 * (p["loss"] - m["best_loss"]) / m["best_loss"]
        inside = None if iv is None else bool(iv[0] <= m["best_loss"] <= iv[1])
        lr_m = measured_lr[w].get("lr_star", math.nan)
        lr_grid = m.get("lr_star", math.nan)
        lr_se = (measured_lr[w].get("parabola") or {}).get("log10_lr_star_se")
        row = {"d_sae": w, "beyond": w / fit_sizes[-1], "predicted_loss": p["loss"],
               "interval": iv, "interval_parts": p["loss_interval"],
               "measured_loss": m["best_loss"],
               "measured_se": se, "error_pct": err, "inside": inside,
               "predicted_lr_star": p["lr"], "predicted_lr_interval": p["lr_interval"]["ci"],
               "measured_lr_star": lr_m, "lr_ratio": p["lr"] / lr_m,
               "measured_lr_star_log10_se": lr_se, "measured_lr_star_grid_only": lr_grid,
               "lr_ratio_grid_only": p["lr"] / lr_grid,
               "measured_lrs": measured_lr[w]["lrs"],
               "measured_lr_curve": dict(zip(map(str, m["lrs"]), m["losses"])),
               "measured_lr_guarded": m.get("lr_used"), "measured_dead_guard": m.get("dead_guard")}
        out["widths"].append(row)
        ivs = "none" if iv is None else f"[{iv[0]:.4f}, {iv[1]:.4f}]"
        print(f"| {w} | {w / fit_sizes[-1]:g} | {p['loss']:.4f} {ivs} | {m['best_loss']:.4f} "
              f"({se if se is None else f'{se:.4f}'}) | {err:+.1f}% | {inside} | {p['lr']:.4g} "
              f"| {lr_m:.4g} | {p['lr'] / lr_m:.2f} |", flush=True)
    if args.refine:
        print("measured lr* from the profile's grid alone: " + ", ".join(
            f"d_sae={r['d_sae']} {r['measured_lr_star_grid_only']:.4g} (ratio "
            f"{r['lr_ratio_grid_only']:.2f})" for r in out["widths"]))

    for e in laws.sizes + [measured[w] for w in beyond]:
        g = e.get("dead_guard")
        if g:
            print(f"dead-latent guard d_sae={e['d_sae']}: {g['state']}, lr* {g['lr_star']:.4g}"
                  f" -> {g['lr']:.4g}; dead at {g['tokens']} tokens by lr {g['dead_at_lr']}")
    out["dead_guard"] = {e["d_sae"]: e.get("dead_guard") for e in laws.sizes}

    # What the stage would recommend on the profile's own grid, from these same pilots.
    stage_rows = [r for r in rows + held_rows if r["d_sae"] in grid]
    stage = fit_pilots(stage_rows, s, d_sae=params.sae.d_sae,
                       n_tokens=params.sae.n_tokens or s.n_tokens, seed=params.run.seed)
    rec = stage["recommended"]
    out["stage"] = {"status": stage["status"], "problems": stage["problems"], "lr": rec["lr"],
                    "lr_source": rec["lr_source"], "lr_check": stage.get("lr_check")}
    print(f"\nfit_scaling_laws on {grid}: status {stage['status']}, lr {rec['lr']:.4g} "
          f"({rec['lr_source']})", flush=True)
    if not args.no_train and rec["lr"] is not None:
        t = train_at(params, args.store, rec["lr"])
        out["train_sae"] = t
        print(f"train_sae recipe (d_sae {t['d_sae']}, {t['n_tokens']} tokens, batch "
              f"{t['batch_size']}) at lr {t['lr']:.4g}: dead {t['dead_fraction']:.1%}, "
              f"held-out FVU {t['fvu']:.4f}, L0 {t['l0']:.1f}, max window/neighbours "
              f"{t['spike_ratio']:.3f} (spike: {t['spike']}), {t['seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2, default=float) + "\n")


if __name__ == "__main__":
    sys.exit(main())
