"""Pick the example windows of one latent: pure numpy over the store's arrays.

A latent's activations arrive as `Hits`: its strongest stored tokens and a uniform sample
of all the tokens where it fired (what one pass over the store keeps, `latents.scan`), or
every hit when they are all at hand (`Hits.every`). Windows of `window` tokens come from the packed rows, so they also show the BOS
and outlier positions the store left out. Every window is centred a little right of its
peak token (a causal model's latent depends on what came before). Windows never overlap
one another, so the examples the explainer sees (the top activations) share no text with
the ones the scorers test (activation-quantile bins plus random windows where the latent
is silent).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np


@dataclass(frozen=True)
class SampleSpec:
    window: int = 32
    n_top: int = 20
    n_explain: int = 10
    n_quantiles: int = 10
    n_per_quantile: int = 2
    n_random: int = 20
    min_activations: int = 10


@dataclass
class Window:
    row: int
    start: int
    tokens: np.ndarray  # token ids of the window
    acts: np.ndarray  # the latent's activation at each window token (0 where silent)
    kind: str  # "top" | "quantile" | "random"
    quantile: int = -1  # bin for "quantile" windows: 0 lowest .. n_quantiles-1 highest

    @property
    def max_act(self) -> float:
        return float(self.acts.max()) if len(self.acts) else 0.0


@dataclass
class LatentSamples:
    latent: int
    n_fired: int
    n_tokens: int
    max_act: float
    hist_counts: list[int] = field(default_factory=list)
    hist_edges: list[float] = field(default_factory=list)
    top: list[Window] = field(default_factory=list)  # the first n_explain go to the explainer
    quantiles: list[Window] = field(default_factory=list)
    random: list[Window] = field(default_factory=list)
    n_explain: int = 0
    skipped: str = ""  # why the latent is not explained, or ""

    @property
    def density(self) -> float:
        return self.n_fired / self.n_tokens if self.n_tokens else 0.0

    @property
    def explain(self) -> list[Window]:
        return self.top[:self.n_explain]


class _Occupied:
    """Token ranges already used by a chosen window, per row."""

    def __init__(self):
        self._rows: dict[int, list[tuple[int, int]]] = {}

    def free(self, row: int, s: int, e: int) -> bool:
        return all(e <= a or s >= b for a, b in self._rows.get(row, ()))

    def take(self, row: int, s: int, e: int) -> None:
        self._rows.setdefault(row, []).append((s, e))


def window_bounds(pos: int, window: int, context_len: int) -> tuple[int, int]:
    """[start, end) of the window around a peak at `pos`, inside its row."""
    window = min(window, context_len)
    start = pos - (window - window // 4 - 1)
    start = min(max(start, 0), context_len - window)
    return start, start + window


class _Latent:
    """Lookup of one latent's activation at any (row, position)."""

    def __init__(self, keys: np.ndarray, values: np.ndarray, context_len: int):
        order = np.argsort(keys, kind="stable")
        self.keys, self.values, self.ctx = keys[order], values[order], context_len

    def acts(self, row: int, s: int, e: int) -> np.ndarray:
        lo, hi = np.searchsorted(self.keys, [row * self.ctx + s, row * self.ctx + e])
        out = np.zeros(e - s, dtype=np.float32)
        out[self.keys[lo:hi] - row * self.ctx - s] = self.values[lo:hi]
        return out

    def silent(self, row: int, s: int, e: int) -> bool:
        lo, hi = np.searchsorted(self.keys, [row * self.ctx + s, row * self.ctx + e])
        return lo == hi


@dataclass(frozen=True)
class Hits:
    """What is known of one latent before its windows are chosen: global token ids and
    values of its strongest tokens (strongest first) and of a uniform sample of the tokens
    where it fired, and how often it fired in all."""
    n_fired: int
    top_idx: np.ndarray
    top_val: np.ndarray
    sample_idx: np.ndarray
    sample_val: np.ndarray

    @classmethod
    def every(cls, token_idx: np.ndarray, values: np.ndarray) -> "Hits":
        """All of a latent's hits (values <= 0 are not hits)."""
        values = np.asarray(values, dtype=np.float32)
        keep = values > 0
        idx, val = np.asarray(token_idx, dtype=np.int64)[keep], values[keep]
        order = np.argsort(-val, kind="stable")
        return cls(len(val), idx[order], val[order], idx, val)


def _candidates(idx: np.ndarray, val: np.ndarray, row_of, pos_of, ctx: int,
                window: int) -> np.ndarray:
    """Positions into idx/val: one per (row, window-sized bucket), its peak token, strongest
    first. Adjacent tokens of one occurrence would otherwise fill the list with near-copies
    of the same text."""
    bucket = row_of * (ctx // window + 1) + pos_of // window
    order = np.lexsort((-val, bucket))
    first = np.ones(len(order), dtype=bool)
    first[1:] = bucket[order][1:] != bucket[order][:-1]
    cand = order[first]
    return cand[np.argsort(-val[cand], kind="stable")]


def sample_latent(latent: int, hits: Hits, n_tokens: int, index: np.ndarray, rows: np.ndarray,
                  spec: SampleSpec, rng: np.random.Generator,
                  silent: Iterator[tuple[int, int]],
                  acts: Callable[[int, int, int], np.ndarray] | None = None) -> LatentSamples:
    """Top, quantile and random windows for one latent.

    index: [n_tokens, 2] (row, position) of every stored token. rows: [n_rows, context_len]
    packed token ids. silent: starts (row, s) of windows where the latent is silent, in the
    order to try them. acts(row, s, e): the latent's activations over a window; without it
    windows carry zeros until `latents.fill_window_acts` computes them for all latents at once.
    """
    out = LatentSamples(latent, hits.n_fired, n_tokens,
                        float(hits.top_val[0]) if len(hits.top_val) else 0.0)
    if len(hits.sample_val):
        # From the uniform sample of hits, scaled to all of them (exact when all are kept).
        counts, edges = np.histogram(hits.sample_val, bins=40)
        scaled = np.rint(counts * (hits.n_fired / len(hits.sample_val))).astype(np.int64)
        out.hist_counts, out.hist_edges = scaled.tolist(), edges.tolist()
    if hits.n_fired < spec.min_activations:
        out.skipped = f"fired on {hits.n_fired} tokens (< min_activations = {spec.min_activations})"
        return out

    ctx = rows.shape[1]
    width = min(spec.window, ctx)

    def make(row: int, pos: int, used: _Occupied, kind: str, q: int = -1) -> Window | None:
        s, e = window_bounds(pos, spec.window, ctx)
        if not used.free(row, s, e):
            return None
        used.take(row, s, e)
        a = acts(row, s, e) if acts is not None else np.zeros(e - s, dtype=np.float32)
        return Window(row, s, rows[row, s:e].copy(), a, kind, q)

    def located(idx: np.ndarray, val: np.ndarray):
        r, p = index[idx, 0].astype(np.int64), index[idx, 1].astype(np.int64)
        return r, p, _candidates(idx, val, r, p, ctx, spec.window)

    # One window more than the explainer takes, so at least one is left for scoring.
    n_top = max(spec.n_top, spec.n_explain + 1)
    used = _Occupied()
    r_top, p_top, cand = located(hits.top_idx, hits.top_val)
    for c in cand:
        if len(out.top) == n_top:
            break
        w = make(int(r_top[c]), int(p_top[c]), used, "top")
        if w is not None:
            out.top.append(w)
    out.n_explain = min(spec.n_explain, len(out.top) - 1)
    if out.n_explain < 1:
        out.skipped = "all its activations fall in one window: nothing left to score"
        return out

    # Scoring windows may reuse top windows the explainer did not see, but no text of the
    # ones it did: release the rest of the top list before sampling the quantiles.
    used = _Occupied()
    for w in out.explain:
        used.take(w.row, w.start, w.start + len(w.tokens))
    # Quantile bins of equal count over the sampled hits, weakest bin first.
    r_s, p_s, cand = located(hits.sample_idx, hits.sample_val)
    for q, chunk in enumerate(np.array_split(cand[::-1], spec.n_quantiles)):
        picked = 0
        for c in rng.permutation(chunk):
            if picked == spec.n_per_quantile:
                break
            w = make(int(r_s[c]), int(p_s[c]), used, "quantile", q)
            if w is not None:
                out.quantiles.append(w)
                picked += 1

    # Random windows where the latent is silent (so their activations are all zero).
    for row, s in silent:
        if len(out.random) == spec.n_random:
            break
        if used.free(row, s, s + width):
            used.take(row, s, s + width)
            out.random.append(Window(row, s, rows[row, s:s + width].copy(),
                                     np.zeros(width, dtype=np.float32), "random"))
    return out


def sample_from_hits(latent: int, token_idx: np.ndarray, values: np.ndarray, n_tokens: int,
                     index: np.ndarray, rows: np.ndarray, spec: SampleSpec,
                     rng: np.random.Generator) -> LatentSamples:
    """`sample_latent` when every hit of the latent is known (tests, small stores): window
    activations and silence are looked up, random windows drawn uniformly with bounded
    tries, so a latent that fires almost everywhere gets fewer of them."""
    hits = Hits.every(token_idx, values)
    ctx = rows.shape[1]
    keys = index[hits.sample_idx, 0].astype(np.int64) * ctx + index[hits.sample_idx, 1]
    lookup = _Latent(keys, hits.sample_val, ctx)
    width = min(spec.window, ctx)

    def silent() -> Iterator[tuple[int, int]]:
        for _ in range(spec.n_random * 20):
            row = int(rng.integers(rows.shape[0]))
            s = int(rng.integers(ctx - width + 1))
            if lookup.silent(row, s, s + width):
                yield row, s

    return sample_latent(latent, hits, n_tokens, index, rows, spec, rng, silent(), lookup.acts)
