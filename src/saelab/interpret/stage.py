"""DVC stage `interpret`: explain and score SAE latents with an LLM (DESIGN §8).

Reads the SAE (models/sae), the activation store and the base model's tokenizer; writes
reports/interpret/ (HTML, explanations.json, requests.jsonl, saedashboard/batch-N.json)
and reports/interpret_metrics.json. Backend `none` needs no key and sends nothing.
"""
from __future__ import annotations

import logging

import numpy as np

from ..core import paths
from ..core.config import Params
from ..core.errors import SaelabError
from ..core.runtime import resolve_device
from ..core.stage import run_stage
from .backends import api_key, check_base_url
from .decode import token_bytes_table
from .latents import firing_counts, latent_activations, select_latents, store_index
from .pipeline import run_interpret
from .saedashboard import DIR as SAEDASHBOARD_DIR, write_batches
from .sampling import SampleSpec, sample_latent

log = logging.getLogger(__name__)


def _tokenizer():
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(paths.MODEL_DIR)
    except (OSError, ValueError) as e:
        raise SaelabError(f"no tokenizer in {paths.MODEL_DIR} ({e}); run `dvc repro "
                          "fetch_model`") from None


def _run(params: Params) -> None:
    from ..sae.autoencoder import load_sae
    from ..activations.store import ActivationStore

    cfg = params.interpret
    if cfg.backend != "none":
        api_key()  # before the passes over the store, not after them
        check_base_url(cfg.base_url)
    device = resolve_device(params)
    store = ActivationStore(paths.ACTIVATIONS_DIR)
    store.check()
    sae = load_sae(paths.SAE_DIR, device)
    table = token_bytes_table(_tokenizer())

    counts = firing_counts(store, sae, device)
    rng = np.random.default_rng(params.run.seed)
    latents = select_latents(counts, cfg.n_latents, cfg.latent_selection, rng)
    log.info("explaining %d of %d latents (%s); %d are dead on this store", len(latents),
             len(counts), cfg.latent_selection, int((counts == 0).sum()))
    acts = latent_activations(store, sae, latents, device)
    index, rows = store_index(store), np.asarray(store.rows())
    spec = SampleSpec(window=cfg.window, n_top=cfg.n_top, n_explain=cfg.n_explain,
                      n_quantiles=cfg.n_quantiles, n_per_quantile=cfg.n_per_quantile,
                      n_random=cfg.n_random, min_activations=cfg.min_activations)
    samples = [sample_latent(i, *acts[i], store.n_tokens, index, rows, spec,
                             np.random.default_rng([params.run.seed, i])) for i in latents]
    metrics = run_interpret(samples, table, cfg, seed=params.run.seed)
    # The same examples for SAEDashboard / Neuronpedia's importer (see saedashboard.py).
    write_batches(paths.INTERPRET_DIR / SAEDASHBOARD_DIR, samples, table,
                  model_id=params.model.name, layer=params.extract.layer,
                  sae_set=f"saelab-{params.extract.hook.replace('_', '-')}",
                  n_prompts_total=len(rows), n_tokens_in_prompt=rows.shape[1],
                  dataset=params.data.source, n_quantiles=cfg.n_quantiles)
    s = metrics["summary"]
    log.info("interpret: %d latents, %d skipped, %d explained; report in %s",
             s["n_latents"], s["n_skipped"], s["n_explained"], paths.INTERPRET_DIR / "index.html")


def main() -> None:
    run_stage("interpret", _run)


if __name__ == "__main__":
    main()
