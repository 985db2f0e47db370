"""Pick the example windows of one latent: pure numpy over the store's arrays.

A latent's activations arrive sparse (global token ids and values of the tokens where it
fired). Windows of `window` tokens come from the packed rows, so they also show the BOS
and outlier positions the store left out. Every window is centred a little right of its
peak token (a causal model's latent depends on what came before). Windows never overlap
one another, so the examples the explainer sees (the top activations) share no text with
the ones the scorers test (activation-quantile bins plus random windows where the latent
is silent).
"""
from __future__ import annotations

from dataclasses import dataclass, field

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


@dataclass(frozen=True)
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


def sample_latent(latent: int, token_idx: np.ndarray, values: np.ndarray, n_tokens: int,
                  index: np.ndarray, rows: np.ndarray, spec: SampleSpec,
                  rng: np.random.Generator) -> LatentSamples:
    """Top, quantile and random windows for one latent.

    token_idx/values: the stored tokens (global ids into `index`) where the latent fired
    (> 0) and its activation there. index: [n_tokens, 2] (row, position) of every stored
    token. rows: [n_rows, context_len] packed token ids.
    """
    values = np.asarray(values, dtype=np.float32)
    fired = values > 0
    token_idx, values = np.asarray(token_idx)[fired], values[fired]
    out = LatentSamples(latent, int(len(values)), n_tokens,
                        float(values.max()) if len(values) else 0.0)
    if len(values):
        counts, edges = np.histogram(values, bins=40)
        out.hist_counts, out.hist_edges = counts.tolist(), edges.tolist()
    if len(values) < spec.min_activations:
        out.skipped = f"fired on {len(values)} tokens (< min_activations = {spec.min_activations})"
        return out

    ctx = rows.shape[1]
    row_of, pos_of = index[token_idx, 0].astype(np.int64), index[token_idx, 1].astype(np.int64)
    lookup = _Latent(row_of * ctx + pos_of, values, ctx)
    # One candidate per (row, window-sized bucket): its peak token. Adjacent tokens of one
    # occurrence would otherwise fill the top list with near-copies of the same text.
    bucket = row_of * (ctx // spec.window + 1) + pos_of // spec.window
    order = np.lexsort((-values, bucket))
    first = np.ones(len(order), dtype=bool)
    first[1:] = bucket[order][1:] != bucket[order][:-1]
    cand = order[first]
    cand = cand[np.argsort(-values[cand], kind="stable")]  # strongest first

    def make(c: int, used: _Occupied, kind: str, q: int = -1) -> Window | None:
        row, pos = int(row_of[c]), int(pos_of[c])
        s, e = window_bounds(pos, spec.window, ctx)
        if not used.free(row, s, e):
            return None
        used.take(row, s, e)
        return Window(row, s, rows[row, s:e].copy(), lookup.acts(row, s, e), kind, q)

    # One window more than the explainer takes, so at least one is left for scoring.
    n_top = max(spec.n_top, spec.n_explain + 1)
    used = _Occupied()
    for c in cand:
        if len(out.top) == n_top:
            break
        w = make(int(c), used, "top")
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
    # Quantile bins of equal count over the candidates, weakest bin first.
    by_value = cand[::-1]
    for q, chunk in enumerate(np.array_split(by_value, spec.n_quantiles)):
        picked = 0
        for c in rng.permutation(chunk):
            if picked == spec.n_per_quantile:
                break
            w = make(int(c), used, "quantile", q)
            if w is not None:
                out.quantiles.append(w)
                picked += 1

    # Random windows where the latent is silent; bounded tries, so a latent that fires
    # almost everywhere gets fewer of them rather than a long search.
    width = min(spec.window, ctx)
    for _ in range(spec.n_random * 20):
        if len(out.random) == spec.n_random:
            break
        row = int(rng.integers(rows.shape[0]))
        s = int(rng.integers(ctx - width + 1))
        e = s + width
        if lookup.silent(row, s, e) and used.free(row, s, e):
            used.take(row, s, e)
            out.random.append(Window(row, s, rows[row, s:e].copy(),
                                     np.zeros(width, dtype=np.float32), "random"))
    return out
