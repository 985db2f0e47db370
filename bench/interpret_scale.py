"""The interpret stage at the 1B profile's SAE shape: every latent of a 16,384-latent SAE.

A synthetic store of the 1B profile's width (d_in 2048) holds real Spanish token rows
(data/sample, Llama-3.2 tokenizer, context 1024) with Gaussian activations; a random
JumpReLU SAE (d_sae 16,384) gets per-latent thresholds that make each latent fire on
about --l0 / d_sae of the tokens. The bench runs the stage's own selection path (one
scan, the sampling, the per-latent window activations, the shared silent pool) for all
16,384 latents and prints, side by side:

- time of each step, and the encode FLOPs of the scan here and for the profile's 8.4 M
  stored tokens (the scan is one encode: its time scales with tokens, nothing else does);
- memory: the samples the scan keeps (exact bytes, independent of the store's length)
  and the process's peak RSS;
- the cost estimate the stage prints before sending anything, for explaining and scoring
  all 16,384 latents at the default model through the Batch API (target: <= $30).

    .venv/bin/python bench/interpret_scale.py                   # 32,768 tokens (~2-4 min on 2 cores)
    .venv/bin/python bench/interpret_scale.py --tokens 131072   # closer to the real store
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import resource
import time
from pathlib import Path

import numpy as np
import torch

from saelab.core.config import InterpretCfg, SAECfg, load_params
from saelab.interpret.cost import token_counter
from saelab.interpret.decode import token_bytes_table
from saelab.interpret.latents import (SAMPLE_PER_WINDOW, SILENT_POOL_WINDOWS,
                                      STRONGEST_PER_WINDOW, SilentPool, fill_window_acts,
                                      pool_for, position_ids, scan)
from saelab.interpret.models import explainer
from saelab.interpret.pipeline import estimate_all
from saelab.interpret.sampling import SampleSpec, sample_latent
from saelab.sae.autoencoder import SAE
from saelab.data.tokenizer import BOS_ID, load_llama3_tokenizer

REPO = Path(__file__).resolve().parents[1]
PROFILE_STORE_TOKENS = 8_388_608  # conf/profile/llama-3.2-1b.yaml extract.n_tokens


class SyntheticStore:
    """The ActivationStore read interface: shards of Gaussian vectors over real rows."""

    def __init__(self, rows: np.ndarray, d: int, shard: int, seed: int):
        n_rows, ctx = rows.shape
        r, p = np.meshgrid(np.arange(n_rows), np.arange(1, ctx), indexing="ij")
        self._index = np.stack([r.ravel(), p.ravel()], 1).astype(np.int64)  # BOS not stored
        self.n_tokens = len(self._index)
        g = torch.Generator().manual_seed(seed)
        self.x = torch.randn(self.n_tokens, d, generator=g)
        self._rows, self._shard = rows, shard
        self.num_shards = -(-self.n_tokens // shard)

    def activations_f32(self, i):
        return self.x[i * self._shard:(i + 1) * self._shard].clone()

    def index(self, i):
        return self._index[i * self._shard:(i + 1) * self._shard]

    def rows(self):
        return self._rows

    def gather(self, ids, *, normalise=True):
        return self.x[torch.as_tensor(np.asarray(ids))]


def spanish_rows(n_tokens: int, ctx: int) -> np.ndarray:
    tok = load_llama3_tokenizer()
    ids: list[int] = []
    with open(REPO / "data/sample/spanish_novels_cligs.jsonl", encoding="utf-8") as f:
        for line in f:
            ids += tok.encode(json.loads(line)["text"], add_special_tokens=False)
            if len(ids) >= n_tokens * 1.1:
                break
    body = ctx - 1
    n_rows = n_tokens // body
    rows = np.zeros((n_rows, ctx), dtype=np.uint32)
    rows[:, 0] = BOS_ID
    rows[:, 1:] = np.asarray(ids[:n_rows * body], dtype=np.uint32).reshape(n_rows, body)
    return rows


def random_sae(store: SyntheticStore, d_sae: int, l0: float, seed: int) -> SAE:
    torch.manual_seed(seed)
    cfg = dataclasses.replace(SAECfg(), architecture="jumprelu", d_sae=d_sae,
                              theta_param="raw", decoder_norm="unit")
    sae = SAE(store.x.shape[1], d_sae, cfg)
    with torch.no_grad():
        sae.W_enc.normal_(0, store.x.shape[1] ** -0.5)
        sae.b_enc.zero_()
        sae.b_dec.zero_()
        # Per-latent thresholds at the (1 - p) quantile of its pre-activations: a spread of
        # firing rates around l0 / d_sae, like a trained SAE's (log-uniform over 2 decades).
        z = sae.pre_acts(store.x[:4096])
        rate = (l0 / d_sae) * np.exp(np.random.default_rng(seed).uniform(-2.3, 2.3, d_sae))
        q = torch.as_tensor(1 - np.clip(rate, 1e-4, 0.5), dtype=torch.float32)
        sae.raw_threshold.copy_(torch.stack([z[:, j].quantile(q[j]) for j in range(d_sae)]))
    return sae.eval()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--d-in", type=int, default=2048)
    ap.add_argument("--d-sae", type=int, default=16384)
    ap.add_argument("--l0", type=float, default=64.0)
    ap.add_argument("--ctx", type=int, default=1024)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)
    cfg = dataclasses.replace(load_params(REPO / "params.yaml").interpret,
                              n_latents=args.d_sae, backend="none")
    dev = torch.device("cpu")
    t = {}

    t0 = time.perf_counter()
    rows = spanish_rows(args.tokens, args.ctx)
    store = SyntheticStore(rows, args.d_in, shard=65536, seed=args.seed)
    sae = random_sae(store, args.d_sae, args.l0, args.seed)
    t["setup (not the stage)"] = time.perf_counter() - t0

    spec = SampleSpec(window=cfg.window, n_top=cfg.n_top, n_explain=cfg.n_explain,
                      n_quantiles=cfg.n_quantiles, n_per_quantile=cfg.n_per_quantile,
                      n_random=cfg.n_random, min_activations=cfg.min_activations)
    t0 = time.perf_counter()
    pool = pool_for(args.d_sae, cfg.n_latents, cfg.latent_selection,
                    np.random.default_rng(args.seed))
    found = scan(store, sae, pool, device=dev, seed=args.seed,
                 n_strongest=max(cfg.n_top, cfg.n_explain + 1) * STRONGEST_PER_WINDOW,
                 n_sample=max(256, SAMPLE_PER_WINDOW * cfg.n_quantiles * cfg.n_per_quantile))
    t["scan (one encode of the store)"] = time.perf_counter() - t0
    latents = found.choose(cfg.n_latents, cfg.latent_selection)

    t0 = time.perf_counter()
    pos_ids = position_ids(store)
    index = np.argwhere(pos_ids >= 0)[np.argsort(pos_ids[pos_ids >= 0], kind="stable")]
    silent = SilentPool(store, sae, pos_ids, n_windows=SILENT_POOL_WINDOWS, width=cfg.window,
                        device=dev, seed=args.seed)
    t["silent pool"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    samples = []
    for i in latents:
        rng = np.random.default_rng([args.seed, i])
        samples.append(sample_latent(i, found.hits(i), store.n_tokens, index, rows, spec, rng,
                                     silent.silent(i, rng)))
    t["window choice"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    fill_window_acts(samples, store, sae, pos_ids, found.kth, dev)
    t["window activations"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    llm = explainer(cfg)
    est = estimate_all(samples, token_bytes_table(load_llama3_tokenizer()), cfg,
                       seed=args.seed, counter=token_counter(cfg.model), llm=llm, batch=True)
    t["cost estimate"] = time.perf_counter() - t0

    live = sum(not s.skipped for s in samples)
    flops = 2 * args.d_in * args.d_sae
    print(f"\nstore: {store.n_tokens:,} tokens x d_in {args.d_in}; SAE d_sae {args.d_sae:,}, "
          f"mean L0 {found.counts.sum() / store.n_tokens:.1f}; {len(latents):,} latents "
          f"selected ({cfg.latent_selection}), {live:,} with windows, "
          f"{len(samples) - live:,} skipped (too few hits)")
    print("\n| step | seconds here |\n|---|---|")
    for k, v in t.items():
        print(f"| {k} | {v:.1f} |")
    print(f"\nscan encode: {flops * store.n_tokens:.2e} FLOPs here; "
          f"{flops * PROFILE_STORE_TOKENS:.2e} for the profile's {PROFILE_STORE_TOKENS:,} "
          f"stored tokens ({flops * PROFILE_STORE_TOKENS / 989e12:.1f} s at an H100's bf16 "
          "peak; the scan is the only step that grows with the store)")
    print(f"memory: samples kept by the scan {found.nbytes / 2**20:.0f} MiB for "
          f"{len(pool):,} latents ({found.top_idx.shape[1]} strongest + "
          f"{found.sample_idx.shape[1]} sampled hits each, 12 bytes per entry; independent of "
          f"the store's length); process peak RSS "
          f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB "
          f"(the synthetic store itself is {store.x.numel() * 4 / 2**30:.2f} GiB)")
    print(f"\ncost of explaining + scoring all {live:,} latents with {cfg.model} "
          f"(reasoning effort {llm.reasoning_effort}) through the Batch API: "
          f"<= ${est.usd:.2f} ({est.describe()}); target <= $30")


if __name__ == "__main__":
    main()
