"""`saelab verify`: a sound store and SAE pass; each kind of damage is named."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from saelab.cli import main as cli
from saelab.core.config import SAECfg
from saelab.sae.autoencoder import SAE, WEIGHTS_FILE, export_sae
from saelab.activations.store import StoreWriter, sha256_file
from saelab.data.tokenizer import BOS_ID, EOS_ID, VOCAB_SIZE
from saelab.sae.autoencoder import MANIFEST_FILE as SAE_MANIFEST
from saelab.verify import verify_all

CTX, D, ROWS, SHARD = 9, 4, 8, 16  # 64 vectors in 4 shards


@pytest.fixture
def store(tmp_path):
    """A small finished store written by the real writer (2 rows per forward batch)."""
    rng = np.random.default_rng(0)
    rows = rng.integers(0, 5000, size=(ROWS, CTX)).astype(np.uint32)
    rows[:, 0] = BOS_ID
    path = tmp_path / "store"
    w = StoreWriter(path, fingerprint="test", d=D, dtype="float32",
                    n_tokens=ROWS * (CTX - 1), shard_tokens=SHARD, context_len=CTX)
    for r in range(0, ROWS, 2):
        block = rows[r:r + 2]
        index = np.array([(r + i, p) for i in range(2) for p in range(1, CTX)], dtype=np.int64)
        tokens = block[:, 1:].reshape(-1)
        acts = rng.standard_normal((len(tokens), D)).astype(np.float32)
        w.add(r, block, acts, tokens, index, np.linalg.norm(acts, axis=1).astype(np.float32))
    w.finalize({}, vocab_size=VOCAB_SIZE, special_ids=[BOS_ID, EOS_ID], bos_id=BOS_ID,
               eos_id=EOS_ID)
    return path


@pytest.fixture
def sae_dir(tmp_path):
    torch.manual_seed(0)
    return export_sae(SAE(D, 12, SAECfg(d_sae=12)), tmp_path / "sae", scale=2.0, meta={})


def test_sound_store_and_sae_have_no_problems(store, sae_dir, capsys):
    assert verify_all(store, sae_dir) == []
    assert cli(["verify", "--store", str(store), "--sae", str(sae_dir)]) == 0
    assert "match" in capsys.readouterr().out


def test_corrupt_truncated_and_deleted_shards_are_each_named(store, sae_dir, capsys):
    corrupt, truncated, deleted = (store / "shard-00001.acts.npy", store / "shard-00002.tokens.npy",
                                   store / "shard-00003.index.npy")
    blob = bytearray(corrupt.read_bytes())
    blob[-5] ^= 0xFF  # one byte of the data, past the header
    corrupt.write_bytes(bytes(blob))
    truncated.write_bytes(truncated.read_bytes()[:-7])
    deleted.unlink()

    problems = verify_all(store, sae_dir)
    text = "\n".join(problems)
    assert any(corrupt.name in p and "sha256" in p for p in problems), text
    assert any(truncated.name in p and "bytes" in p for p in problems), text
    assert any(deleted.name in p and "missing" in p for p in problems), text
    assert not any("shard-00000" in p for p in problems), text
    assert cli(["verify", "--store", str(store), "--sae", str(sae_dir)]) == 1
    out = capsys.readouterr().out
    assert all(name in out for name in (corrupt.name, truncated.name, deleted.name))


def test_a_leftover_temp_file_is_named(store, sae_dir):
    (store / "shard-00004.acts.npy.tmp").write_bytes(b"half")
    (problem,) = verify_all(store, sae_dir)
    assert "shard-00004.acts.npy.tmp" in problem and "interrupted" in problem


def test_missing_directories_give_one_line_each(tmp_path):
    problems = verify_all(tmp_path / "nostore", tmp_path / "nosae")
    assert len(problems) == 2
    assert "nostore" in problems[0] and "extract_mlp8" in problems[0]
    assert "nosae" in problems[1] and "train_sae" in problems[1]


def test_store_without_manifest_is_one_clear_line(store, sae_dir):
    (store / "manifest.json").unlink()
    (problem,) = verify_all(store, sae_dir)
    assert "manifest" in problem and "extract_mlp8" in problem


def test_sae_nan_is_named(store, sae_dir):
    path = sae_dir / WEIGHTS_FILE
    tensors = load_file(str(path))
    tensors["W_enc"][1, 2] = float("nan")
    tensors["threshold"][0] = float("inf")
    save_file(tensors, str(path))
    problems = verify_all(store, sae_dir)
    assert any("W_enc" in p and "NaN" in p for p in problems), problems
    assert any("threshold" in p and "NaN/Inf" in p for p in problems), problems


def test_sae_shape_dtype_and_missing_tensor_are_named(store, sae_dir):
    path = sae_dir / WEIGHTS_FILE
    tensors = load_file(str(path))
    tensors["W_dec"] = tensors["W_dec"][:, :3].contiguous()
    tensors["b_enc"] = tensors["b_enc"].double()
    del tensors["b_dec"]
    save_file(tensors, str(path))
    problems = "\n".join(verify_all(store, sae_dir))
    assert "W_dec has shape (12, 3)" in problems and "(12, 4)" in problems
    assert "b_enc is F64" in problems
    assert "b_dec missing" in problems


def test_truncated_or_missing_sae_files_are_named(store, sae_dir, tmp_path):
    path = sae_dir / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:100])
    problems = verify_all(store, sae_dir)
    assert any(WEIGHTS_FILE in p and "unreadable" in p for p in problems), problems
    assert any(WEIGHTS_FILE in p and "100 bytes" in p for p in problems), problems
    shutil.rmtree(sae_dir)
    sae_dir.mkdir()
    problems = verify_all(store, sae_dir)
    assert [p.split(": ")[1] for p in problems][:3] == ["manifest.json", "cfg.json",
                                                        WEIGHTS_FILE]


def test_sae_manifest_sha256_is_checked(store, sae_dir):
    manifest = json.loads((sae_dir / SAE_MANIFEST).read_text())  # written by export_sae
    assert manifest["files"]["cfg.json"]["sha256"] == sha256_file(sae_dir / "cfg.json")
    assert verify_all(store, sae_dir) == []
    cfg = sae_dir / "cfg.json"
    cfg.write_text(cfg.read_text().replace('"device": "cpu"', '"device": "cuu"'))
    (problem,) = verify_all(store, sae_dir)
    assert "cfg.json: sha256 differs" in problem
