"""Decoding keeps Spanish characters whole; the sampler surfaces a planted feature."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CTX, SPEC, WORD

from saelab.interpret.decode import activation_mask, char_values, highlight, render
from saelab.interpret.latents import (SilentPool, fill_window_acts, pool_for, position_ids,
                                      scan)
from saelab.interpret.sampling import SampleSpec, sample_latent, window_bounds


def test_whole_window_decoding_keeps_spanish_characters(tokenizer, table):
    text = "Hasta mañana, señor. ¿Qué pasó allá en el año 🙂?"
    ids = tokenizer.encode(text, add_special_tokens=True)
    r = render(ids, table)
    assert r.text == text  # BOS renders as nothing
    assert "\ufffd" not in r.text


def test_a_character_split_across_tokens_stays_whole(tokenizer, table):
    # "ñ" as its two UTF-8 bytes in two byte tokens: per-token decoding prints U+FFFD.
    split = [tokenizer.convert_tokens_to_ids(t) for t in ("Ġma", "Ã", "±", "ana")]
    assert "\ufffd" in tokenizer.decode([split[1]])
    r = render(split, table)
    assert r.text == " mañana" and "\ufffd" not in r.text
    # Marking half of "ñ" marks the whole character; its two tokens share one span.
    assert highlight(r, np.array([0, 1, 0, 0])) == " ma<<ñ>>ana"
    assert r.spans[1].tolist() == r.spans[2].tolist() == [3, 4]
    assert char_values(r, np.array([0, 0, 2.0, 0], dtype=np.float32)).tolist() == [0, 0, 0, 2, 0, 0, 0]
    # Cut by the window's edges: the broken character is dropped, never replaced.
    assert render(split[2:], table).text == "ana"
    assert render(split[:2], table).text == " ma"


def test_highlight_keeps_leading_space_outside_markers(tokenizer, table):
    ids = tokenizer.encode(f"Nos vemos {WORD} temprano", add_special_tokens=False)
    acts = np.array([1.0 if tokenizer.decode([t]) == f" {WORD}" else 0.0 for t in ids])
    assert highlight(render(ids, table), activation_mask(acts, 0.3)) == f"Nos vemos <<{WORD}>> temprano"


def test_window_bounds_stay_inside_the_row():
    assert window_bounds(0, 16, 64) == (0, 16)
    assert window_bounds(63, 16, 64) == (48, 64)
    s, e = window_bounds(30, 16, 64)
    assert e - s == 16 and s < 30 < e - 1  # context mostly before the peak
    assert window_bounds(5, 32, 8) == (0, 8)


def _overlaps(a, b) -> bool:
    return a.row == b.row and a.start < b.start + len(b.tokens) and b.start < a.start + len(a.tokens)


def test_sampler_surfaces_the_planted_feature(samples, corpus, table):
    planted = next(s for s in samples if s.latent == 7)
    assert not planted.skipped
    assert len(planted.top) == SPEC.n_top and planted.n_explain == SPEC.n_explain
    for w in planted.top:
        marked = highlight(render(w.tokens, table), activation_mask(w.acts, 0.3))
        assert f"<<{WORD}>>" in marked and "\ufffd" not in marked
        assert len(w.tokens) == SPEC.window
    assert [w.max_act for w in planted.top] == sorted((w.max_act for w in planted.top), reverse=True)
    assert planted.quantiles and {w.quantile for w in planted.quantiles} == set(range(SPEC.n_quantiles))
    assert len(planted.random) == SPEC.n_random
    for w in planted.random:
        assert not w.acts.any() and corpus["word_id"] not in w.tokens
    # The explainer's windows share no token with any scoring window.
    for e in planted.explain:
        for w in planted.quantiles + planted.random:
            assert not _overlaps(e, w)
    assert planted.density == len(corpus["latents"][7][0]) / corpus["n_tokens"]


def test_latents_with_too_few_activations_are_skipped(samples):
    few = next(s for s in samples if s.latent == 3)
    assert "min_activations" in few.skipped and not few.top


def test_sampling_is_deterministic(corpus):
    from saelab.interpret.sampling import sample_from_hits

    idx, vals = corpus["latents"][5]
    a, b = (sample_from_hits(5, idx, vals, corpus["n_tokens"], corpus["index"], corpus["rows"],
                          SPEC, np.random.default_rng([0, 5])) for _ in range(2))
    assert [(w.row, w.start) for w in a.quantiles + a.random] == \
           [(w.row, w.start) for w in b.quantiles + b.random]


class _Store:
    """The ActivationStore read interface over in-memory shards and rows."""

    def __init__(self, x: torch.Tensor, index: np.ndarray, rows: np.ndarray, shard: int):
        self.x, self._rows = x, rows
        self.parts = [(x[i:i + shard], index[i:i + shard]) for i in range(0, len(x), shard)]
        self.num_shards, self.n_tokens = len(self.parts), len(x)

    def activations_f32(self, i):
        return self.parts[i][0].clone()

    def index(self, i):
        return self.parts[i][1]

    def rows(self):
        return self._rows

    def gather(self, ids, *, normalise=True):
        assert not normalise  # the exported SAE takes raw activations
        return self.x[torch.as_tensor(ids)]


def _sae(arch: str):
    import dataclasses

    from saelab.core.config import SAECfg
    from saelab.sae.autoencoder import SAE

    torch.manual_seed(0)
    cfg = dataclasses.replace(SAECfg(), architecture=arch, d_sae=24, k=3, theta_param="raw",
                              decoder_norm="unit")
    sae = SAE(8, 24, cfg)
    with torch.no_grad():
        sae.W_enc.normal_()
        sae.b_enc.fill_(-0.8)
        if arch == "jumprelu":
            sae.raw_threshold.fill_(0.5)
    return sae.eval()


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_one_pass_matches_a_dense_encode(arch):
    """Counts, strongest tokens, the hit sample and every window's activations from the
    one-pass scan equal what a dense encode of the whole store gives."""
    n_rows, ctx = 60, 40
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n_rows * (ctx - 1), 8, generator=g)
    r, p = np.meshgrid(np.arange(n_rows), np.arange(1, ctx), indexing="ij")
    index = np.stack([r.ravel(), p.ravel()], 1).astype(np.int64)  # position 0 not stored
    rows = np.random.default_rng(0).integers(1, 500, size=(n_rows, ctx)).astype(np.uint32)
    store, sae = _Store(x, index, rows, shard=700), _sae(arch)
    with torch.no_grad():
        dense = sae.encode(x)
    cpu = torch.device("cpu")
    pool = pool_for(24, 6, "random", np.random.default_rng(0))
    assert len(pool) == 12 and len(set(pool.tolist())) == 12
    found = scan(store, sae, pool, n_strongest=50, n_sample=64, device=cpu, seed=0)
    assert found.counts.tolist() == (dense > 0).sum(0).tolist()
    chosen = found.choose(6, "random")
    assert chosen == sorted([int(i) for i in pool if found.counts[i] > 0][:6])
    assert found.choose(3, "top_density") == np.argsort(-found.counts, kind="stable")[:3].tolist()
    for j in chosen:
        hits, col = found.hits(j), dense[:, j].numpy()
        fired = np.flatnonzero(col > 0)
        assert hits.n_fired == len(fired)
        assert np.allclose(hits.top_val, np.sort(col[fired])[::-1][:50], atol=1e-5)
        assert np.allclose(col[hits.top_idx], hits.top_val, atol=1e-5)
        assert len(hits.sample_idx) == min(64, len(fired))  # without replacement
        assert len(set(hits.sample_idx.tolist())) == len(hits.sample_idx)
        assert (col[hits.sample_idx] > 0).all() and np.allclose(col[hits.sample_idx], hits.sample_val)
    # Windows: activations computed per latent equal the dense encode at every stored token.
    pos_ids = position_ids(store)
    assert (pos_ids[index[:, 0], index[:, 1]] == np.arange(len(index))).all()
    assert (pos_ids[:, 0] == -1).all()
    silent = SilentPool(store, sae, pos_ids, n_windows=64, width=8, device=cpu, seed=0)
    spec = SampleSpec(window=8, n_top=4, n_explain=2, n_quantiles=2, n_per_quantile=2,
                      n_random=3, min_activations=3)
    samples = []
    for j in chosen:
        rng = np.random.default_rng([0, j])
        samples.append(sample_latent(j, found.hits(j), store.n_tokens, index, rows, spec, rng,
                                     silent.silent(j, rng)))
    fill_window_acts(samples, store, sae, pos_ids, found.kth, cpu)
    checked = 0
    for smp in samples:
        for w in smp.top + smp.quantiles + smp.random:
            ids = pos_ids[w.row, w.start:w.start + len(w.tokens)]
            want = np.where(ids >= 0, dense[np.maximum(ids, 0), smp.latent].numpy(), 0.0)
            assert np.allclose(w.acts, want, atol=1e-5), (smp.latent, w.kind)
            checked += 1
        assert all(not w.acts.any() for w in smp.random)  # silent by the dense encode too
        if smp.top:
            assert smp.top[0].max_act == pytest.approx(smp.max_act, abs=1e-5)
    assert checked > 20 and sum(len(smp.random) for smp in samples) >= 6
