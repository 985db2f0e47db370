"""The compute budget of the full-size SAE (DESIGN §7): tokens, FLOPs and GPU hours.

The token budget transfers Gemma Scope's smallest MLP-output SAEs to Llama-3.2-1B:
the same information per token (a uniform token over a vocabulary V carries log2 V
bits), scaled by the ratio of model sizes. The cost is the LLM forward pass through
the layers up to the hook (2 N_l FLOPs per token, no backward) plus the SAE step
(forward + backward ~ 3 x the 2 d_in d_sae forward FLOPs of its two matmuls).
"""
from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from ..core import atomic, paths
from ..core.config import BudgetCfg, Params, load_params
from ..core.errors import SaelabError

_SECONDS_PER_HOUR = 3600.0


def round_sig(x: float, sig: int) -> float:
    """x rounded to `sig` significant figures (2.1179e9 -> 2.1e9 at sig=2)."""
    if x == 0 or not math.isfinite(x):
        return x
    return round(x, sig - 1 - math.floor(math.log10(abs(x))))


def compute_budget(cfg: BudgetCfg,
                   measured_tokens_per_s: dict[str, float] | None = None) -> dict[str, Any]:
    """Token budget, FLOPs and hours per GPU; `measured_tokens_per_s` maps a device name
    to an end-to-end rate (extraction feeding the SAE) and adds predicted wall times."""
    entropy_equiv = cfg.ref_tokens * math.log2(cfg.ref_vocab) / math.log2(cfg.vocab)
    tokens = round_sig(entropy_equiv * cfg.model_size_ratio, cfg.round_sig)
    llm_flops = 2.0 * cfg.llm_params * cfg.layer_fraction * tokens
    sae_flops = 6.0 * 2.0 * cfg.d_in * cfg.d_sae * tokens
    total_flops = llm_flops + sae_flops

    gpus = []
    for gpu in cfg.gpus:
        row: dict[str, Any] = {"name": gpu.name, "peak_flops": gpu.peak_flops}
        for part, flops in (("llm", llm_flops), ("sae", sae_flops), ("total", total_flops)):
            peak_h = flops / gpu.peak_flops / _SECONDS_PER_HOUR
            row[f"{part}_hours_peak"] = peak_h
            row[f"{part}_hours_at_utilisation"] = peak_h / cfg.utilisation
        gpus.append(row)

    measured = []
    peaks = {g.name: g.peak_flops for g in cfg.gpus}
    for name, rate in (measured_tokens_per_s or {}).items():
        if not rate > 0:
            raise ValueError(f"measured tokens/s for {name!r} must be > 0, got {rate!r}")
        row = {"name": name, "tokens_per_s": rate, "hours": tokens / rate / _SECONDS_PER_HOUR}
        if name in peaks:
            # What fraction of this GPU's peak the measured rate implies for the modelled FLOPs.
            row["utilisation"] = total_flops / tokens * rate / peaks[name]
        measured.append(row)

    return {
        "ref_tokens": cfg.ref_tokens,
        "ref_vocab": cfg.ref_vocab,
        "vocab": cfg.vocab,
        "model_size_ratio": cfg.model_size_ratio,
        "tokens_entropy_equiv": entropy_equiv,
        "tokens": tokens,
        "llm_params": cfg.llm_params,
        "layer_fraction": cfg.layer_fraction,
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "llm_flops": llm_flops,
        "sae_flops": sae_flops,
        "total_flops": total_flops,
        "utilisation": cfg.utilisation,
        "gpus": gpus,
        "measured": measured,
    }


def _sci(x: float, sig: int = 3) -> str:
    return f"{x:.{sig - 1}e}"


def _hours(h: float) -> str:
    return f"{round_sig(h, 2):g}"


def budget_markdown(budget: dict[str, Any]) -> str:
    """The derivation in three lines and the GPU-hour table, as Markdown."""
    b = budget
    util = b["utilisation"]
    lines = [
        "## Compute budget (DESIGN §7)",
        "",
        f"- Tokens: {_sci(b['ref_tokens'], 2)} x log2({b['ref_vocab']}) / log2({b['vocab']}) "
        f"= {_sci(b['tokens_entropy_equiv'])} (equal entropy per token); "
        f"x {b['model_size_ratio']} (model size) = **{_sci(b['tokens'], 2)}**",
        f"- LLM forward: 2 x {_sci(b['llm_params'], 2)} params x {b['layer_fraction']} of the "
        f"layers x {_sci(b['tokens'], 2)} tokens = **{_sci(b['llm_flops'], 2)} FLOPs**",
        f"- SAE training: 6 x 2 x {b['d_in']} x {b['d_sae']} x {_sci(b['tokens'], 2)} tokens "
        f"= **{_sci(b['sae_flops'], 2)} FLOPs** (total {_sci(b['total_flops'], 2)})",
        "",
        f"Hours at peak and at {util:.0%} of peak (two significant figures):",
        "",
        "| GPU | peak FLOP/s | LLM h | SAE h | total h "
        f"| LLM h at {util:.0%} | SAE h at {util:.0%} | total h at {util:.0%} |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for g in b["gpus"]:
        cells = [g["name"], _sci(g["peak_flops"])]
        cells += [_hours(g[f"{part}_hours_peak"]) for part in ("llm", "sae", "total")]
        cells += [_hours(g[f"{part}_hours_at_utilisation"]) for part in ("llm", "sae", "total")]
        lines.append("| " + " | ".join(cells) + " |")
    if b["measured"]:
        lines += ["", "| measured on | tokens/s | hours for the budget | implied utilisation |",
                  "|---|---|---|---|"]
        for m in b["measured"]:
            implied = f"{m['utilisation']:.0%}" if "utilisation" in m else "-"
            lines.append(f"| {m['name']} | {m['tokens_per_s']:,.0f} | {_hours(m['hours'])} "
                         f"| {implied} |")
    return "\n".join(lines) + "\n"


def write_budget(params: Params, json_path: Path = paths.BUDGET_JSON,
                 md_path: Path = paths.BUDGET_MD,
                 measured_tokens_per_s: dict[str, float] | None = None) -> dict[str, Any]:
    budget = compute_budget(params.budget, measured_tokens_per_s)
    for p in (Path(json_path), Path(md_path)):
        p.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(json_path, json.dumps(budget, indent=2) + "\n")
    atomic.write_text(md_path, budget_markdown(budget))
    return budget


def measured_rates(results_path: str | Path) -> tuple[dict[str, float], str]:
    """End-to-end tokens/s from bench/gpu.py's results.json, keyed by GPU and rate, and a
    line saying where they come from; ({}, why) when there is no usable GPU record."""
    path = Path(results_path)
    if not path.is_file():
        return {}, f"no measured rates: {path} is absent (run bench/gpu.py on a GPU)"
    data = atomic.read_json(path)
    if not isinstance(data, dict) or data.get("suite") != "saelab bench/gpu.py":
        raise SaelabError(f"{path} is not a results file of bench/gpu.py; rerun "
                          "`python bench/gpu.py --out bench` on a GPU, or delete it")
    machine = data.get("machine") or {}
    if machine.get("dry_run"):
        return {}, f"no measured rates: {path} is from a CPU --dry-run, not a GPU"
    proj = (data.get("steps") or {}).get("projection") or {}
    rates = (proj.get("figures") or {}).get("measured_tokens_per_s") or {}
    rates = {k: v for k, v in rates.items() if isinstance(v, (int, float)) and v > 0}
    if not rates:
        return {}, f"no measured rates: the run in {path} measured none (see bench/RESULTS.md)"
    gpu = machine.get("gpu") or "GPU"
    return ({f"{gpu}: {name}": float(v) for name, v in rates.items()},
            f"measured rates: {path} ({gpu}, {machine.get('date')}, commit "
            f"{machine.get('commit')})")


def profile_budget(params: Params) -> BudgetCfg:
    """params.budget for the current profile: the seed's derivation with its model and SAE.

    Where the profile's model is the one the budget section describes (its hook width is
    budget.d_in: the 1B profiles), the section stands as written, with sae.d_sae. Otherwise
    the parameter count N, the share of the layers run (up to the hooked one) and the
    model-size ratio come from the profile's model; the ratio is taken against the
    reference model of the section (budget.llm_params / budget.model_size_ratio: the seed's
    Gemma-2-2B, 2.4e9).
    """
    from ..activations.hooks import hook_dim
    from ..data.base_model import build_model_config, count_params

    b = params.budget
    config = build_model_config(params.model)
    d_in = hook_dim(config, params.extract.hook)
    if d_in == b.d_in:
        return dataclasses.replace(b, d_sae=params.sae.d_sae)
    n = float(count_params(config))
    return dataclasses.replace(
        b, d_in=d_in, d_sae=params.sae.d_sae, llm_params=n,
        layer_fraction=(params.extract.layer + 1) / params.model.num_hidden_layers,
        model_size_ratio=n / (b.llm_params / b.model_size_ratio))


def budget_cli(params_path: str | Path = "params.yaml",
               results_path: str | Path = paths.GPU_RESULTS) -> str:
    """What `saelab budget` prints (the caller prints it): the peak-FLOP estimate for the
    current profile and, when bench/gpu.py's results are there, the hours at the rates it
    measured."""
    params = load_params(params_path)
    rates, source = measured_rates(results_path)
    budget = compute_budget(profile_budget(params), rates)
    return (f"Profile {params.profile} ({params.model.name}, {params.extract.hook} of layer "
            f"{params.extract.layer})\n\n" + budget_markdown(budget) + f"\n{source}\n")
