"""The sampled latents' dashboards in SAEDashboard's Neuronpedia batch format.

SAEDashboard's NeuronpediaRunner writes `batch-N.json` files; its `neuronpedia_export.py`
(`export_neuronpedia_dashboards`) turns a folder of them into Neuronpedia's bulk-import
layout. Both sides were read from SAEDashboard's source (jbloomAus/SAEDashboard,
`sae_dashboard/neuronpedia/neuronpedia_dashboard.py` `to_dict` and `neuronpedia_export.py`,
commit db4839a, 2026-05-11): a batch is {model_id, layer, sae_set, sae_id_suffix,
features}, a feature carries the keys in FEATURE_KEYS and its activating examples, each
{tokens, values, bin_min, bin_max, bin_contains, qualifying_token_index}.

What saelab measures goes in: the top windows (bin_min -1, bin_max = the latent's max, as
SAEDashboard marks its top group), the activation-quantile windows (bin_contains = the
bin's share of the firing tokens, equal-count bins; bin_min/bin_max = the range of the
bin's sampled peaks), the firing density and the activation histogram. What it does not
compute (logit tables, neuron alignment, correlations, decoder weight distribution) is
left empty, which the converter passes through. Only the latents the interpret stage
sampled are in the batch.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from ..core import atomic
from .decode import render
from .sampling import LatentSamples, Window

# The feature keys neuronpedia_export.py reads, all of them required there.
FEATURE_KEYS = (
    "feature_index", "neuron_alignment_indices", "neuron_alignment_values",
    "neuron_alignment_l1", "correlated_neurons_indices", "correlated_neurons_l1",
    "correlated_neurons_pearson", "correlated_features_indices", "correlated_features_l1",
    "correlated_features_pearson", "neg_str", "neg_values", "pos_str", "pos_values",
    "frac_nonzero", "freq_hist_data_bar_values", "freq_hist_data_bar_heights",
    "logits_hist_data_bar_heights", "logits_hist_data_bar_values", "n_prompts_total",
    "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations")
_NOT_COMPUTED = {k: [] for k in FEATURE_KEYS if k.startswith(
    ("neuron_", "correlated_", "neg_", "pos_", "logits_", "decoder_"))}
DIR = "saedashboard"


def _round(values) -> list[float]:
    return [round(float(v), 3) for v in values]  # SAEDashboard rounds to 3 decimals too


def token_strings(tokens: np.ndarray, table: list[bytes]) -> list[str]:
    """Each token's visible text: joined they give the decoded window, and a character
    split over several tokens (byte-level BPE) is shown once, at the first of them."""
    r = render(tokens, table)
    out, done = [], 0
    for s, e in r.spans:
        s = max(int(s), done)
        out.append(r.text[s:int(e)] if e > s else "")
        done = max(done, int(e))
    return out


def _activation(w: Window, table: list[bytes], bin_min: float, bin_max: float,
                bin_contains: float) -> dict[str, Any]:
    return {"bin_min": bin_min, "bin_max": bin_max, "bin_contains": bin_contains,
            "tokens": token_strings(w.tokens, table), "values": _round(w.acts),
            "qualifying_token_index": int(np.argmax(w.acts))}


def feature(s: LatentSamples, table: list[bytes], *, n_prompts_total: int,
            n_tokens_in_prompt: int, dataset: str, n_quantiles: int) -> dict[str, Any]:
    edges = np.asarray(s.hist_edges, dtype=np.float64)
    acts = [_activation(w, table, -1, round(s.max_act, 3), -1) for w in s.top]
    for q in sorted({w.quantile for w in s.quantiles}, reverse=True):  # strongest bin first
        group = [w for w in s.quantiles if w.quantile == q]
        peaks = [w.max_act for w in group]
        acts += [_activation(w, table, round(min(peaks), 3), round(max(peaks), 3),
                             round(1 / n_quantiles, 6)) for w in group]
    return {
        **_NOT_COMPUTED,
        "feature_index": s.latent,
        "frac_nonzero": s.density,
        "freq_hist_data_bar_values": _round((edges[:-1] + edges[1:]) / 2) if len(edges) else [],
        "freq_hist_data_bar_heights": [int(c) for c in s.hist_counts],
        "n_prompts_total": n_prompts_total,
        "n_tokens_in_prompt": n_tokens_in_prompt,
        "dataset": dataset,
        "activations": acts,
    }


def write_batches(out_dir: Path, samples: list[LatentSamples], table: list[bytes], *,
                  model_id: str, layer: int, sae_set: str, n_prompts_total: int,
                  n_tokens_in_prompt: int, dataset: str, n_quantiles: int,
                  per_batch: int = 128) -> list[Path]:
    """`batch-N.json` files of `per_batch` latents each (skipped latents left out)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("batch-*.json"):  # a rerun with fewer latents leaves none stale
        old.unlink()
    live = [s for s in samples if not s.skipped]
    written = []
    for k in range(0, len(live), per_batch):
        batch = {"model_id": model_id, "layer": layer, "sae_set": sae_set,
                 "sae_id_suffix": None,
                 "features": [feature(s, table, n_prompts_total=n_prompts_total,
                                      n_tokens_in_prompt=n_tokens_in_prompt, dataset=dataset,
                                      n_quantiles=n_quantiles)
                              for s in live[k:k + per_batch]]}
        path = out_dir / f"batch-{k // per_batch}.json"
        atomic.write_text(path, json.dumps(batch, ensure_ascii=False) + "\n")
        written.append(path)
    return written
