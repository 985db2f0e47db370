"""The interpret stage's examples in SAEDashboard's batch format (Neuronpedia's importer)."""
from __future__ import annotations

import json

import numpy as np
from conftest import CORPUS_LATENT, SPEC, WORD

from saelab.interpret.decode import render
from saelab.interpret.saedashboard import FEATURE_KEYS, token_strings, write_batches


def test_batches_carry_every_key_the_converter_reads(tmp_path, samples, table, corpus):
    paths = write_batches(tmp_path, samples, table, model_id="tiny", layer=8,
                          sae_set="saelab-mlp-out", n_prompts_total=len(corpus["rows"]),
                          n_tokens_in_prompt=corpus["rows"].shape[1], dataset="sample",
                          n_quantiles=SPEC.n_quantiles, per_batch=1)
    live = [s for s in samples if not s.skipped]
    assert [p.name for p in paths] == [f"batch-{k}.json" for k in range(len(live))]
    batch = json.loads(paths[[s.latent for s in live].index(CORPUS_LATENT)].read_text())
    assert (batch["model_id"], batch["layer"], batch["sae_set"]) == ("tiny", 8, "saelab-mlp-out")
    (feat,) = batch["features"]
    assert set(feat) == set(FEATURE_KEYS) and feat["feature_index"] == CORPUS_LATENT
    s = next(x for x in samples if x.latent == CORPUS_LATENT)
    assert feat["frac_nonzero"] == s.density
    assert sum(feat["freq_hist_data_bar_heights"]) == s.n_fired
    acts = feat["activations"]
    assert len(acts) == len(s.top) + len(s.quantiles)
    top = acts[0]
    assert (top["bin_min"], top["bin_contains"]) == (-1, -1)
    assert top["bin_max"] == round(s.max_act, 3)
    # The qualifying token is the planted word, at the window's peak.
    assert top["tokens"][top["qualifying_token_index"]] == f" {WORD}"
    assert top["values"][top["qualifying_token_index"]] == max(top["values"]) > 0
    assert all(a["bin_contains"] == round(1 / SPEC.n_quantiles, 6) for a in acts[len(s.top):])
    # A rerun with fewer latents leaves no stale batch behind.
    write_batches(tmp_path, live[:1], table, model_id="tiny", layer=8, sae_set="x",
                  n_prompts_total=1, n_tokens_in_prompt=1, dataset="sample", n_quantiles=2)
    assert sorted(p.name for p in tmp_path.glob("batch-*.json")) == ["batch-0.json"]


def test_token_strings_rebuild_the_text_once(tokenizer, table):
    ids = np.array(tokenizer.encode(" señora año 🙂 mañana", add_special_tokens=False))
    pieces = token_strings(ids, table)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == render(ids, table).text == " señora año 🙂 mañana"
