"""SIGKILL at seeded random points of extract_mlp8, train_sae and interpret, then a rerun.

A kill point is "the n-th call of a file-system or work event, just before or just after
it" (events: forkserver.EVENTS), drawn with a fixed seed from the events the uninterrupted
reference run made, so every point lands inside real work and the suite is reproducible.
After the rerun the outputs equal the reference's byte for byte (timings aside), no
temporary or partial file is left, and the rerun did not redo finished work: extraction
keeps the complete shards untouched, training runs only the steps after its last
checkpoint, interpret pays for no answer it had already received.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from .conftest import INTERPRET_EVENTS, INTERPRET_INPUTS, read_json
from .harness import OUTPUTS, temp_names, tree

SEED = 20240607
N_POINTS = 5
# Run bookkeeping that differs between runs by nature: timings, and what a resumed run
# found already done or paid for.
VOLATILE = {"extract_mlp8": ("tokens_per_s", "elapsed_s", "resumed_shards"),
            "train_sae": ("tokens_per_s",)}


def kill_points(counts: dict[str, int], seed: int, focus: tuple[str, ...] = ()) -> list[dict]:
    """N_POINTS distinct (event, n, before/after) kills; two of them among `focus` events."""
    rng = random.Random(seed)
    every = [(e, n) for e, c in sorted(counts.items()) for n in range(1, c + 1)]
    focused = [p for p in every if p[0] in focus]
    picks = rng.sample(focused, 2) if focus else []
    picks += rng.sample([p for p in every if p not in picks], N_POINTS - len(picks))
    return [{"event": e, "n": n, "when": rng.choice(("before", "after")), "action": "kill"}
            for e, n in picks]


def _without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _no_leftovers(ws, stage: str) -> None:
    for rel in OUTPUTS[stage]:
        assert not temp_names(ws.root / rel), f"{rel}: {temp_names(ws.root / rel)}"
    assert not temp_names(ws.root / ".saelab")


# --- extract_mlp8 -------------------------------------------------------------------------

def _store_files(manifest: dict) -> list[str]:
    return [manifest["rows"]["file"]] + [e["file"] for s in manifest["shards"]
                                          for e in s["files"].values()]


@pytest.mark.parametrize("i", range(N_POINTS))
def test_extract_killed_then_resumed(i, base, tmp_path):
    point = kill_points(base.reference.events, SEED, focus=("replace", "json_write"))[i]
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    store = ws.root / "data/activations"
    killed = ws.run("extract_mlp8", fault=point)
    assert killed.killed, f"{point} did not kill: {killed.stderr[-3000:]}"
    partial = store / "manifest.partial.json"
    done = read_json(partial)["shards"] if partial.exists() else []
    kept = {e["file"]: (store / e["file"]).stat() for s in done for k, e in s["files"].items()
            if k != "rows"}

    ws.run("extract_mlp8").ok()
    ref, got = read_json(base.root / "data/activations/manifest.json"), read_json(store / "manifest.json")
    assert _without(got, VOLATILE["extract_mlp8"]) == _without(ref, VOLATILE["extract_mlp8"])
    assert _without(tree(store), ["manifest.json"]) == \
        _without(tree(base.root / "data/activations"), ["manifest.json"])
    _no_leftovers(ws, "extract_mlp8")
    # Finished shards were kept as they were, not written again.
    assert got["resumed_shards"] == len(done), point
    for name, st in kept.items():
        now = (store / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name


# --- train_sae ----------------------------------------------------------------------------

def _train_outputs(root: Path) -> dict:
    metrics = read_json(root / "reports/train/metrics.json")
    return {"sae": tree(root / "models/sae"), "curves": tree(root / "reports/train/curves.csv"),
            "metrics": _without(metrics, VOLATILE["train_sae"])}


@pytest.mark.parametrize("i", range(N_POINTS))
def test_train_killed_then_resumed(i, trained, tmp_path):
    counts = trained.reference.events
    point = kill_points(counts, SEED + 1, focus=("torch_save", "fsync", "replace"))[i]
    ws = trained.clone(tmp_path / "ws", "data/activations")
    killed = ws.run("train_sae", fault=point)
    assert killed.killed, f"{point} did not kill: {killed.stderr[-3000:]}"
    ckpt = ws.root / ".saelab/checkpoints/train_sae/checkpoint.pt"
    at = torch.load(ckpt, weights_only=False)["state"]["step"] if ckpt.exists() else 0

    rerun = ws.run("train_sae", events=["step"]).ok()
    assert _train_outputs(ws.root) == _train_outputs(trained.root)
    _no_leftovers(ws, "train_sae")
    # Only the steps after the last checkpoint ran again.
    assert rerun.events.get("step", 0) == counts["step"] - at, (point, at)


# --- interpret ----------------------------------------------------------------------------

def _interpret_outputs(root: Path) -> dict:
    """Reports and metrics, less the cost block (what this run spent, which a resumed run
    does not repeat) and the index page that prints it."""
    files = tree(root / "reports/interpret")
    files.pop("index.html")
    return {"files": files,
            "metrics": _without(read_json(root / "reports/interpret_metrics.json"), ["cost"])}


def _cached_answers(ws, server) -> set[str]:
    """Requests (server-side hashes) whose answers sit in the workspace's response cache."""
    ids = {read_json(p)["id"] for p in (ws.root / ".cache/interpret").rglob("*.json")}
    return {server.delivered[i] for i in ids}


@pytest.mark.parametrize("i", range(N_POINTS))
def test_interpret_killed_then_resumed(i, base, trained, interpreted, openai_server, tmp_path):
    point = kill_points(interpreted.reference.events, SEED + 2, focus=("cache_put",))[i]
    ws = base.clone(tmp_path / "ws", *INTERPRET_INPUTS[:3])
    ws.link(trained, "models/sae")
    start = openai_server.paid.copy()
    killed = ws.run("interpret", fault=point, events=INTERPRET_EVENTS)
    assert killed.killed, f"{point} did not kill: {killed.stderr[-3000:]}"
    openai_server.settle()
    cached = _cached_answers(ws, openai_server)
    lost = set(openai_server.paid - start) - cached  # answered, but the kill came first

    ws.run("interpret").ok()
    assert _interpret_outputs(ws.root) == _interpret_outputs(interpreted.root)
    _no_leftovers(ws, "interpret")
    assert not temp_names(ws.root / ".cache"), "temp files of the response cache left behind"
    paid = openai_server.paid - start
    assert set(paid) == set(interpreted.paid), "every request answered"
    # No answer is bought twice, except one that arrived in the instant of the kill,
    # before it could be stored (a real client loses those too).
    assert max(paid.values()) <= 2
    assert {h for h, n in paid.items() if n > 1} <= lost, point
