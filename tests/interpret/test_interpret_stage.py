"""The stage entry point: params.yaml, store + SAE + tokenizer loading, MLflow, outputs."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import CORPUS_LATENT, WORD

from saelab.core import paths


class _Store:
    """ActivationStore's read interface over the planted corpus (two shards)."""

    def __init__(self, corpus, d: int):
        n = corpus["n_tokens"]
        self.n_tokens, self.num_shards = n, 2
        self._rows, self._index = corpus["rows"], corpus["index"]
        # Latent CORPUS_LATENT of the SAE below reads feature 0: 1 on " mañana", else 0.
        x = torch.zeros(n, d)
        x[corpus["latents"][CORPUS_LATENT][0], 0] = 1.0
        x[:, 1] = torch.rand(n, generator=torch.Generator().manual_seed(0))
        self._x = x
        self._cut = n // 2

    def _part(self, i):
        return slice(0, self._cut) if i == 0 else slice(self._cut, self.n_tokens)

    def activations_f32(self, i):
        return self._x[self._part(i)].clone()

    def index(self, i):
        return self._index[self._part(i)]

    def rows(self):
        return self._rows

    def gather(self, ids, *, normalise=True):
        assert not normalise  # the exported SAE takes raw activations
        return self._x[torch.as_tensor(ids)]

    def check(self, full=None):  # in memory: nothing on disk to check
        pass



def _sae(d: int, d_sae: int):
    """A JumpReLU SAE as load_sae builds it: latent CORPUS_LATENT reads feature 0 (the
    planted word), latent 0 is dense on feature 1, latent 1 is dead; thresholds 0.5."""
    import dataclasses

    from saelab.core.config import SAECfg
    from saelab.sae.autoencoder import SAE

    cfg = dataclasses.replace(SAECfg(), architecture="jumprelu", d_sae=d_sae, theta_param="raw",
                              decoder_norm="unit")
    sae = SAE(d, d_sae, cfg)
    with torch.no_grad():
        for t in (sae.W_enc, sae.b_enc, sae.b_dec):
            t.zero_()
        sae.W_enc[0, CORPUS_LATENT] = 2.0
        sae.W_enc[1, 0] = 1.0
        sae.raw_threshold.fill_(0.5)
    return sae.eval()


def test_stage_main_with_backend_none(workdir, corpus, tokenizer, isolated_mlflow, monkeypatch):
    import mlflow

    from saelab.sae import autoencoder as sae_mod
    from saelab.activations import store as store_mod
    from saelab.interpret.stage import main

    monkeypatch.setattr(store_mod, "ActivationStore", lambda path: _Store(corpus, 4))
    monkeypatch.setattr(sae_mod, "load_sae", lambda path, device: _sae(4, 12))
    tokenizer.save_pretrained(paths.MODEL_DIR)
    (workdir / "params.yaml").write_text(
        "run: {device: cpu, seed: 0}\n"
        "interpret: {backend: none, n_latents: 3, latent_selection: top_density, window: 16,"
        " n_top: 6, n_explain: 3, n_quantiles: 2, n_per_quantile: 2, n_random: 4,"
        " min_activations: 5, cache_dir: .cache/interpret}\n")
    main()
    metrics = json.loads(paths.INTERPRET_METRICS.read_text())
    assert set(metrics["latents"]) == {"0", str(CORPUS_LATENT), "1"}  # densest first
    assert metrics["latents"][str(CORPUS_LATENT)]["n_fired"] == len(corpus["latents"][CORPUS_LATENT][0])
    assert metrics["latents"]["1"]["skipped"]  # dead on this store
    requests = (paths.INTERPRET_DIR / "requests.jsonl").read_text()
    assert f"<<{WORD}>>" in requests
    assert (paths.INTERPRET_DIR / "index.html").exists()
    batch = json.loads((paths.INTERPRET_DIR / "saedashboard/batch-0.json").read_text())
    assert {f["feature_index"] for f in batch["features"]} == {0, CORPUS_LATENT}
    runs = mlflow.search_runs(experiment_names=["saelab"])
    assert len(runs) == 1 and runs.iloc[0]["tags.dvc.stage"] == "interpret"
    assert np.isfinite(runs.iloc[0]["metrics.cost.estimated_usd"])


def test_missing_key_is_reported_before_any_work(tmp_path, monkeypatch):
    """No store or SAE here: the key error must come first, not after reading them."""
    from saelab.core.config import parse_params
    from saelab.core.errors import SaelabError
    from saelab.interpret.stage import _run

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    with pytest.raises(SaelabError, match="OPENAI_API_KEY"):
        _run(parse_params({"interpret": {"backend": "openai-batch"}}))
