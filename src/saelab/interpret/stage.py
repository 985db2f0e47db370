"""DVC stage `interpret`: explain and score SAE latents with an LLM (DESIGN §8).

Reads the SAE (models/sae), the activation store and the base model's tokenizer; writes
reports/interpret/ (HTML, explanations.json, requests.jsonl, saedashboard/batch-N.json)
and reports/interpret_metrics.json. Backend `none` needs no key and sends nothing.
"""
from __future__ import annotations

import logging

import numpy as np

from ..core import paths
from ..core.config import InterpretCfg, Params
from ..core.errors import SaelabError
from ..core.runtime import resolve_device
from ..core.stage import run_stage
from .backends import api_key, check_base_url
from .decode import token_bytes_table
from .latents import (SAMPLE_PER_WINDOW, SILENT_POOL_WINDOWS, STRONGEST_PER_WINDOW,
                      SilentPool, fill_window_acts, pool_for, position_ids, scan)
from .models import explainer
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


def preconditions(cfg: InterpretCfg):
    """The explainer, once its model is known and not retired and, for an API backend, the
    key and endpoint are usable; saelab.preflight checks it before the first stage too."""
    llm = explainer(cfg)
    if cfg.backend != "none":
        api_key()
        check_base_url(cfg.base_url)
    return llm


def _run(params: Params) -> None:
    from ..sae.autoencoder import load_sae
    from ..activations.store import ActivationStore

    cfg = params.interpret
    llm = preconditions(cfg)  # a retired model or a missing key stops before the store pass
    device = resolve_device(params)
    store = ActivationStore(paths.ACTIVATIONS_DIR)
    store.check()
    sae = load_sae(paths.SAE_DIR, device)
    table = token_bytes_table(_tokenizer())

    spec = SampleSpec(window=cfg.window, n_top=cfg.n_top, n_explain=cfg.n_explain,
                      n_quantiles=cfg.n_quantiles, n_per_quantile=cfg.n_per_quantile,
                      n_random=cfg.n_random, min_activations=cfg.min_activations)
    seed = params.run.seed
    pool = pool_for(sae.d_sae, cfg.n_latents, cfg.latent_selection, np.random.default_rng(seed))
    found = scan(store, sae, pool, device=device, seed=seed,
                 n_strongest=max(cfg.n_top, cfg.n_explain + 1) * STRONGEST_PER_WINDOW,
                 n_sample=max(256, SAMPLE_PER_WINDOW * cfg.n_quantiles * cfg.n_per_quantile))
    latents = found.choose(cfg.n_latents, cfg.latent_selection)
    n_dead = int((found.counts == 0).sum())
    log.info("one pass over %d stored tokens: %d of %d latents dead; explaining %d (%s); "
             "samples kept for %d latents in %.1f MB", store.n_tokens, n_dead, sae.d_sae,
             len(latents), cfg.latent_selection, len(pool), found.nbytes / 2**20)
    if len(latents) < min(cfg.n_latents, sae.d_sae - n_dead):
        log.warning("only %d live latents among the %d drawn for interpret.latent_selection = "
                    "random; more than half the SAE is dead", len(latents), len(pool))
    pos_ids, rows = position_ids(store), np.asarray(store.rows())
    index = np.argwhere(pos_ids >= 0)[np.argsort(pos_ids[pos_ids >= 0], kind="stable")]
    silent = SilentPool(store, sae, pos_ids, n_windows=SILENT_POOL_WINDOWS, width=cfg.window,
                        device=device, seed=seed)
    samples = []
    for i in latents:
        rng = np.random.default_rng([seed, i])
        samples.append(sample_latent(i, found.hits(i), store.n_tokens, index, rows, spec, rng,
                                     silent.silent(i, rng)))
    fill_window_acts(samples, store, sae, pos_ids, found.kth, device)
    metrics = run_interpret(samples, table, cfg, seed=params.run.seed, llm=llm)
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
