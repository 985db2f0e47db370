"""Bad input, through the real stage entry points: a non-zero exit, one clear error line
naming the cause and the fix, no traceback, and no finished work lost.
BAD_INPUT_TABLE.md lists the inputs and the messages.

Read-only output: a read-only bind mount (root ignores file modes), chmod when not root.
Full disk: a small tmpfs that another writer fills mid-run (forkserver's `fill` fault).
Both need `mount` (root with CAP_SYS_ADMIN); elsewhere those two tests skip.
"""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from saelab.cli import compose_params
from saelab.sae import checkpoint

from .conftest import interpret_workspace, read_json
from .harness import (REPO, merge, read_only, resumed_shards, store_signature, temp_names,
                      tmpfs, train_signature)


def clear_failure(run, *words: str, status: int | None = None) -> str:
    """The run failed with exactly one ERROR line holding `words`, and no traceback."""
    assert run.status not in (0, -9), f"exit {run.status}: {run.stderr[-3000:]}"
    if status is not None:
        assert run.status == status, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-6000:]
    errors = [line for line in run.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, run.stderr[-3000:]
    for w in words:
        assert w in errors[0], f"{w!r} not in: {errors[0]}"
    return errors[0]


def tmp_files(root) -> list[str]:
    """Temporary files (partial manifests are resume state, not temporary)."""
    return [n for n in temp_names(root) if ".tmp" in n]


def snapshot(root) -> dict[str, tuple[int, int]]:
    """Every file of a workspace but its logs and MLflow db: (size, mtime)."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).parts[0] != "logs"
            and "mlflow" not in p.name}


# --- params.yaml --------------------------------------------------------------------------

PARAMS_CASES = {
    "wrong type": ("train_sae", {"sae": {"d_sae": "big"}}, ["sae.d_sae", "integer", "'big'"]),
    "out of range": ("train_sae", {"sae": {"lr": 5.0}}, ["sae.lr = 5.0", "out of range", "<= 1.0"]),
    "unknown key (typo)": ("train_sae", {"sae": {"lrr": 1.0e-3}},
                           ["unknown key", "sae.lrr", "allowed"]),
    "d_sae of 0": ("train_sae", {"sae": {"d_sae": 0}}, ["sae.d_sae = 0", ">= 1"]),
    "layer the model lacks": ("extract_mlp8", {"extract": {"layer": 20}},
                              ["extract.layer = 20", "16 layers", "0..15"]),
    "more passes over the store than sae.max_epochs": (
        "train_sae", {"sae": {"max_epochs": 1.0}},
        ["102400 tokens", "12.5 times over the 8192 stored", "sae.max_epochs = 1",
         "sae.stream = true", "extract.n_tokens = 102400"]),
}


@pytest.mark.parametrize("case", list(PARAMS_CASES))
def test_bad_params_stop_before_any_work(case, trained, tmp_path):
    stage, change, words = PARAMS_CASES[case]
    ws = trained.clone(tmp_path / "ws", "data/activations", "models/sae", "reports/train")
    ws.write_params(merge(ws.params(), change), validate=False)
    before = snapshot(ws.root)
    clear_failure(ws.run(stage), f"{stage} failed", *words, status=2)
    assert snapshot(ws.root) == before


def test_model_on_disk_without_the_layer(base, tmp_path):
    """params allow layer 8, but the checkpoint in models/base has 6 layers."""
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    config = ws.root / "models/base/config.json"
    spec = read_json(config)
    config.unlink()  # a hard link to the base workspace's file: replace, do not edit
    config.write_text(json.dumps({**spec, "num_hidden_layers": 6}))
    clear_failure(ws.run("extract_mlp8"), "layer 8 does not exist", "6 layers (0..5)",
                  "extract.layer", status=2)
    assert not list((ws.root / "data/activations").glob("shard-*"))


def test_a_cold_process_fails_the_same_way(trained, tmp_path):
    """The fork server runs a stage as `python stages/<name>.py` does: one case, cold."""
    ws = trained.clone(tmp_path / "ws")
    ws.write_params(merge(ws.params(), {"sae": {"d_sae": 0}}), validate=False)
    cold = subprocess.run([sys.executable, "stages/train_sae.py"], cwd=ws.root, env=ws.env,
                          capture_output=True, text=True, timeout=300)
    forked = ws.run("train_sae")
    errors = lambda text: [line.split(" ", 1)[1] for line in text.splitlines()  # noqa: E731
                           if " ERROR " in line]
    assert cold.returncode == forked.status == 2
    assert errors(cold.stderr) == errors(forked.stderr) != []


def test_invalid_yaml(base, tmp_path):
    ws = base.clone(tmp_path / "ws")
    (ws.root / "params.yaml").write_text("sae: {d_sae: 4\n")
    clear_failure(ws.run("train_sae"), "params.yaml is not valid YAML", status=2)


# --- corpus -------------------------------------------------------------------------------

def _local_corpus(ws, content: bytes):
    (ws.root / "in").mkdir()
    (ws.root / "in" / "docs.jsonl").write_bytes(content)
    ws.update_params(data={"source": "local", "local_files": "in/*.jsonl", "local_dir": "in"})


def _jsonl(*texts: str) -> bytes:
    return "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in texts).encode()


CORPUS_CASES = {
    "empty corpus": (b"", ["no training documents", "1 empty files", "data.local_files"]),
    "whitespace-only texts": (_jsonl("   ", "\n\t ", "\u3000"),
                              ["no training documents", "'whitespace_only': 3",
                               "data.local_files"]),
    "invalid UTF-8 only": (b'{"text": "caf\xe9 con leche"}\n{"text": "\xff\xfe hola"}\n',
                           ["no training documents", "'invalid_utf8': 2", "data.local_files"]),
}


@pytest.mark.parametrize("case", list(CORPUS_CASES))
def test_unusable_corpus(case, base, tmp_path):
    content, words = CORPUS_CASES[case]
    ws = base.clone(tmp_path / "ws")
    _local_corpus(ws, content)
    clear_failure(ws.run("fetch_oscar"), "fetch_oscar failed", *words, status=2)
    assert not (ws.root / "data/corpus").exists()  # no half-written corpus
    assert not (ws.root / "data/corpus.partial").exists()


def test_bad_documents_among_good_ones_are_dropped_and_counted(base, tmp_path):
    """Not an error: DESIGN §4 drops and counts them. A huge document is cut."""
    ws = base.clone(tmp_path / "ws")
    good = [f"Documento {i}: la casa de la colina estaba en silencio." for i in range(4)]
    huge = "palabra " * 3_000_000  # 24 MB on one line
    _local_corpus(ws, _jsonl(*good, "  \n ", "", huge, good[0])
                  + b'{"text": "mal \xff\xfe codificado"}\n')
    ws.run("fetch_oscar").ok()
    m = read_json(ws.root / "data/corpus/manifest.json")
    assert m["docs"]["train"] + m["docs"]["heldout"] == 5
    assert {k: v for k, v in m["dropped"].items() if v} == {
        "whitespace_only": 1, "empty": 1, "duplicate": 1, "invalid_utf8": 1}
    assert m["cut"]["docs"] == 1 and m["cut"]["chars_removed"] == len(huge) - 100_000


def test_token_budget_bigger_than_corpus_keeps_the_shards(base, tmp_path):
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    ws.update_params(extract={"n_tokens": 200_000})
    clear_failure(ws.run("extract_mlp8"), "corpus ran out", "extract.n_tokens = 200000",
                  "data.token_budget or data.max_docs", status=2)
    store = ws.root / "data/activations"
    shards = read_json(store / "manifest.partial.json")["shards"]
    assert len(shards) >= 2
    assert all((store / e["file"]).is_file() for s in shards for e in s["files"].values())


# --- secrets ------------------------------------------------------------------------------

def test_missing_hf_token_for_the_gated_model_fails_before_any_network(base, tmp_path):
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json")
    compose_params(["profile=llama-3.2-1b"], root=REPO, output=ws.root / "params.yaml")
    before = snapshot(ws.root)
    run = ws.run("fetch_model", env={"HF_TOKEN": None, "HF_HUB_OFFLINE": None},
                 no_network=True)
    clear_failure(run, "meta-llama/Llama-3.2-1B", "HF_TOKEN is not set", "export HF_TOKEN",
                  status=2)
    assert snapshot(ws.root) == before  # the model already there is kept
    assert run.network == "", f"network access before failing:\n{run.network}"


def test_missing_hf_token_for_oscar(base, tmp_path):
    ws = base.clone(tmp_path / "ws", "data/corpus")
    ws.update_params(data={"source": "oscar"})
    run = ws.run("fetch_oscar", env={"HF_TOKEN": None, "HF_HUB_OFFLINE": None})
    clear_failure(run, "oscar-corpus/oscar", "HF_TOKEN is not set", "accepted the terms",
                  status=2)
    assert (ws.root / "data/corpus/manifest.json").is_file()


def test_missing_openai_key(base, trained, tmp_path):
    ws = interpret_workspace(base, trained, tmp_path / "ws")
    clear_failure(ws.run("interpret", env={"OPENAI_API_KEY": None}),
                  "OPENAI_API_KEY", "interpret.backend=none", status=2)


# --- the file system ----------------------------------------------------------------------

def test_read_only_output_directory_keeps_the_trained_sae(trained, tmp_path):
    """models/ is read-only when the SAE is exported: the training is not lost."""
    ws = trained.clone(tmp_path / "ws", "data/activations")
    with read_only(ws.root / "models"):
        clear_failure(ws.run("train_sae"), "models/sae", "writable")
    assert checkpoint.latest(ws.root / ".saelab/checkpoints/train_sae")
    rerun = ws.run("train_sae", events=["step"]).ok()
    assert rerun.events.get("step", 0) == 0  # resumed at the last step: nothing retrained
    assert train_signature(ws.root) == train_signature(trained.root)


def test_disk_full_mid_extraction(base, tmp_path):
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    ref = read_json(base.root / "data/activations/manifest.json")
    with tmpfs(ws.root / "data/activations", "4m") as store:
        # Another writer takes the last free byte once three shards are complete.
        fill = {"event": "json_write", "n": 3, "when": "after", "action": "fill",
                "path": str(store)}
        clear_failure(ws.run("extract_mlp8", fault=fill), "disk is full", "Free space",
                      status=3)
        for shard in ref["shards"][:3]:  # finished shards kept, intact
            for e in shard["files"].values():
                assert (store / e["file"]).is_file(), e["file"]
        assert not tmp_files(store), "a failed write left temp files on the full disk"
        (store / ".filler").unlink()
        assert resumed_shards(ws.run("extract_mlp8").ok()) == 3
        assert store_signature(ws.root) == store_signature(base.root)


def test_disk_full_while_checkpointing(trained, tmp_path):
    ws = trained.clone(tmp_path / "ws", "data/activations")
    with tmpfs(ws.root / ".saelab", "2m") as state:
        fill = {"event": "torch_save", "n": 3, "when": "before", "action": "fill",
                "path": str(state)}
        clear_failure(ws.run("train_sae", fault=fill), "disk is full", "Free space", status=3)
        ckpt = checkpoint.latest(state / "checkpoints/train_sae")
        at = torch.load(ckpt, weights_only=False)["state"]["step"]
        assert at == 2 * ws.params()["sae"]["checkpoint_every"]  # the last good one
        assert not tmp_files(state), "a failed checkpoint write left its temp file on the full disk"
        (state / ".filler").unlink()
        rerun = ws.run("train_sae", events=["step"]).ok()
    assert rerun.events["step"] == trained.reference.events["step"] - at
    assert train_signature(ws.root) == train_signature(trained.root)
