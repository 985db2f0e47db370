"""Latent activations over the activation store: which latents to explain, and where they fire.

One encode of the store (`scan`) counts how often every latent fires and keeps, for a pool
of candidate latents, its strongest tokens and a uniform sample of the tokens where it
fired (the smallest random keys among its hits: a bottom-k sample, mergeable chunk by
chunk). Memory is bounded by the pool's samples, pool x (n_strongest + n_sample) x 12
bytes, whatever the store's length; keeping every hit instead would cost n_tokens x L0
entries. The chosen windows' activations are then computed for their latent only
(`fill_window_acts`: a dot product per token, not a second encode), and random windows
come from a small shared set of windows encoded in full (`SilentPool`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch

from ..core.progress import Progress
from .sampling import Hits, LatentSamples, Window

ENCODE_ROWS = 4096  # tokens per SAE forward: bounds the dense [rows, d_sae] buffer
PAIR_CHUNK = 16384  # (token, latent) activations computed per step in fill_window_acts
# Strongest tokens kept per top window wanted: enough distinct windows survive even when a
# latent fires on runs of adjacent tokens (one window per run is used).
STRONGEST_PER_WINDOW = 16
SAMPLE_PER_WINDOW = 16  # sampled hits per quantile window wanted (at least 256)
SILENT_POOL_WINDOWS = 1024  # shared random windows (x window tokens encoded in full)


def _pre_and_acts(sae, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    z = sae.pre_acts(x)
    return z, sae.activate(z)


def _kth(sae, z: torch.Tensor) -> torch.Tensor | None:
    """A TopK SAE keeps latent j at a token iff its pre-activation is among the token's k
    largest: the midpoint between the k-th and the (k+1)-th, kept per token, lets one
    latent's activation be computed alone (robust to the rounding of a one-column product)."""
    if sae.arch != "topk":
        return None
    k = sae.cfg.k
    if k >= z.shape[-1]:
        return torch.full(z.shape[:-1], float("-inf"), device=z.device)
    v = z.topk(k + 1, dim=-1).values
    return (v[:, -2] + v[:, -1]) / 2


def pool_for(d_sae: int, n: int, how: str, rng: np.random.Generator) -> np.ndarray:
    """Latents the scan keeps samples of, in the order they are chosen from.

    random: a seeded permutation, with room for twice n so the first n live ones are in it
    when up to half are dead; top_density: every latent (the counts decide after the scan);
    first: latents 0..n-1.
    """
    if how == "first":
        return np.arange(min(n, d_sae))
    if how == "random":
        return rng.permutation(d_sae)[:min(d_sae, 2 * n)]
    return np.arange(d_sae)


@dataclass
class Scan:
    counts: np.ndarray  # [d_sae] stored tokens each latent fires on
    pool: np.ndarray  # [P] latents with samples, in choice order
    top_idx: np.ndarray  # [P, M] global token ids of the strongest activations
    top_val: np.ndarray  # [P, M] their values, strongest first (0: fewer hits than M)
    sample_idx: np.ndarray  # [P, R] a uniform sample of the tokens where it fired
    sample_val: np.ndarray  # [P, R] (0: fewer hits than R)
    kth: np.ndarray | None  # [n_tokens] TopK SAEs: each token's cut between kept and not

    def choose(self, n: int, how: str) -> list[int]:
        if how == "top_density":
            return [int(i) for i in np.argsort(-self.counts, kind="stable")[:n]]
        if how == "random":  # the first n live ones of the seeded draw, in id order
            return sorted([int(i) for i in self.pool if self.counts[i] > 0][:n])
        return [int(i) for i in self.pool[:n]]

    def hits(self, latent: int) -> Hits:
        p = int(np.flatnonzero(self.pool == latent)[0])
        top, smp = self.top_val[p] > 0, self.sample_val[p] > 0
        return Hits(int(self.counts[latent]), self.top_idx[p][top], self.top_val[p][top],
                    self.sample_idx[p][smp], self.sample_val[p][smp])

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.top_idx, self.top_val, self.sample_idx,
                                      self.sample_val))


def _keep(vals: torch.Tensor, ids: torch.Tensor, extra: torch.Tensor | None, k: int):
    """The k largest of `vals` [P, m] per row, with the ids (and extra values) beside them."""
    k = min(k, vals.shape[1])
    v, pos = vals.topk(k, dim=1)
    return v, ids.gather(1, pos), None if extra is None else extra.gather(1, pos)


def scan(store, sae, pool: np.ndarray, *, n_strongest: int, n_sample: int,
         device: torch.device, seed: int) -> Scan:
    """One pass over the store: firing counts of every latent; for the pool, strongest
    tokens and a uniform sample of hits (see the module docstring)."""
    cols = torch.as_tensor(pool, device=device, dtype=torch.long)
    P = len(pool)
    top_v = torch.zeros(P, 0, device=device)
    top_i = torch.zeros(P, 0, dtype=torch.int64, device=device)
    key = torch.zeros(P, 0, device=device)  # negated random keys: largest = smallest key
    smp_i = torch.zeros(P, 0, dtype=torch.int64, device=device)
    smp_v = torch.zeros(P, 0, device=device)
    gen = torch.Generator(device=device).manual_seed(seed)
    counts = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    kth_parts: list[np.ndarray] = []
    offset = 0
    with torch.no_grad():
        bar = Progress("latent scan", store.num_shards, unit="shard",
                       rate_per=store.n_tokens / max(store.num_shards, 1))
        for shard in range(store.num_shards):
            x = store.activations_f32(shard)
            for s in range(0, len(x), ENCODE_ROWS):
                z, f = _pre_and_acts(sae, x[s:s + ENCODE_ROWS].to(device, torch.float32))
                kth = _kth(sae, z)
                if kth is not None:
                    kth_parts.append(kth.cpu().numpy())
                counts += (f > 0).sum(0)
                sub = f.index_select(1, cols).t()  # [P, rows]
                ids = (torch.arange(len(sub[0]), device=device) + offset + s).expand(P, -1)
                top_v, top_i, _ = _keep(torch.cat([top_v, sub], 1),
                                        torch.cat([top_i, ids], 1), None, n_strongest)
                u = torch.rand(sub.shape, generator=gen, device=device)
                u = torch.where(sub > 0, -u, torch.full_like(u, -2.0))  # unfired never kept
                key, smp_i, smp_v = _keep(torch.cat([key, u], 1), torch.cat([smp_i, ids], 1),
                                          torch.cat([smp_v, sub], 1), n_sample)
            offset += len(x)
            bar.update()
        bar.close()
    smp_v = torch.where(key > -2.0, smp_v, torch.zeros_like(smp_v))
    return Scan(counts.cpu().numpy(), np.asarray(pool), top_i.cpu().numpy(),
                top_v.float().cpu().numpy(), smp_i.cpu().numpy(), smp_v.float().cpu().numpy(),
                np.concatenate(kth_parts) if kth_parts else None)


class ColumnEncoder:
    """Activations of given latents at given inputs, computed for those latents alone: the
    inputs times their encoder columns (a [tokens, latents] product, not all d_sae)."""

    def __init__(self, sae):
        W_enc, b_enc = sae.encoder()
        self.rows = W_enc.t().contiguous()  # [d_sae, d_in]: a latent's column, gathered cheaply
        self.bias = b_enc - sae.b_dec @ W_enc
        self.topk = sae.arch == "topk"
        self.theta = None if self.topk else sae.threshold

    def __call__(self, x: torch.Tensor, latents: torch.Tensor, row: torch.Tensor,
                 col: torch.Tensor, kth: torch.Tensor | None) -> torch.Tensor:
        """Activation of latents[col[i]] at x[row[i]], for every i."""
        pre = (x @ self.rows.index_select(0, latents).t())[row, col] + self.bias[latents][col]
        if self.topk:
            return torch.where(pre > kth, pre.relu(), torch.zeros_like(pre))
        return torch.where(pre > self.theta[latents][col], pre, torch.zeros_like(pre))


def position_ids(store) -> np.ndarray:
    """[n_rows, context_len] global id of the stored token at each row position, -1 where
    the store holds none (BOS, excluded tokens)."""
    rows = store.rows()
    out = np.full(rows.shape, -1, dtype=np.int64)
    offset = 0
    for i in range(store.num_shards):
        idx = np.asarray(store.index(i), dtype=np.int64)
        out[idx[:, 0], idx[:, 1]] = np.arange(offset, offset + len(idx))
        offset += len(idx)
    return out


def fill_window_acts(samples: list[LatentSamples], store, sae, pos_ids: np.ndarray,
                     kth: np.ndarray | None, device: torch.device) -> None:
    """Compute each top and quantile window's activations of its latent, in store order
    (sorted token ids read each shard's memmap forward) and in bounded chunks."""
    windows: list[tuple[int, Window]] = [(s.latent, w) for s in samples if not s.skipped
                                         for w in s.top + s.quantiles]
    if not windows:
        return
    # One flat buffer; each window's acts is a view into it, filled by one scatter per chunk.
    sizes = np.array([len(w.tokens) for _, w in windows])
    starts = np.concatenate([[0], np.cumsum(sizes)])
    flat = np.zeros(starts[-1], dtype=np.float32)
    ids = np.concatenate([pos_ids[w.row, w.start:w.start + len(w.tokens)] for _, w in windows])
    lat = np.repeat([latent for latent, _ in windows], sizes)
    for k, (_, w) in enumerate(windows):
        w.acts = flat[starts[k]:starts[k + 1]]
    slots = np.flatnonzero(ids >= 0)  # BOS and excluded positions stay 0
    # By latent, then token: a chunk holds few latents, so its activations are one small
    # product of the chunk's distinct tokens with those latents' columns.
    slots = slots[np.lexsort((ids[slots], lat[slots]))]
    with torch.no_grad():
        column_acts = ColumnEncoder(sae)
        for c in range(0, len(slots), PAIR_CHUNK):
            sel = slots[c:c + PAIR_CHUNK]
            toks, row = np.unique(ids[sel], return_inverse=True)
            lats, col = np.unique(lat[sel], return_inverse=True)
            x = store.gather(toks, normalise=False).to(device)
            kt = None if kth is None else torch.as_tensor(kth[ids[sel]], device=device)
            flat[sel] = column_acts(x, torch.as_tensor(lats, device=device),
                                    torch.as_tensor(row, device=device),
                                    torch.as_tensor(col, device=device), kt).cpu().numpy()


class SilentPool:
    """A shared set of random windows, encoded in full once, from which each latent draws
    its random windows among those where it is silent (exact, and no per-latent search)."""

    def __init__(self, store, sae, pos_ids: np.ndarray, *, n_windows: int, width: int,
                 device: torch.device, seed: int):
        rng = np.random.default_rng([seed, 1])
        n_rows, ctx = pos_ids.shape
        width = min(width, ctx)
        self.starts = np.stack([rng.integers(n_rows, size=n_windows),
                                rng.integers(ctx - width + 1, size=n_windows)], 1)
        ids = np.stack([pos_ids[r, s:s + width] for r, s in self.starts])  # [W, width]
        stored = ids >= 0
        flat = np.unique(ids[stored])
        fired: list[np.ndarray] = []  # per chunk of flat: [k, 2] (token position in flat, latent)
        with torch.no_grad():
            for c in range(0, len(flat), ENCODE_ROWS):
                f = sae.encode(store.gather(flat[c:c + ENCODE_ROWS], normalise=False).to(device))
                nz = torch.nonzero(f > 0).cpu().numpy()
                nz[:, 0] += c
                fired.append(nz)
        nz = np.concatenate(fired) if fired else np.zeros((0, 2), dtype=np.int64)
        # Window membership of each token of `flat` (a token may sit in several windows).
        w_of, t_of = np.nonzero(stored)
        pos_in_flat = np.searchsorted(flat, ids[w_of, t_of])
        by_token = np.argsort(pos_in_flat, kind="stable")
        lo = np.searchsorted(pos_in_flat[by_token], nz[:, 0], side="left")
        hi = np.searchsorted(pos_in_flat[by_token], nz[:, 0], side="right")
        n = hi - lo
        hit = np.repeat(np.arange(len(nz)), n)
        j = lo[hit] + np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
        arr = np.unique(np.stack([w_of[by_token[j]], nz[hit, 1]], 1).astype(np.int64), axis=0)
        order = np.argsort(arr[:, 1], kind="stable")
        self._lat, self._win = arr[order, 1], arr[order, 0]

    def silent(self, latent: int, rng: np.random.Generator) -> Iterator[tuple[int, int]]:
        """Starts of the pool's windows where `latent` never fires, in a random order."""
        lo, hi = np.searchsorted(self._lat, [latent, latent + 1])
        loud = np.zeros(len(self.starts), dtype=bool)
        loud[self._win[lo:hi]] = True
        for w in rng.permutation(np.flatnonzero(~loud)):
            yield int(self.starts[w, 0]), int(self.starts[w, 1])
