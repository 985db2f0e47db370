"""`saelab pareto`: SAE quality against L0, with 95% intervals over seeds.

Trains, on the existing activation store (no extraction), one SAE per (architecture,
target L0, seed): JumpReLU with `sae.sparsity: target_l0` (the L0 controller), TopK and
BatchTopK with k = the target; everything else is params.yaml's `sae` recipe, with the
learning rate train_sae would use (sae.lr or fit_scaling_laws's recommendation). Each is
scored on train_sae's held-out set: FVU and L0 on held-out activations and, where the
model and the held-out documents are there, delta LM loss with the SAE spliced in.

Outputs in --out (default reports/pareto): points.csv (one row per SAE), summary.csv
(mean and 95% t-interval over seeds per architecture and target), pareto.png (FVU vs L0
and delta LM loss vs L0, log L0, intervals on both axes), density/*.png (each SAE's
feature density). One MLflow run ("pareto"), a nested run per SAE.

Why a command and not a DVC `foreach`/`matrix` stage: a matrix stage is part of the
pipeline, so every `dvc repro` (and the test suite's) would train targets x seeds x
architectures SAEs and track as many outputs; the sweep is an on-demand study of one
store, like `dvc exp run` sweeps. Points are cached in points.json by the fingerprint of
their configuration and data: a rerun (or a run after Ctrl-C) trains only what is
missing, and reruns write the same bytes (timings go to MLflow only).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from ..core import atomic
from ..core.config import Params
from ..core.errors import SaelabError
from . import checkpoint

log = logging.getLogger(__name__)

ARCHS = ("jumprelu", "topk", "batchtopk")
POINT_COLUMNS = ("architecture", "target_l0", "seed", "l0", "fvu", "delta_lm_loss",
                 "dead_fraction", "frac_never_fired", "frac_active_gt_1pct",
                 "frac_active_gt_10pct", "l0_rel_error")


def point_cfg(params: Params, arch: str, target: float):
    """params.sae with the architecture and its sparsity set to reach L0 `target`."""
    if arch == "jumprelu":
        return dataclasses.replace(params.sae, architecture=arch, sparsity="target_l0",
                                   target_l0=float(target))
    if not float(target).is_integer() or target < 1:
        raise SaelabError(f"target L0 {target} is not a whole number, which {arch} needs "
                          "as its k; use whole targets")
    return dataclasses.replace(params.sae, architecture=arch, k=int(target))


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and the 95% Student-t interval of the mean (NaN half-width below 2 values)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return math.nan, math.nan, math.nan
    m = float(v.mean())
    if len(v) < 2:
        return m, math.nan, math.nan
    h = float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))
    return m, m - h, m + h


def summarise(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(p["architecture"], p["target_l0"]) for p in points},
                  key=lambda k: (ARCHS.index(k[0]), k[1]))
    for arch, t in keys:
        ps = [p for p in points if (p["architecture"], p["target_l0"]) == (arch, t)]
        row: dict[str, Any] = {"architecture": arch, "target_l0": t, "seeds": len(ps)}
        for k in ("l0", "fvu", "delta_lm_loss"):
            row[k], row[f"{k}_lo"], row[f"{k}_hi"] = interval([p.get(k, math.nan) for p in ps])
        rows.append(row)
    return rows


def plot(summary: list[dict[str, Any]], path: Path, title: str) -> Path:
    from ..core.plots import save
    import matplotlib.pyplot as plt

    have_lm = any(math.isfinite(r["delta_lm_loss"]) for r in summary)
    ys = [("fvu", "FVU (held-out)")] + ([("delta_lm_loss", "delta LM loss (nats)")]
                                        if have_lm else [])
    fig, axes = plt.subplots(1, len(ys), figsize=(5.5 * len(ys), 4.2), squeeze=False)
    for ax, (key, label) in zip(axes[0], ys):
        for arch in ARCHS:
            rs = [r for r in summary if r["architecture"] == arch]
            if not rs:
                continue
            x = np.array([r["l0"] for r in rs])
            y = np.array([r[key] for r in rs])
            xerr = np.nan_to_num(np.array([[r["l0"] - r["l0_lo"] for r in rs],
                                           [r["l0_hi"] - r["l0"] for r in rs]]))
            yerr = np.nan_to_num(np.array([[r[key] - r[f"{key}_lo"] for r in rs],
                                           [r[f"{key}_hi"] - r[key] for r in rs]]))
            ax.errorbar(x, y, xerr=xerr, yerr=yerr, marker="o", ms=4, capsize=3, label=arch)
        ax.set_xscale("log")
        ax.set_xlabel("L0 (held-out)")
        ax.set_ylabel(label)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    seeds = max(r["seeds"] for r in summary)
    fig.suptitle(f"{title} (mean and 95% interval over {seeds} seeds)", fontsize=9)
    return save(fig, path)


def run_pareto(params: Params, *, targets: list[float], seeds: int, archs: list[str],
               n_tokens: int | None, out: Path) -> list[dict[str, Any]]:
    from ..activations.store import ActivationStore
    from ..core import paths
    from ..core.plots import write_csv
    from ..core.runtime import compute_dtype, resolve_device
    from ..core.tracking import log_artifact, log_metrics, log_params, nested_run
    from .density import write_density
    from .evals import lm_metrics
    from .train import (_eval_batches, _heldout_rows, _row_batches, resolve_lr, resolve_tokens,
                        train)

    for a in archs:
        if a not in ARCHS:
            raise SaelabError(f"unknown architecture {a!r}; pick from {', '.join(ARCHS)}")
    if not (paths.ACTIVATIONS_DIR / "manifest.json").is_file():
        raise SaelabError(f"no activation store in {paths.ACTIVATIONS_DIR}; run "
                          "`dvc repro extract_mlp8` first (pareto reuses it, never extracts)")
    store = ActivationStore(paths.ACTIVATIONS_DIR)
    device = resolve_device(params)
    lr, lr_source = resolve_lr(params.sae, paths.FIT_JSON)
    tokens = n_tokens or resolve_tokens(params.sae, paths.BUDGET_JSON)[0]
    model = tokenizer = None
    if (paths.MODEL_DIR / "config.json").is_file():
        from ..data.base_model import load_model

        model, tokenizer = load_model(paths.MODEL_DIR, device=device,
                                      dtype=compute_dtype(params, device),
                                      attn_implementation=params.extract.attn_implementation)
    rows = _heldout_rows(params, tokenizer) if model is not None else []
    heldout = _eval_batches(params, model, tokenizer, store, rows, store.scale, device)
    if heldout is None:
        raise SaelabError("sae.eval_tokens is 0: pareto needs held-out activations; set it > 0")
    heldout = torch.cat(list(heldout))
    ex = params.extract
    log_params({"pareto.lr": lr, "pareto.n_tokens": tokens, "pareto.seeds": seeds,
                "pareto.targets": ",".join(f"{t:g}" for t in targets),
                "pareto.architectures": ",".join(archs)})
    log.info("pareto: %s x targets %s x %d seeds, %d tokens each, lr %.3g (%s)",
             "/".join(archs), targets, seeds, tokens, lr, lr_source)

    cache_path = out / "points.json"
    cache = atomic.read_json(cache_path) or {}
    points = []
    for arch in archs:
        for t in targets:
            cfg = point_cfg(params, arch, t)
            for seed in range(params.run.seed, params.run.seed + seeds):
                fp = checkpoint.fingerprint({"sae": dataclasses.asdict(cfg), "seed": seed,
                                             "lr": lr, "tokens": tokens, "lm": bool(rows),
                                             "store": store.manifest["fingerprint"]})
                if fp in cache:
                    points.append(cache[fp])
                    continue
                name = f"{arch} L0={t:g} seed={seed}"
                log.info("pareto: training %s", name)
                res = train(cfg, store.iter_batches(cfg.batch_size, seed=seed), d_in=store.d,
                            n_tokens=tokens, lr=lr, device=device, seed=seed,
                            eval_batches=iter(heldout.split(cfg.batch_size)),
                            eval_n_batches=math.ceil(len(heldout) / cfg.batch_size))
                m = dict(res.metrics)
                if rows:
                    m.update(lm_metrics(model, res.sae, _row_batches(rows, 8), layer=ex.layer,
                                        hook=ex.hook, scale=store.scale, device=device,
                                        special_ids=(tokenizer.bos_token_id,
                                                     tokenizer.eos_token_id)))
                point = {"architecture": arch, "target_l0": t, "seed": seed,
                         **{k: m.get(k, math.nan) for k in POINT_COLUMNS[3:]}}
                stem = f"{arch}_l0_{t:g}_seed{seed}"
                files = write_density(res.density, m["eval_tokens"],
                                      out / "density" / f"{stem}.png", f"{name}: feature density")
                with nested_run(name, {"architecture": arch, "target_l0": t, "seed": seed}):
                    log_metrics({k: m[k] for k in m if isinstance(m[k], (int, float))})
                    for f in files:
                        log_artifact(f, "density")
                points.append(point)
                cache[fp] = point
                out.mkdir(parents=True, exist_ok=True)
                atomic.write_text(cache_path, json.dumps(cache, indent=1, sort_keys=True) + "\n")
    summary = summarise(points)
    write_csv(out / "points.csv", points, list(POINT_COLUMNS))
    write_csv(out / "summary.csv", summary)
    title = f"{store.manifest.get('model')} layer {store.manifest.get('layer')}, " \
            f"d_sae {params.sae.d_sae}, {tokens} tokens"
    png = plot(summary, out / "pareto.png", title)
    for f in (out / "points.csv", out / "summary.csv", png):
        log_artifact(f, "pareto")
    return summary


def main(args) -> None:
    from ..core.stage import run_stage

    def body(params: Params) -> None:
        summary = run_pareto(params, targets=[float(t) for t in args.targets.split(",")],
                             seeds=args.seeds, archs=args.archs.split(","),
                             n_tokens=args.tokens, out=Path(args.out))
        for r in summary:
            print(f"{r['architecture']:9s} target {r['target_l0']:6g}  L0 {r['l0']:8.2f} "
                  f"[{r['l0_lo']:.2f}, {r['l0_hi']:.2f}]  FVU {r['fvu']:.4f} "
                  f"[{r['fvu_lo']:.4f}, {r['fvu_hi']:.4f}]  dLM {r['delta_lm_loss']:.4f} "
                  f"[{r['delta_lm_loss_lo']:.4f}, {r['delta_lm_loss_hi']:.4f}]")

    run_stage("pareto", body, args.params)
