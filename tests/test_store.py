"""The activation store format: writer, resume bookkeeping, reader, batches, verification."""
import json

import numpy as np
import pytest
import torch

from saelab.core.errors import SaelabError
from saelab.core.integrity import seal
from saelab.activations.store import ActivationStore, StoreWriter, sha256_file
from saelab.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE

CTX, D, ROWS_PER_BATCH = 16, 8, 4
N_ROWS = 40
N_TOKENS = N_ROWS * (CTX - 1) - 7  # the last row is only partly stored


def synthetic(seed=0):
    """Rows with ids above 65535 and EOS inside; vectors for every non-special token."""
    rng = np.random.default_rng(seed)
    rows = rng.integers(60000, BOS_ID, size=(N_ROWS, CTX)).astype(np.uint32)
    rows[:, 0] = BOS_ID
    rows[3, 5] = rows[17, 9] = EOS_ID
    return rows, rng


def batches(rows, rng, dtype):
    """What the extractor hands the writer: one tuple per forward of ROWS_PER_BATCH rows."""
    for r0 in range(0, N_ROWS, ROWS_PER_BATCH):
        blk = rows[r0:r0 + ROWS_PER_BATCH]
        r, p = np.nonzero((blk != BOS_ID) & (blk != EOS_ID))
        acts = torch.from_numpy(rng.normal(size=(len(r), D)).astype(np.float32) * 3)
        if dtype == "bfloat16":
            acts = acts.bfloat16()
        bits = (acts.view(torch.uint16) if dtype == "bfloat16" else acts).numpy()
        yield (r0, blk, bits, blk[r, p], np.stack([r0 + r, p], 1).astype(np.int64),
               acts.float().norm(dim=1).numpy())


def write(path, *, dtype="float32", seed=0, stop_after=None, shard_tokens=100):
    rows, rng = synthetic(seed)
    w = StoreWriter(path, fingerprint=f"fp-{dtype}-{seed}", d=D, dtype=dtype, n_tokens=N_TOKENS,
                    shard_tokens=shard_tokens, context_len=CTX)
    all_batches = list(batches(rows, rng, dtype))
    for i, b in enumerate(all_batches):
        if stop_after is not None and i == stop_after:
            w.abort()
            return w, all_batches
        if b[0] + ROWS_PER_BATCH > w.resume_row:
            w.add(*b)
    m = w.finalize({"model": "synthetic", "revision": None, "layer": 8, "hook": "mlp_out"},
                   vocab_size=VOCAB_SIZE, special_ids=range(BOS_ID, VOCAB_SIZE), bos_id=BOS_ID,
                   eos_id=EOS_ID)
    return m, all_batches


@pytest.fixture
def store(tmp_path):
    m, _ = write(tmp_path / "s")
    return ActivationStore(tmp_path / "s")


def test_round_trip(tmp_path):
    m, all_batches = write(tmp_path / "s")
    s = ActivationStore(tmp_path / "s")
    assert (s.d, s.n_tokens, s.context_len, s.num_shards, s.dtype) == (D, N_TOKENS, CTX, 6,
                                                                       "float32")
    acts = torch.cat([s.activations_f32(i) for i in range(s.num_shards)])
    want = np.concatenate([b[2] for b in all_batches])[:N_TOKENS]
    assert torch.equal(acts, torch.from_numpy(want))
    ids = np.concatenate([s.token_ids(i) for i in range(s.num_shards)])
    index = np.concatenate([s.index(i) for i in range(s.num_shards)])
    assert ids.dtype == np.uint32 and ids.max() > 65535
    assert np.array_equal(s.rows()[index[:, 0], index[:, 1]], ids)
    assert s.rows().shape == (N_ROWS, CTX) and isinstance(s.rows(), np.memmap)
    for entry in [m["rows"]] + [f for sh in m["shards"] for f in sh["files"].values()]:
        assert sha256_file(tmp_path / "s" / entry["file"]) == entry["sha256"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == sorted(
        ["manifest.json", "rows.npy"] + [f"shard-{k:05d}.{kind}.npy" for k in range(6)
                                         for kind in ("acts", "tokens", "index", "norms")])
    # E||C x||^2 = 1 over the stored tokens
    assert float((acts * s.scale).pow(2).sum(1).mean()) == pytest.approx(1.0, rel=1e-5)
    assert m["excluded"] == {"bos": N_ROWS, "eos": 2, "other_special": 0, "outlier": 0}
    assert m["norm"]["percentiles"]["p50"] == pytest.approx(float(acts.norm(dim=1).median()),
                                                            rel=1e-2)
    assert s.verify() == []


def test_bf16_store(tmp_path):
    m, all_batches = write(tmp_path / "s", dtype="bfloat16")
    s = ActivationStore(tmp_path / "s")
    assert s.activations(0).dtype == np.uint16 and m["dtype"] == "bfloat16"
    want = torch.from_numpy(np.concatenate([b[2] for b in all_batches])[:N_TOKENS])
    got = torch.cat([s.activations_f32(i) for i in range(s.num_shards)])
    assert torch.equal(got, want.view(torch.bfloat16).float())
    assert s.verify() == []


@pytest.mark.parametrize("stop_after", [1, 2, 5])
def test_writer_resume_is_byte_identical(tmp_path, stop_after):
    ref, _ = write(tmp_path / "ref")
    write(tmp_path / "s", stop_after=stop_after)
    # 60 vectors per batch, 100 per shard: a shard is complete after two batches
    assert (tmp_path / "s/manifest.partial.json").exists() == (stop_after >= 2)
    resumed, _ = write(tmp_path / "s")  # a new writer picks up the partial store
    assert [resumed["rows"]] + resumed["shards"] == [ref["rows"]] + ref["shards"]


def test_other_fingerprint_restarts(tmp_path):
    write(tmp_path / "s", stop_after=3)
    m, _ = write(tmp_path / "s", seed=1)
    ref, _ = write(tmp_path / "ref", seed=1)
    assert m["shards"] == ref["shards"]


def test_iter_batches_deterministic_and_resumable(store):
    it = store.iter_batches(64, seed=3)
    first = [next(it) for _ in range(12)]  # 9 batches per epoch: crosses into epoch 2
    again = store.iter_batches(64, seed=3)
    assert all(torch.equal(a, next(again)) for a in first)
    resumed = store.iter_batches(64, seed=3, start_batch=7)
    assert all(torch.equal(first[k], next(resumed)) for k in range(7, 12))
    assert not torch.equal(first[0], next(store.iter_batches(64, seed=4)))
    # one epoch visits distinct tokens; the next one reshuffles
    epoch = torch.cat(first[:9])
    assert len(torch.unique(epoch, dim=0)) == 9 * 64
    assert not torch.equal(first[9], first[0])
    raw = next(store.iter_batches(64, seed=3, normalise=False))
    assert torch.allclose(raw * store.scale, first[0])


def test_rank_slices_are_disjoint_and_cover_the_batch(store):
    full = store.iter_batches(64, seed=0)
    ranks = [store.iter_batches(64, seed=0, rank=r, world_size=4) for r in range(4)]
    for _ in range(3):
        parts = [next(r) for r in ranks]
        assert all(len(p) == 16 for p in parts)
        both = torch.cat(parts)
        assert len(torch.unique(both, dim=0)) == 64
        assert torch.equal(torch.unique(both, dim=0), torch.unique(next(full), dim=0))
    with pytest.raises(SaelabError, match="split evenly"):
        next(store.iter_batches(63, seed=0, world_size=2))
    with pytest.raises(SaelabError, match="exceeds"):
        next(store.iter_batches(N_TOKENS + 1, seed=0))


def test_sample(store):
    a, b = store.sample(50, seed=1), store.sample(50, seed=1)
    assert torch.equal(a, b) and a.shape == (50, D) and len(torch.unique(a, dim=0)) == 50


def test_verify_detects_damage(tmp_path):
    write(tmp_path / "s")
    s = ActivationStore(tmp_path / "s")
    acts = tmp_path / "s/shard-00001.acts.npy"
    data = bytearray(acts.read_bytes())
    data[200] ^= 0x01
    acts.write_bytes(bytes(data))
    tokens = tmp_path / "s/shard-00002.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-12])
    (tmp_path / "s/shard-00004.acts.npy").unlink()
    problems = ActivationStore(tmp_path / "s").verify()
    assert any("shard-00001.acts.npy: sha256 differs" in p for p in problems)
    assert any(p.startswith("shard-00002.tokens.npy:") and "bytes" in p for p in problems)
    assert any("shard-00004.acts.npy: missing" in p for p in problems)
    assert len(s.verify()) == len(problems)
    with pytest.raises(SaelabError, match="missing.*dvc repro extract_mlp8"):
        s.activations(4)


def test_verify_checks_contents(tmp_path):
    write(tmp_path / "s")
    m = json.loads((tmp_path / "s/manifest.json").read_text())
    m["vocab_size"] = 70000  # every stored id above it now counts as out of range
    (tmp_path / "s/manifest.json").write_text(json.dumps(seal(m)))  # resealed: only the
    # contents are wrong
    acts = np.load(tmp_path / "s/shard-00000.acts.npy")
    acts[3, 2] = np.nan
    np.save(tmp_path / "s/shard-00000.acts.npy", acts)
    problems = ActivationStore(tmp_path / "s").verify()
    assert any("NaN or Inf" in p for p in problems)
    assert any("token id" in p and ">= vocab 70000" in p for p in problems)


def test_missing_or_incomplete_store(tmp_path):
    with pytest.raises(SaelabError, match="is missing; run `dvc repro extract_mlp8`"):
        ActivationStore(tmp_path / "nope")
    write(tmp_path / "s", stop_after=3)
    with pytest.raises(SaelabError, match="incomplete.*dvc repro extract_mlp8"):
        ActivationStore(tmp_path / "s")


def test_shards_smaller_than_a_row(tmp_path):
    m, all_batches = write(tmp_path / "s", shard_tokens=7)  # several shards end in one row
    s = ActivationStore(tmp_path / "s")
    assert s.num_shards == -(-N_TOKENS // 7) and s.rows().shape == (N_ROWS, CTX)
    assert s.verify() == []
    acts = torch.cat([s.activations_f32(i) for i in range(s.num_shards)])
    assert torch.equal(acts, torch.from_numpy(np.concatenate([b[2] for b in all_batches])
                                              [:N_TOKENS]))
