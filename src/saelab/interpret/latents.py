"""Latent activations over the activation store: which latents to explain, and where they fire.

Two passes over the store through the SAE: the first counts how often every latent fires
(for the selection and the firing densities), the second keeps, for the chosen latents
only, the tokens where they fire. Keeping everything sparse in one pass would cost
n_tokens x L0 entries; two passes cost one extra encode of the store.
"""
from __future__ import annotations

from typing import Iterator

import numpy as np
import torch
from tqdm import tqdm

ENCODE_ROWS = 4096  # tokens per SAE forward: bounds the dense [rows, d_sae] buffer


def _encoded(store, sae, device: torch.device, desc: str) -> Iterator[tuple[int, torch.Tensor]]:
    """(global offset, latent activations [rows, d_sae]) over the whole store."""
    offset = 0
    with torch.no_grad():
        for shard in tqdm(range(store.num_shards), desc=desc, disable=None):
            x = store.activations_f32(shard)
            for s in range(0, len(x), ENCODE_ROWS):
                chunk = x[s:s + ENCODE_ROWS].to(device, torch.float32)
                yield offset + s, sae.encode(chunk)
            offset += len(x)


def firing_counts(store, sae, device: torch.device) -> np.ndarray:
    """How many stored tokens each latent fires on."""
    counts = None
    for _, f in _encoded(store, sae, device, "firing counts"):
        c = (f > 0).sum(0)
        counts = c if counts is None else counts + c
    return counts.cpu().numpy().astype(np.int64)


def select_latents(counts: np.ndarray, n: int, how: str, rng: np.random.Generator) -> list[int]:
    n = min(n, len(counts))
    if how == "first":
        return list(range(n))
    if how == "random":
        return sorted(int(i) for i in rng.choice(len(counts), size=n, replace=False))
    # top_density: the latents that fire most often (a dead latent only if too few fire)
    return [int(i) for i in np.argsort(-counts, kind="stable")[:n]]


def latent_activations(store, sae, latents: list[int],
                       device: torch.device) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """For each latent: global ids of the stored tokens where it fires, and the values."""
    cols = torch.tensor(latents, device=device)
    parts: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {i: [] for i in latents}
    for offset, f in _encoded(store, sae, device, "latent activations"):
        # Transposed, nonzero comes out grouped by latent (rows ascending within each):
        # one split per chunk instead of a scan of all hits per latent.
        sub = f.index_select(1, cols).t()
        which, rows = torch.nonzero(sub > 0, as_tuple=True)
        vals = sub[which, rows].float().cpu().numpy()
        rows = rows.cpu().numpy() + offset
        bounds = torch.bincount(which, minlength=len(latents)).cumsum(0)[:-1].cpu().numpy()
        for latent, r, v in zip(latents, np.split(rows, bounds), np.split(vals, bounds)):
            if len(r):
                parts[latent].append((r, v))
    out = {}
    for latent, ps in parts.items():
        if ps:
            out[latent] = (np.concatenate([p[0] for p in ps]), np.concatenate([p[1] for p in ps]))
        else:
            out[latent] = (np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float32))
    return out


def store_index(store) -> np.ndarray:
    """(row, position) of every stored token, in store order: [n_tokens, 2] int64."""
    return np.concatenate([np.asarray(store.index(i), dtype=np.int64)
                           for i in range(store.num_shards)])
