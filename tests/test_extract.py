"""extract_mlp8: exact truncated forward, hook points, packing, resume, preflight."""
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from transformers import LlamaForCausalLM

from saelab.data.base_model import build_model_config
from saelab.core.config import ExtractCfg, ModelCfg
from saelab.core.errors import SaelabError
from saelab.activations.extract import (ActivationSource, extract_store, pack_rows,
                                        special_token_ids, stream_activations, token_rows)
from saelab.activations.hooks import HOOK_POINTS, capture
from saelab.activations.store import ActivationStore, sha256_file
from saelab.data.tokenizer import BOS_ID, EOS_ID, load_llama3_tokenizer

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data/sample/spanish_novels_cligs.jsonl"
# Small shards and forwards so a few thousand tokens exercise shard and batch boundaries.
CFG = ExtractCfg(context_len=64, n_tokens=5000, batch_tokens=512, shard_tokens=1536)


def texts(n: int = 40) -> list[str]:
    with open(SAMPLE, encoding="utf-8") as f:
        return [json.loads(line)["text"] for _, line in zip(range(n), f)]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return LlamaForCausalLM(build_model_config(ModelCfg())).eval()


@pytest.fixture(scope="module")
def tok():
    return load_llama3_tokenizer()


@pytest.fixture(scope="module")
def rows(tok):
    return np.stack(list(token_rows(tok, texts(4), 48))[:6])


def _full_forward_capture(model, rows, layer, hook):
    """The reference: an ordinary full forward (LM head included) with a plain hook."""
    path, side = HOOK_POINTS[hook]
    module = model.model.layers[layer]
    for part in filter(None, path.split(".")):
        module = getattr(module, part)
    got = {}
    if side == "input":
        h = module.register_forward_pre_hook(lambda m, a: got.setdefault("x", a[0]))
    else:
        h = module.register_forward_hook(lambda m, a, o: got.setdefault("x", o))
    with torch.no_grad():
        model(torch.from_numpy(rows.astype(np.int64)))
    h.remove()
    return got["x"]


@pytest.mark.parametrize("hook", list(HOOK_POINTS))
def test_truncated_forward_equals_full_forward(model, rows, hook):
    ref = _full_forward_capture(model, rows, 8, hook).reshape(-1, _width(model, hook))
    ran = []
    later = model.model.layers[9].register_forward_hook(lambda *a: ran.append("layer9"))
    head = model.lm_head.register_forward_hook(lambda *a: ran.append("lm_head"))
    try:
        batch = ActivationSource(model, layer=8, hook=hook, device="cpu", exclude_ids=())(rows, 0)
    finally:
        later.remove()
        head.remove()
    assert ran == []  # truncation: nothing after layer 8 runs
    assert batch.acts.shape == ref.shape
    assert (batch.acts - ref).abs().max().item() <= 1e-5
    assert np.array_equal(batch.token_ids, rows.reshape(-1))


def _width(model, hook):
    return model.config.intermediate_size if hook == "mlp_act" else model.config.hidden_size


def test_llama3_specials_are_the_top_256_ids(tok):
    """The tokenizer-derived exclusion is exactly the range the store always excluded, so
    tiny-profile stores keep their bytes."""
    assert special_token_ids(tok) == frozenset(range(BOS_ID, 128256))


def test_stream_drops_specials_and_indexes_rows(model, tok, rows):
    ref = _full_forward_capture(model, rows, 8, "mlp_out")
    out = list(stream_activations(model, iter(rows), layer=8, hook="mlp_out", batch_tokens=96,
                                  device="cpu", exclude_ids=special_token_ids(tok),
                                  first_row=10))
    assert len(out) == 3  # 96 tokens = 2 rows of 48 per forward
    ids = np.concatenate([b.token_ids for b in out])
    index = np.concatenate([b.index for b in out])
    acts = torch.cat([b.acts for b in out])
    assert not np.isin(ids, [BOS_ID, EOS_ID]).any()
    assert (index[:, 1] > 0).all()  # position 0 is always BOS
    assert np.array_equal(rows[index[:, 0] - 10, index[:, 1]], ids)
    assert (acts - ref[index[:, 0] - 10, index[:, 1]]).abs().max().item() <= 1e-5


def test_missing_layer_or_hook_is_named(model):
    with pytest.raises(SaelabError, match=r"16 layers \(0\.\.15\)"):
        ActivationSource(model, layer=16, hook="mlp_out", device="cpu", exclude_ids=())
    with pytest.raises(SaelabError, match="mlp_out, mlp_act, mlp_in, resid_post"):
        with capture(model, 8, "attn_out"):
            pass
    bare = nn.Module()
    bare.model = nn.Module()
    bare.model.layers = nn.ModuleList([nn.Module()])
    bare.model.layers[0].self_attn = nn.Identity()
    with pytest.raises(SaelabError, match=r"layers\[0\]\.mlp, but layers\[0\] has only: self_attn"):
        with capture(bare, 0, "mlp_out"):
            pass


def test_pack_rows_bos_eos_no_padding():
    docs = [np.array(d, np.uint32) for d in
            ([70000, 5, 6, EOS_ID], [7, 128254, EOS_ID], [9, 10, 11, 12, 13, EOS_ID])]
    rows = list(pack_rows(iter(docs), 5, BOS_ID))
    assert [r.tolist() for r in rows] == [
        [BOS_ID, 70000, 5, 6, EOS_ID], [BOS_ID, 7, 128254, EOS_ID, 9], [BOS_ID, 10, 11, 12, 13]]
    assert all(r.dtype == np.uint32 for r in rows)  # ids > 65535 survive
    with pytest.raises(SaelabError, match="context_len"):
        list(pack_rows(iter(docs), 1, BOS_ID))


def test_store_excludes_specials_and_keeps_large_ids(model, tok, tmp_path):
    m = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu", inputs={})
    store = ActivationStore(tmp_path / "s")
    ids = np.concatenate([store.token_ids(i) for i in range(store.num_shards)])
    assert ids.dtype == np.uint32 and len(ids) == CFG.n_tokens == m["n_tokens"]
    assert not np.isin(ids, list(range(BOS_ID, 128256))).any()
    assert (ids > 65535).any()
    rows = store.rows()
    assert (rows[:, 0] == BOS_ID).all() and m["excluded"]["bos"] == m["n_rows"]
    assert m["excluded"]["eos"] == int((rows == EOS_ID).sum()) > 0
    assert m["excluded"]["outlier"] == 0 and m["norm"]["per_position_mean"][0] is None
    # the writer stores exactly what the source produced
    ref = ActivationSource(model, layer=8, hook="mlp_out", device="cpu",
                           exclude_ids=special_token_ids(tok))(np.array(rows[:8]), 0)
    assert torch.equal(store.activations_f32(0)[:len(ref.acts)], ref.acts)


def test_bf16_store_and_outlier_filter(model, tok, tmp_path):
    f32 = extract_store(model, tok, texts(), CFG, tmp_path / "f32", device="cpu", inputs={})
    cfg = ExtractCfg(**{**CFG.__dict__, "store_dtype": "bfloat16"})
    extract_store(model, tok, texts(), cfg, tmp_path / "bf16", device="cpu", inputs={})
    a, b = ActivationStore(tmp_path / "f32"), ActivationStore(tmp_path / "bf16")
    assert b.activations(0).dtype == np.uint16 and b.dtype == "bfloat16"
    assert torch.equal(b.activations_f32(0), a.activations_f32(0).bfloat16().float())
    assert b.verify() == []
    cfg = ExtractCfg(**{**CFG.__dict__, "outlier_k": 1.05})
    m = extract_store(model, tok, texts(), cfg, tmp_path / "out", device="cpu", inputs={})
    assert m["n_tokens"] == CFG.n_tokens and m["excluded"]["outlier"] > 0
    assert m["norm"]["percentiles"]["p100"] < f32["norm"]["percentiles"]["p100"]


def test_resume_after_crash_and_restart_on_new_inputs(model, tok, tmp_path, caplog):
    ref = extract_store(model, tok, texts(), CFG, tmp_path / "ref", device="cpu", inputs={})

    def crashed(inputs):
        calls = []

        def crash(*_):
            calls.append(1)
            if len(calls) == 5:  # the fifth forward: the first shard (1536 tokens) is done
                raise RuntimeError("simulated crash")

        handle = model.model.layers[0].register_forward_hook(crash)
        try:
            with pytest.raises(RuntimeError, match="simulated"):
                extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu",
                              inputs=inputs)
        finally:
            handle.remove()

    crashed({})
    assert not (tmp_path / "s/manifest.json").exists()
    assert not list((tmp_path / "s").glob("*.tmp"))
    with caplog.at_level("INFO", "saelab.activations.store"):
        m = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu", inputs={})
    assert 0 < int(re.search(r"after (\d+) complete shard", caplog.text).group(1)) < 4
    # DVC tracks the manifest: resumed or not, not a byte differs (no timings in it)
    assert (tmp_path / "s/manifest.json").read_bytes() == (tmp_path / "ref/manifest.json").read_bytes()
    # Other inputs: the store is built beside the finished one, which a crash leaves whole.
    old = _stats(tmp_path / "s", m)
    crashed({"x": 1})
    assert _stats(tmp_path / "s", m) == old and ActivationStore(tmp_path / "s").verify() == []
    assert list((tmp_path / "s/.next").glob("shard-*"))
    caplog.clear()
    with caplog.at_level("INFO", "saelab.activations.store"):
        m2 = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu",
                           inputs={"x": 1})
    assert re.search(r"resuming \S+/\.next after [1-3] complete shard", caplog.text)
    # ... and replaces it once finished: same files as a store built from scratch
    assert m2["fingerprint"] != m["fingerprint"] and not (tmp_path / "s/.next").exists()
    store = ActivationStore(tmp_path / "s")
    assert store.manifest == m2 and store.verify() == [] and _hashes(m2) == _hashes(ref)
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == \
        sorted(p.name for p in (tmp_path / "ref").iterdir())
    # a finished, matching store is kept as is (minus leftovers of an interrupted finish)
    (tmp_path / "s/manifest.partial.json").write_text("{}")
    before = _stats(tmp_path / "s", m2)
    m3 = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu", inputs={"x": 1})
    assert m3 == m2 and _stats(tmp_path / "s", m3) == before
    assert not (tmp_path / "s/manifest.partial.json").exists()


def test_a_kill_while_the_new_store_moves_in_is_finished_by_the_rerun(model, tok, tmp_path,
                                                                       monkeypatch):
    import saelab.activations.extract as extract_mod
    from saelab.activations import store as store_mod

    extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu", inputs={})
    with monkeypatch.context() as mp:  # finished in .next, not moved in yet
        mp.setattr(extract_mod, "promote", lambda out_dir: None)
        new = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu",
                            inputs={"x": 1})
    moved = []

    def killed(src, dst):  # the kill: after three files moved
        if len(moved) == 3:
            raise KeyboardInterrupt
        moved.append(src)
        os.rename(src, dst)

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(store_mod.os, "replace", killed)
        store_mod.promote(tmp_path / "s")
    assert not (tmp_path / "s/manifest.json").exists()  # no manifest: no half store passes
    again = extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu",
                          inputs={"x": 1})
    assert again == new and ActivationStore(tmp_path / "s").verify() == []
    assert not (tmp_path / "s/.next").exists()


def _stats(store: Path, manifest) -> list[tuple[int, int]]:
    """(inode, mtime) of the manifest and every file it lists: unchanged if not rewritten."""
    names = ["manifest.json", manifest["rows"]["file"]] + [
        f["file"] for s in manifest["shards"] for f in s["files"].values()]
    return [((store / n).stat().st_ino, (store / n).stat().st_mtime_ns) for n in names]


def _hashes(manifest):
    return [manifest["rows"]["sha256"]] + [f["sha256"] for s in manifest["shards"]
                                           for f in s["files"].values()]


_CHILD = """
import json, logging, sys, torch
from pathlib import Path
from transformers import LlamaForCausalLM
from saelab.data.base_model import build_model_config
from saelab.core.config import ExtractCfg, ModelCfg
from saelab.activations.extract import extract_store
from saelab.data.tokenizer import load_llama3_tokenizer
torch.set_num_threads(1)
torch.manual_seed(0)
logging.basicConfig(level=logging.INFO)  # the store logs how many shards it resumed after
model = LlamaForCausalLM(build_model_config(ModelCfg())).eval()
texts = [json.loads(l)["text"] for l in open(sys.argv[2], encoding="utf-8")][:60]
m = extract_store(model, load_llama3_tokenizer(), texts, ExtractCfg(**json.loads(sys.argv[3])),
                  Path(sys.argv[1]), device="cpu", inputs={})
print("SHARDS", len(m["shards"]))
"""


KILL_CFG = ExtractCfg(context_len=64, n_tokens=20000, batch_tokens=512, shard_tokens=1024)


def _child(out: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.Popen([sys.executable, "-c", _CHILD, str(out), str(SAMPLE),
                             json.dumps(KILL_CFG.__dict__)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_sigkill_then_rerun_is_byte_identical(model, tok, tmp_path):
    killed = _child(tmp_path / "s")
    partial = tmp_path / "s/manifest.partial.json"
    deadline = time.time() + 120
    while not partial.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert killed.returncode == -signal.SIGKILL, killed.stderr.read()[-2000:]
    assert not (tmp_path / "s/manifest.json").exists()
    # resume it, and meanwhile make an uninterrupted store here for comparison
    resumed = _child(tmp_path / "s")
    b = extract_store(model, tok, texts(60), KILL_CFG, tmp_path / "fresh", device="cpu",
                      inputs={})
    out_r, err_r = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err_r[-3000:]
    kept = int(re.search(r"after (\d+) complete shard", err_r).group(1))
    assert 0 < kept < int(out_r.split("SHARDS")[1])
    a = json.loads((tmp_path / "s/manifest.json").read_text())
    assert _hashes(a) == _hashes(b)
    assert (tmp_path / "s/manifest.json").read_bytes() == \
        (tmp_path / "fresh/manifest.json").read_bytes()
    for entry in [a["rows"]] + [f for s in a["shards"] for f in s["files"].values()]:
        assert sha256_file(tmp_path / "s" / entry["file"]) == entry["sha256"]
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == \
        sorted(p.name for p in (tmp_path / "fresh").iterdir())


def test_disk_preflight_refuses(model, tok, tmp_path, monkeypatch):
    import shutil
    from collections import namedtuple

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(SaelabError, match=r"needs about .* bytes.*only .* \(1000 bytes\) are free"):
        extract_store(model, tok, texts(), CFG, tmp_path / "s", device="cpu", inputs={})
    assert not list((tmp_path / "s").glob("shard-*"))


def test_corpus_too_small(model, tok, tmp_path):
    with pytest.raises(SaelabError, match="data.token_budget.*extract.n_tokens"):
        extract_store(model, tok, texts(2), CFG, tmp_path / "s", device="cpu", inputs={})


def test_run_extract_wires_model_corpus_and_store(tmp_path):
    from saelab.data.base_model import fetch_model
    from saelab.core.config import parse_params
    from saelab.data.corpus import fetch_corpus, iter_documents
    from saelab.activations.extract import run_extract

    # 150 records span three novels of the sample: one is held out, two are trained on.
    data = {"sample_path": str(SAMPLE), "max_docs": 150}
    extract = {"context_len": 64, "n_tokens": 3000, "batch_tokens": 512, "shard_tokens": 1024}
    params = parse_params({"run": {"device": "cpu"}, "data": data, "extract": extract})
    fetch_model(params, tmp_path / "base", tmp_path / "base.json")
    fetch_corpus(params, tmp_path / "corpus")
    dirs = dict(model_dir=tmp_path / "base", model_json=tmp_path / "base.json",
                corpus_dir=tmp_path / "corpus")
    m = run_extract(params, out_dir=tmp_path / "acts", **dirs)
    assert (m["model"], m["revision"], m["layer"], m["hook"], m["d"]) == (
        "tiny-llama-16L-64d", "random-seed-0", 8, "mlp_out", 64)
    assert ActivationStore(tmp_path / "acts").verify() == []
    assert m["corpus"]["doc_order"]["seed"] == 0

    # Rows start at the first document of the seeded order, not of the file.
    tok = load_llama3_tokenizer()
    first_row = ActivationStore(tmp_path / "acts").rows()[0]
    in_file = [t for _, t in iter_documents(tmp_path / "corpus", "train")]
    seeded = [t for _, t in iter_documents(tmp_path / "corpus", "train", seed=0)]
    assert seeded[0] != in_file[0]
    assert list(first_row[1:]) == tok(seeded[0], add_special_tokens=False)["input_ids"][:63]

    # Another seed is another store: it replaces this one rather than resuming it.
    other = parse_params({"run": {"device": "cpu", "seed": 1}, "data": data, "extract": extract})
    m1 = run_extract(other, out_dir=tmp_path / "acts", **dirs)
    assert m1["fingerprint"] != m["fingerprint"]
    assert not np.array_equal(ActivationStore(tmp_path / "acts").rows()[0], first_row)

    with pytest.raises(SaelabError, match="data.token_budget.*extract.n_tokens"):
        run_extract(parse_params({"run": {"device": "cpu"},
                                  "extract": {"context_len": 64, "n_tokens": 200_000,
                                              "batch_tokens": 4096}}),
                    out_dir=tmp_path / "big", **dirs)
