"""Every stage verifies what it reads (issue 14): a flipped byte, an edited field, a
truncated file or a bad API answer is caught by the stage that reads it, with one ERROR
line naming the file and the fix, and nothing bad gets cached, trained on or exported.

Inputs shared with the reference workspaces are hard links: a corruption here always
writes a new file (`rewrite`), never into the shared one.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import socket
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from saelab.activations.store import sha256_file
from saelab.cli import compose_params
from saelab.core.config import ConfigError, DataCfg, InterpretCfg, SAECfg, load_params
from saelab.core.errors import SaelabError
from saelab.core.integrity import seal
from saelab.interpret import pipeline
from saelab.interpret.backends import BatchBackend, check_base_url
from saelab.interpret.cache import completion_problem
from saelab.interpret.cost import TokenCounter
from saelab.sae import checkpoint
from saelab.sae.train import train
from saelab.scaling.powerlaw import FitError, best_lr_parabola
from saelab.verify import verify_sae, verify_store

from .conftest import CountingServer, interpret_workspace, labelling_responder
from .harness import REPO
from .test_bad_input import clear_failure
from .test_interpret_load import synthetic_samples

STORE = "data/activations"


def rewrite(path: Path, data: bytes) -> None:
    """Replace `path` by a new file holding `data` (the old inode, maybe shared, is kept)."""
    path.unlink()
    path.write_bytes(data)


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) * 2 // 3] ^= 0x01  # past any header: the data itself
    rewrite(path, bytes(data))


def truncate(path: Path) -> None:
    rewrite(path, path.read_bytes()[: path.stat().st_size // 2])


def edit_json(path: Path, change) -> None:
    obj = json.loads(path.read_text())
    change(obj)
    rewrite(path, json.dumps(obj).encode())


def nan_in_shard(store: Path) -> None:
    path = store / "shard-00000.acts.npy"
    acts = np.load(path)
    acts.view(np.float32 if acts.dtype == np.float32 else np.uint16)[3, 2] = \
        np.float32(np.nan) if acts.dtype == np.float32 else 0x7FC0
    path.unlink()
    np.save(path, acts)


# --- the activation store, read by train_sae, fit_scaling_laws, interpret ----------------

STORE_CASES = {
    "flipped byte in a shard": (lambda s: flip(s / "shard-00000.acts.npy"),
                                ["shard-00000.acts.npy", "sha256 differs"]),
    "flipped byte in rows.npy": (lambda s: flip(s / "rows.npy"), ["rows.npy", "sha256 differs"]),
    "NaN in a shard": (nan_in_shard, ["shard-00000.acts.npy", "sha256 differs"]),
    "truncated shard": (lambda s: truncate(s / "shard-00001.acts.npy"),
                        ["shard-00001.acts.npy", "bytes, the manifest says"]),
    "wrong n_tokens": (lambda s: edit_json(s / "manifest.json",
                                           lambda m: m.update(n_tokens=m["n_tokens"] - 1)),
                       ["manifest.json", "edited or damaged"]),
    "scale x 10": (lambda s: edit_json(s / "manifest.json",
                                       lambda m: m.update(scale=m["scale"] * 10)),
                   ["manifest.json", "edited or damaged"]),
}


@pytest.mark.parametrize("case", list(STORE_CASES))
def test_train_sae_refuses_a_damaged_store(case, trained, tmp_path):
    corrupt, words = STORE_CASES[case]
    ws = trained.clone(tmp_path / "ws", STORE)
    corrupt(ws.root / STORE)
    clear_failure(ws.run("train_sae", events=["step"]), "train_sae failed", *words,
                  "saelab verify", "extract_mlp8", status=2)
    assert not (ws.root / "models/sae").exists(), "nothing may be exported"
    assert verify_store(ws.root / STORE), "verify must flag it too"


def test_fit_scaling_laws_and_interpret_refuse_a_flipped_shard_byte(base, trained, tmp_path):
    ws = base.clone(tmp_path / "fit", STORE)
    flip(ws.root / STORE / "shard-00000.acts.npy")
    clear_failure(ws.run("fit_scaling_laws"), "fit_scaling_laws failed",
                  "shard-00000.acts.npy", "sha256 differs", status=2)
    assert not (ws.root / "reports/scaling/fit.json").exists()
    ws = interpret_workspace(base, trained, tmp_path / "interp")
    flip(ws.root / STORE / "shard-00000.acts.npy")
    clear_failure(ws.run("interpret"), "interpret failed", "shard-00000.acts.npy", status=2)


# --- the SAE export, read by interpret ----------------------------------------------------

def _reseal_with(sae: Path, change) -> None:
    """Edit cfg.json and refresh manifest.json to match: a consistent, wrong export."""
    edit_json(sae / "cfg.json", change)
    m = json.loads((sae / "manifest.json").read_text())
    m["files"]["cfg.json"] = {"sha256": sha256_file(sae / "cfg.json"),
                              "bytes": (sae / "cfg.json").stat().st_size}
    rewrite(sae / "manifest.json", json.dumps(seal(m)).encode())


def _flip_without_manifest(sae: Path) -> None:
    (sae / "manifest.json").unlink()
    flip(sae / "sae_weights.safetensors")


SAE_CASES = {
    "flipped byte in sae_weights": (lambda s: flip(s / "sae_weights.safetensors"),
                                    ["sae_weights.safetensors", "sha256 differs"]),
    "manifest deleted and a weight byte flipped": (_flip_without_manifest,
                                                   ["manifest.json: missing"]),
    "truncated SAE": (lambda s: truncate(s / "sae_weights.safetensors"),
                      ["sae_weights.safetensors", "bytes"]),
    "edited SAE manifest": (lambda s: edit_json(s / "manifest.json",
                                                lambda m: m.update(format="x")),
                            ["manifest.json", "edited or damaged"]),
    "cfg.json disagrees with the weights": (
        lambda s: _reseal_with(s, lambda c: c.update(d_sae=c["d_sae"] * 2)),
        ["W_enc has shape", "cfg.json's d_in/d_sae"]),
}


@pytest.mark.parametrize("case", list(SAE_CASES))
def test_interpret_refuses_a_damaged_sae(case, base, trained, tmp_path):
    corrupt, words = SAE_CASES[case]
    ws = interpret_workspace(base, trained, tmp_path / "ws")
    sae = ws.root / "models/sae"
    for f in list(sae.iterdir()):  # links into the reference: make them this workspace's own
        rewrite(f, f.read_bytes())
    corrupt(sae)
    clear_failure(ws.run("interpret"), "interpret failed", *words, "saelab verify",
                  "train_sae", status=2)
    assert verify_sae(sae)
    assert not (ws.root / "reports/interpret_metrics.json").exists()


# --- the model folder, read by extract_mlp8 (and train_sae, streaming) --------------------

MODEL_CASES = {
    "truncated config.json": (lambda m: truncate(m / "config.json"),
                              ["config.json", "not valid JSON"]),
    "missing model.safetensors": (lambda m: (m / "model.safetensors").unlink(),
                                  ["no weights"]),
    "truncated model.safetensors": (lambda m: truncate(m / "model.safetensors"),
                                    ["model.safetensors", "truncated"]),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_extract_refuses_a_damaged_model_folder(case, base, tmp_path):
    corrupt, words = MODEL_CASES[case]
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    corrupt(ws.root / "models/base")
    clear_failure(ws.run("extract_mlp8"), "extract_mlp8 failed", *words, "fetch_model",
                  status=2)


# --- checkpoints ---------------------------------------------------------------------------

def _batches(start: int, crash_at: int | None = None):
    k = start
    while True:
        if k == crash_at:
            raise KeyboardInterrupt("killed")
        yield torch.randn(64, 16, generator=torch.Generator().manual_seed(k))
        k += 1


def test_a_corrupt_checkpoint_is_set_aside_and_training_resumes_from_the_one_before(
        tmp_path, caplog):
    cfg = dataclasses.replace(SAECfg(), d_sae=32, batch_size=64, lr_warmup_steps=4,
                              l0_warmup_steps=8, log_every=5, checkpoint_every=10)
    run = dict(d_in=16, n_tokens=64 * 40, lr=1e-2, device="cpu", seed=0)
    straight = train(cfg, _batches, **run).sae.state_dict()
    ck = tmp_path / "ck"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, lambda s: _batches(s, crash_at=35), checkpoint_dir=ck, **run)
    kept = sorted(p.name for p in ck.glob("checkpoint-*.pt"))
    assert [n.split("-")[1] for n in kept] == ["000000020", "000000030"]  # the last two
    flip(checkpoint.latest(ck))
    with caplog.at_level(logging.INFO):
        resumed = train(cfg, _batches, checkpoint_dir=ck, **run)
    assert "damaged" in caplog.text and "set aside" in caplog.text
    assert "resumed from step 20 of 40" in caplog.text
    assert len(list(ck.glob("*.corrupt"))) == 1
    for k, v in straight.items():  # resumed from step 20: the same SAE as a straight run
        assert torch.equal(v, resumed.sae.state_dict()[k]), k


# --- interpret: bad answers, money, failures -----------------------------------------------

COUNTER = TokenCounter("chars/4 (test)", lambda s: (len(s) + 3) // 4, exact=False)
SAMPLES, TABLE = None, None


def _samples():
    global SAMPLES, TABLE
    if SAMPLES is None:
        samples, TABLE = synthetic_samples()
        SAMPLES = samples[:4]
    return SAMPLES, TABLE


def _interpret(server_or_url, tmp_path: Path, **kw):
    samples, table = _samples()
    url = getattr(server_or_url, "base_url", server_or_url)
    cfg = dataclasses.replace(InterpretCfg(), **{
        "backend": "openai", "base_url": url, "cache_dir": str(tmp_path / "cache"),
        "scorers": ("detection",), "examples_per_prompt": 8, "concurrency": 2,
        "max_retries": 2, "retry_base_s": 0.0, "poll_s": 0.0, "timeout_s": 10.0, **kw})
    return pipeline.run_interpret(samples, table, cfg, seed=0, out_dir=tmp_path / "r",
                                  metrics_path=tmp_path / "m.json", sleep=lambda s: None,
                                  counter=COUNTER)


@pytest.fixture
def fast_interpret(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-integrity-test")
    monkeypatch.setattr(pipeline, "write_report", lambda *args, **kwargs: None)


def _cache_entries(tmp_path: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in (tmp_path / "cache").glob("*/*.json")]


BAD_SHAPES = {"no choices": {"choices": []},
              "an error body": {"error": {"message": "overloaded", "type": "server_error"}},
              "a JSON list": [1, 2, 3]}


@pytest.mark.parametrize("shape", list(BAD_SHAPES))
def test_a_bad_200_is_retried_in_the_run_and_never_cached(shape, tmp_path, fast_interpret):
    with CountingServer(labelling_responder()) as server:
        server.garble = lambda body, attempt: BAD_SHAPES[shape] if attempt == 0 else None
        m = _interpret(server, tmp_path)
        assert m["summary"]["n_explained"] == 4 and m["summary"]["n_failed"] == 0
        entries = _cache_entries(tmp_path)
        assert entries and all(completion_problem(e) is None for e in entries)
        calls = server.chat_calls
        assert _interpret(server, tmp_path)["cost"]["requests_sent"] == 0
        assert server.chat_calls == calls  # a rerun finds everything, nothing poisoned


def test_a_poisoned_cache_from_an_older_version_is_ignored(tmp_path, fast_interpret):
    with CountingServer(labelling_responder()) as server:
        first = _interpret(server, tmp_path)
        entry = sorted((tmp_path / "cache").glob("*/*.json"))[0]
        entry.write_text(json.dumps({"choices": []}))  # what older versions cached
        calls = server.chat_calls
        again = _interpret(server, tmp_path)
        assert server.chat_calls == calls + 1 and again["cost"]["requests_sent"] == 1
        assert completion_problem(json.loads(entry.read_text())) is None
        assert again["latents"] == first["latents"]


def test_all_requests_failing_is_an_error(tmp_path, fast_interpret):
    with CountingServer(labelling_responder()) as server:
        server.garble = lambda body, attempt: {"choices": []}
        with pytest.raises(SaelabError, match="all 4 explanations requests failed"):
            _interpret(server, tmp_path)
        assert not _cache_entries(tmp_path)
    with socket.socket() as s:  # a port nobody listens on: connections are refused
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}/v1"
    with pytest.raises(SaelabError, match="all 4 explanations requests failed"):
        _interpret(url, tmp_path)
    with pytest.raises(SaelabError, match="not an http:// or https:// URL"):
        check_base_url("127.0.0.1:8000/v1")


def test_max_usd_caps_the_total_across_reruns_by_reported_usage(tmp_path, fast_interpret):
    with CountingServer(labelling_responder()) as server:
        server.usage_factor = 10_000  # the server reports far more than was asked
        with pytest.raises(SaelabError, match="interpret.max_usd = .* is reached"):
            _interpret(server, tmp_path, max_usd=0.05, concurrency=1)
        # One answer revealed the inflated usage; nothing was sent after it.
        assert server.chat_calls == 1
        ledger = [json.loads(x) for x in (tmp_path / "cache/ledger.jsonl").read_text().splitlines()]
        assert len(ledger) == 1 and ledger[0]["usd"] > 0.05
        for _ in range(3):
            with pytest.raises(SaelabError, match="already spent on these requests"):
                _interpret(server, tmp_path, max_usd=0.05, concurrency=1)
        assert server.chat_calls == 1  # 3 reruns, 0 requests, $0 past the cap


def test_a_batch_whose_creation_timed_out_is_never_paid_twice(tmp_path, fast_interpret,
                                                              monkeypatch):
    monkeypatch.chdir(tmp_path)  # the batch state file is relative to the workspace
    with CountingServer(labelling_responder()) as server:
        server.create_delay = 1.5  # the API makes the batch, the client gives up first
        # First run: the batch cannot be found right away (as when listing lags creation).
        monkeypatch.setattr(BatchBackend, "_batch_of_file", lambda self, file_id: None)
        with pytest.raises(SaelabError, match="the rerun takes that batch"):
            _interpret(server, tmp_path, backend="openai-batch", timeout_s=0.5)
        monkeypatch.undo()
        monkeypatch.setenv("OPENAI_API_KEY", "sk-integrity-test")
        monkeypatch.setattr(pipeline, "write_report", lambda *args, **kwargs: None)
        monkeypatch.chdir(tmp_path)  # the batch state file is relative to the workspace
        m = _interpret(server, tmp_path, backend="openai-batch", timeout_s=0.5)
        assert m["summary"]["n_explained"] == 4
        assert max(server.paid.values()) == 1  # every request paid once, timeouts included
        submitted = Counter(k for keys in server.batch_inputs.values() for k in keys)
        assert set(submitted.values()) == {1}  # and submitted in one batch only


# --- params and messages ----------------------------------------------------------------------

def test_empty_params_and_unknown_profile_are_refused(trained, tmp_path):
    ws = trained.clone(tmp_path / "ws", STORE)
    (ws.root / "params.yaml").write_text("")
    clear_failure(ws.run("train_sae"), "params.yaml is empty", "saelab params", status=2)
    with pytest.raises(ConfigError, match="is empty"):
        load_params(ws.root / "params.yaml")
    with pytest.raises(ConfigError, match=r"unknown profile 'nope'.*'tiny'"):
        compose_params(["profile=nope"], root=REPO, output=tmp_path / "p.yaml")


def test_messages_say_what_is_wrong(tmp_path):
    with pytest.raises(FitError, match="lr_grid has 1 learning rate.*at least 3"):
        best_lr_parabola([0.003], [1.0])
    (tmp_path / "texts").mkdir()
    from saelab.data.corpus import _local_files

    with pytest.raises(SaelabError, match="matches only directories.*texts/\\*.jsonl"):
        _local_files(DataCfg(source="local", local_files=str(tmp_path / "tex*")))
    store = tmp_path / "store"  # killed before its first shard was complete
    store.mkdir()
    (store / "shard-00000.acts.npy.tmp").write_bytes(b"\x93NUMPY")
    problems = verify_store(store)
    assert any("shard-00000.acts.npy.tmp: left by an interrupted run" in p for p in problems)
