"""`saelab plan`: what a run of the current params needs, worked out before anything runs.

Tokens per stage, FLOPs, disk (corpus text, store, model, checkpoints), host RAM (the
corpus split that the seeded document order holds per process, the shuffle buffer on a
CPU), GPU memory per process (model, SAE + gradients + Adam, the SAE's activations at its
batch, the forward's activations, the streaming shuffle buffer) and wall time per stage at
a named GPU's peak, at budget.utilisation of it and at the rates bench/gpu.py measured.
It warns when the disk or the memory will not hold the run, when the corpus is too small,
and when training would pass over the store more than sae.max_epochs times.

FLOPs are the seed's model (DESIGN §7): 2 N_l per token for the forward up to the hooked
layer, 6 x 2 d_in d_sae per token for an SAE step. Memory figures are estimates of the
big tensors, not an allocator trace.
"""
from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import Any

from ..core import atomic, paths
from ..core.config import Params
from ..core.errors import SaelabError
from .budget import compute_budget, measured_rates, profile_budget, round_sig
from .laws import DEAD_MAX_STEPS, guard_tokens

# Memory of the GPUs a plan can be made for (GiB); peaks come from budget.gpus, H200 as H100.
GPU_MEMORY_GIB = {"RTX 4090": 24.0, "A100": 80.0, "H100": 80.0, "H200": 141.0}
_EXTRA_PEAKS = {"H200": 989.0e12}
# UTF-8 bytes per character of Spanish web text (accents take two bytes).
BYTES_PER_CHAR = 1.03
_GIB = 2.0 ** 30


def processes(launcher: str) -> tuple[int, int]:
    """(processes per node, nodes) of run.launcher: `python` is (1, 1)."""
    def flag(name: str) -> int:
        m = re.search(rf"--{name}[= ](\d+)", launcher)
        return int(m.group(1)) if m else 1
    if "torchrun" not in launcher and "torch.distributed.run" not in launcher:
        return 1, 1
    return max(flag("nproc[_-]per[_-]node"), 1), max(flag("nnodes"), 1)


def _gpu(params: Params, name: str) -> tuple[float, float]:
    peaks = {g.name: g.peak_flops for g in params.budget.gpus} | _EXTRA_PEAKS
    if name not in peaks or name not in GPU_MEMORY_GIB:
        known = sorted(set(peaks) & set(GPU_MEMORY_GIB))
        raise SaelabError(f"unknown GPU {name!r}; choose one of {known} (or add it to "
                          "budget.gpus)")
    return peaks[name], GPU_MEMORY_GIB[name]


def _corpus_tokens(params: Params, root: Path) -> tuple[float | None, str]:
    """Training tokens the corpus holds (or will hold), and how that is known."""
    manifest = atomic.read_json(root / paths.CORPUS_DIR / "manifest.json")
    if manifest and manifest.get("source") == params.data.source:
        return float(manifest["tokens_estimate"]["train"]), "data/corpus/manifest.json"
    share = 1.0 - params.data.heldout_fraction
    if params.data.token_budget:
        return params.data.token_budget * share, "data.token_budget"
    if params.data.source == "sample" and (root / params.data.sample_path).is_file():
        chars = (root / params.data.sample_path).stat().st_size / BYTES_PER_CHAR
        return chars / params.data.chars_per_token * share, "size of data.sample_path"
    return None, "unknown until fetch_oscar runs (no data.token_budget)"


def make_plan(params: Params, *, gpu: str = "H100", root: Path = Path("."),
              results: Path | None = None) -> dict[str, Any]:
    """Every figure of the plan, and the warnings, as a dict (`plan_text` prints it)."""
    from ..activations.store import estimate_bytes
    from ..sae.train import store_passes

    root = Path(root)
    peak, gpu_mem = _gpu(params, gpu)
    per_node, nodes = processes(params.run.launcher)
    world = per_node * nodes
    ex, sae, sc = params.extract, params.sae, params.scaling
    bcfg = profile_budget(params)
    d_in, n_model = bcfg.d_in, bcfg.llm_params
    fwd = 2.0 * bcfg.llm_params * bcfg.layer_fraction      # FLOPs per token, up to the hook
    step = 6.0 * 2.0 * d_in * sae.d_sae                    # FLOPs per token of an SAE step
    budget_tokens = compute_budget(bcfg)["tokens"]
    train_tokens = float(sae.n_tokens) if sae.n_tokens is not None else budget_tokens
    util = params.budget.utilisation
    warnings: list[str] = []

    # --- tokens and FLOPs per stage ---
    # The lr sweep, then each further token count at one lr per size (scaling.laws.run_grid).
    counts = {n for n in sc.tokens_grid if n != sc.n_tokens}
    pilot_tokens = sc.n_tokens * len(sc.lr_grid) + sum(counts)
    sizes = set(sc.d_sae_grid)
    pilot_flops = sum(12.0 * d_in * d for d in sizes) * pilot_tokens * sc.seeds
    # The dead-latent guard (scaling.laws.run_grid): at most DEAD_MAX_STEPS lower lrs per
    # width at the largest count, plus lr* itself where that count is the sweep's.
    guard_runs = (DEAD_MAX_STEPS + (max(counts, default=0) < sc.n_tokens)
                  if sc.max_dead_fraction is not None else 0)
    guard_flops = (sum(12.0 * d_in * d for d in sizes) * guard_tokens(sc) * sc.seeds
                   * guard_runs)
    stages = [
        {"stage": "extract_mlp8", "tokens": float(ex.n_tokens), "flops": fwd * ex.n_tokens},
        {"stage": "fit_scaling_laws", "tokens": float(pilot_tokens) * len(sizes) * sc.seeds,
         "flops": pilot_flops},
        {"stage": "train_sae", "tokens": train_tokens,
         "flops": train_tokens * (step + (fwd if sae.stream else 0.0))},
    ]
    for s in stages:
        s["hours_peak"] = s["flops"] / (peak * world) / 3600
        s["hours_at_utilisation"] = s["hours_peak"] / util
    rates, rates_source = measured_rates(results if results is not None
                                         else root / paths.GPU_RESULTS)
    predicted_rate = util * peak / (step + (fwd if sae.stream else 0.0))
    measured = [{"name": k, "tokens_per_s": v, "train_hours": train_tokens / (v * world) / 3600,
                 "predicted_over_measured": predicted_rate / v} for k, v in rates.items()]

    # --- corpus ---
    ctx_overhead = ex.context_len / (ex.context_len - 1)   # BOS at every row start
    needed = max(ex.n_tokens, train_tokens if sae.stream else 0) * ctx_overhead
    holds, holds_source = _corpus_tokens(params, root)
    if holds is not None and holds < needed:
        warnings.append(
            f"the corpus holds about {holds:.3g} training tokens ({holds_source}) but the run "
            f"needs {needed:.3g}: raise data.token_budget (the held-out "
            f"{params.data.heldout_fraction:.0%} comes on top)")
    corpus_tokens = params.data.token_budget or (holds / (1 - params.data.heldout_fraction)
                                                 if holds else 0.0)
    corpus_bytes = corpus_tokens * params.data.chars_per_token * BYTES_PER_CHAR

    # --- passes over the store ---
    passes = None if sae.stream else store_passes(sae.batch_size, int(train_tokens),
                                                  ex.n_tokens)
    if passes is not None and passes > sae.max_epochs:
        warnings.append(
            f"train_sae would pass {passes:.1f} times over the {ex.n_tokens} stored tokens "
            f"(sae.max_epochs = {sae.max_epochs:g}): it stops before training. Stream "
            f"(sae.stream = true) or extract {int(train_tokens)} tokens")

    # --- disk ---
    sae_params = 2.0 * d_in * sae.d_sae + 2 * sae.d_sae + d_in
    disk = {
        "corpus_text": corpus_bytes,
        "store": float(estimate_bytes(ex.n_tokens, d_in, ex.store_dtype, ex.context_len)),
        "model": n_model * (2 if params.model.source == "hub" else 4),
        "checkpoint": sae_params * 4 * 3,   # fp32 weights + Adam's two moments
    }
    disk["total"] = sum(disk.values())
    free = shutil.disk_usage(root).free
    if disk["total"] > free:
        warnings.append(f"the run needs about {disk['total'] / 1e9:,.1f} GB of disk but "
                        f"{free / 1e9:,.1f} GB are free at {root.resolve()}")

    # --- host RAM, per node ---
    train_chars_bytes = (holds or 0.0) * params.data.chars_per_token * BYTES_PER_CHAR
    host = {"corpus_split_per_process": train_chars_bytes,
            "corpus_split_all_processes": train_chars_bytes * per_node}
    cpu = params.run.device == "cpu"
    buffer_bytes = sae.shuffle_buffer / world * d_in * (4 if cpu else 2) * 2 if sae.stream \
        else 0.0
    host["shuffle_buffer"] = buffer_bytes * per_node if cpu else 0.0
    host["total"] = host["corpus_split_all_processes"] + host["shuffle_buffer"]
    phys = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if host["total"] > 0.8 * phys:
        warnings.append(f"host RAM: about {host['total'] / 1e9:,.1f} GB per node (the corpus "
                        f"split held by each of {per_node} processes for the seeded order) "
                        f"against {phys / 1e9:,.1f} GB here")

    # --- GPU memory, per process ---
    m = params.model
    local_batch = sae.batch_size / world
    gpu_bytes = {
        "model_bf16": n_model * 2,
        "sae_weights_grads_adam": sae_params * 4 * 4,
        "sae_activations": local_batch * sae.d_sae * 4 * 4,  # z, f and their gradients
        "forward_activations": ex.batch_tokens * (3 * m.intermediate_size + 6 * m.hidden_size)
        * 2,
        "shuffle_buffer": 0.0 if cpu else buffer_bytes,
    }
    gpu_bytes["total"] = sum(gpu_bytes.values())
    if gpu_bytes["total"] > 0.9 * gpu_mem * _GIB:
        warnings.append(f"GPU memory: about {gpu_bytes['total'] / _GIB:,.1f} GiB per process "
                        f"against {gpu_mem:g} GiB on a {gpu}; lower sae.shuffle_buffer, "
                        "sae.batch_size or extract.batch_tokens")

    return {"profile": params.profile, "model": params.model.name, "gpu": gpu,
            "peak_flops": peak, "gpu_memory_gib": gpu_mem, "world": world,
            "per_node": per_node, "nodes": nodes, "utilisation": util,
            "d_in": d_in, "d_sae": sae.d_sae, "stream": sae.stream,
            "budget_tokens": budget_tokens, "train_tokens": train_tokens,
            "fwd_flops_per_token": fwd, "sae_flops_per_token": step,
            "corpus": {"needed_tokens": needed, "holds_tokens": holds, "source": holds_source},
            "passes": passes, "max_epochs": sae.max_epochs, "stages": stages,
            "guard_max": {"flops": guard_flops,
                          "hours_at_utilisation": guard_flops / (peak * world) / 3600 / util},
            "total_hours_peak": sum(s["hours_peak"] for s in stages),
            "total_hours_at_utilisation": sum(s["hours_at_utilisation"] for s in stages),
            "predicted_train_tokens_per_s": predicted_rate * world,
            "measured": measured, "measured_source": rates_source,
            "disk": disk, "disk_free": free, "host": host, "host_ram": phys,
            "gpu_bytes": gpu_bytes, "warnings": warnings}


def _gb(x: float) -> str:
    return f"{x / 1e9:,.3g} GB" if x < 1e12 else f"{x / 1e12:,.3g} TB"


def _h(x: float) -> str:
    return f"{round_sig(x, 2):g} h"


def plan_text(p: dict[str, Any]) -> str:
    """The plan as the lines `saelab plan` prints."""
    data = "streamed from the model (sae.stream)" if p["stream"] else \
        f"from the store, {p['passes']:.2f} passes (sae.max_epochs {p['max_epochs']:g})"
    procs = f"{p['world']} process(es)" + (f" ({p['per_node']} per node x {p['nodes']} nodes)"
                                           if p["nodes"] > 1 else "")
    holds = p["corpus"]["holds_tokens"]
    lines = [
        f"Plan for profile {p['profile']} ({p['model']}), d_in {p['d_in']}, d_sae {p['d_sae']}, "
        f"on {procs} of {p['gpu']} ({p['peak_flops']:.3g} FLOP/s peak, "
        f"{p['gpu_memory_gib']:g} GiB)",
        "",
        f"Tokens: SAE training {p['train_tokens']:.3g} (budget {p['budget_tokens']:.2g}), "
        f"data {data}",
        f"Corpus: needs {p['corpus']['needed_tokens']:.3g} training tokens, holds "
        + (f"{holds:.3g}" if holds is not None else "?") + f" ({p['corpus']['source']})",
        f"FLOPs per token: forward to the hook {p['fwd_flops_per_token']:.3g}, SAE step "
        f"{p['sae_flops_per_token']:.3g}",
        "",
        f"| stage | tokens | FLOPs | h at peak | h at {p['utilisation']:.0%} |",
        "|---|---|---|---|---|",
    ]
    for s in p["stages"]:
        lines.append(f"| {s['stage']} | {s['tokens']:.3g} | {s['flops']:.2g} | "
                     f"{_h(s['hours_peak'])} | {_h(s['hours_at_utilisation'])} |")
    lines.append(f"| total | | | {_h(p['total_hours_peak'])} | "
                 f"{_h(p['total_hours_at_utilisation'])} |")
    g = p["guard_max"]
    if g["flops"]:
        lines.append(f"fit_scaling_laws' dead-latent guard adds at most {g['flops']:.2g} FLOPs "
                     f"({_h(g['hours_at_utilisation'])} at {p['utilisation']:.0%}), not in the "
                     "total: only where lr* leaves too many latents dead")
    lines += ["", f"train_sae at {p['utilisation']:.0%} of peak: "
              f"{p['predicted_train_tokens_per_s'] / p['world']:,.0f} tokens/s per GPU predicted"]
    for m in p["measured"]:
        lines.append(f"  measured {m['name']}: {m['tokens_per_s']:,.0f} tokens/s per GPU -> "
                     f"train_sae {_h(m['train_hours'])}; predicted / measured "
                     f"{m['predicted_over_measured']:.2f}")
    lines.append(f"  ({p['measured_source']})")
    d, h, g = p["disk"], p["host"], p["gpu_bytes"]
    lines += [
        "",
        f"Disk: corpus text {_gb(d['corpus_text'])} (UTF-8; parquet holds less), store "
        f"{_gb(d['store'])}, model {_gb(d['model'])}, checkpoint {_gb(d['checkpoint'])}; "
        f"total {_gb(d['total'])} of {_gb(p['disk_free'])} free",
        f"Host RAM per node: corpus split for the seeded order "
        f"{_gb(h['corpus_split_per_process'])} x {p['per_node']} process(es), shuffle buffer "
        f"{_gb(h['shuffle_buffer'])}; total {_gb(h['total'])} of {_gb(p['host_ram'])} here",
        f"GPU memory per process: model {g['model_bf16'] / _GIB:.2f} GiB, SAE + grads + Adam "
        f"{g['sae_weights_grads_adam'] / _GIB:.2f}, SAE activations "
        f"{g['sae_activations'] / _GIB:.2f}, forward activations "
        f"{g['forward_activations'] / _GIB:.2f}, shuffle buffer {g['shuffle_buffer'] / _GIB:.2f};"
        f" total {g['total'] / _GIB:.1f} GiB of {p['gpu_memory_gib']:g}",
    ]
    lines += [""] + ([f"WARNING: {w}" for w in p["warnings"]] or ["No warnings."])
    return "\n".join(lines) + "\n"
