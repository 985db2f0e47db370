"""Decoding keeps Spanish characters whole; the sampler surfaces a planted feature."""
from __future__ import annotations

import numpy as np
import torch
from conftest import CTX, SPEC, WORD

from saelab.interpret.decode import activation_mask, char_values, highlight, render
from saelab.interpret.latents import (firing_counts, latent_activations, select_latents,
                                      store_index)
from saelab.interpret.sampling import window_bounds


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
    from saelab.interpret.sampling import sample_latent

    idx, vals = corpus["latents"][5]
    a, b = (sample_latent(5, idx, vals, corpus["n_tokens"], corpus["index"], corpus["rows"],
                          SPEC, np.random.default_rng([0, 5])) for _ in range(2))
    assert [(w.row, w.start) for w in a.quantiles + a.random] == \
           [(w.row, w.start) for w in b.quantiles + b.random]


class _Store:
    """The ActivationStore read interface over in-memory shards."""

    def __init__(self, x: torch.Tensor, index: np.ndarray, shard: int):
        self.parts = [(x[i:i + shard], index[i:i + shard]) for i in range(0, len(x), shard)]
        self.num_shards = len(self.parts)

    def activations_f32(self, i):
        return self.parts[i][0].clone()

    def index(self, i):
        return self.parts[i][1]


class _SAE:
    def __init__(self, W: torch.Tensor):
        self.W = W

    def encode(self, x):
        return torch.relu(x @ self.W - 0.5)


def test_latent_activations_match_a_dense_encode():
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5000, 8, generator=g), torch.randn(8, 12, generator=g)
    index = np.stack([np.arange(5000) // CTX, np.arange(5000) % CTX], 1)
    store, sae = _Store(x, index, shard=1500), _SAE(W)
    dense = sae.encode(x)
    counts = firing_counts(store, sae, torch.device("cpu"))
    assert counts.tolist() == (dense > 0).sum(0).tolist()
    top = select_latents(counts, 3, "top_density", np.random.default_rng(0))
    assert top == np.argsort(-counts, kind="stable")[:3].tolist()
    assert select_latents(counts, 3, "first", np.random.default_rng(0)) == [0, 1, 2]
    got = latent_activations(store, sae, [top[0], 4], torch.device("cpu"))
    for j in (top[0], 4):
        idx, vals = got[j]
        want = torch.nonzero(dense[:, j] > 0).squeeze(1).numpy()
        assert idx.tolist() == want.tolist()
        assert np.allclose(vals, dense[want, j].numpy())
    assert (store_index(store) == index).all()
