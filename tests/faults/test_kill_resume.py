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

import pytest
import torch

from saelab.sae import checkpoint
from saelab.verify import verify_sae, verify_store

from .conftest import INTERPRET_EVENTS, interpret_workspace, read_json
from .harness import (OUTPUTS, interpret_signature, resumed_shards, store_signature,
                      temp_names, train_signature)

SEED = 20240607
N_POINTS = 5


def kill_points(counts: dict[str, int], seed: int, focus: tuple[str, ...]) -> list[dict]:
    """N_POINTS distinct (event, n, before/after) kills, two of them among `focus` events
    (the rarer file-system steps that a uniform draw over all events would seldom hit)."""
    rng = random.Random(seed)
    every = [(e, n) for e, c in sorted(counts.items()) for n in range(1, c + 1)]
    picks = rng.sample([p for p in every if p[0] in focus], 2)
    picks += rng.sample([p for p in every if p not in picks], N_POINTS - len(picks))
    return [{"event": e, "n": n, "when": rng.choice(("before", "after")), "action": "kill"}
            for e, n in picks]


def _killed(ws, stage: str, point: dict, **kw):
    run = ws.run(stage, fault=point, **kw)
    assert run.killed, f"{point} did not kill (exit {run.status}): {run.stderr[-3000:]}"
    return run


def _no_leftovers(ws, stage: str) -> None:
    for rel in (*OUTPUTS[stage], ".saelab"):
        assert not temp_names(ws.root / rel), f"{rel}: {temp_names(ws.root / rel)}"


@pytest.mark.parametrize("i", range(N_POINTS))
def test_extract_killed_then_resumed(i, base, tmp_path):
    point = kill_points(base.reference.events, SEED, focus=("replace", "json_write"))[i]
    ws = base.clone(tmp_path / "ws", "models/base", "models/base.json", "data/corpus")
    store = ws.root / "data/activations"
    _killed(ws, "extract_mlp8", point)
    partial = store / "manifest.partial.json"
    done = read_json(partial)["shards"] if partial.exists() else []
    kept = {e["file"]: (store / e["file"]).stat() for s in done
            for kind, e in s["files"].items() if kind != "rows"}

    rerun = ws.run("extract_mlp8").ok()
    assert store_signature(ws.root) == store_signature(base.root)
    assert verify_store(store) == []
    _no_leftovers(ws, "extract_mlp8")
    # The shards finished before the kill were kept as they were, not computed again.
    assert resumed_shards(rerun) == len(done), point
    for name, before in kept.items():
        now = (store / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), name


@pytest.mark.parametrize("i", range(N_POINTS))
def test_train_killed_then_resumed(i, trained, tmp_path):
    counts = trained.reference.events
    point = kill_points(counts, SEED + 1, focus=("torch_save", "fsync", "replace"))[i]
    ws = trained.clone(tmp_path / "ws", "data/activations")
    _killed(ws, "train_sae", point)
    ckpt = checkpoint.latest(ws.root / ".saelab/checkpoints/train_sae")
    at = torch.load(ckpt, weights_only=False)["state"]["step"] if ckpt else 0

    rerun = ws.run("train_sae", events=["step"]).ok()
    assert train_signature(ws.root) == train_signature(trained.root)
    assert verify_sae(ws.root / "models/sae") == []
    _no_leftovers(ws, "train_sae")
    # Only the steps after the last checkpoint ran again.
    assert rerun.events.get("step", 0) == counts["step"] - at, (point, at)


def _cached_answers(ws, server) -> set[str]:
    """Requests (server-side hashes) whose answers are in the workspace's response cache."""
    ids = {read_json(p)["id"] for p in (ws.root / ".cache/interpret").rglob("*.json")}
    return {server.delivered[i] for i in ids}


@pytest.mark.parametrize("i", range(N_POINTS))
def test_interpret_killed_then_resumed(i, base, trained, interpreted, openai_server, tmp_path):
    point = kill_points(interpreted.reference.events, SEED + 2, focus=("cache_put",))[i]
    ws = interpret_workspace(base, trained, tmp_path / "ws")
    start = openai_server.paid.copy()
    _killed(ws, "interpret", point, events=INTERPRET_EVENTS)
    openai_server.settle()
    cached = _cached_answers(ws, openai_server)
    lost = set(openai_server.paid - start) - cached  # answered, but the kill came first

    ws.run("interpret").ok()
    assert interpret_signature(ws.root) == interpret_signature(interpreted.root)
    _no_leftovers(ws, "interpret")
    assert not temp_names(ws.root / ".cache"), "temp files of the response cache left behind"
    paid = openai_server.paid - start
    assert set(paid) == set(interpreted.paid), "every request was answered"
    # No answer is bought twice, except one that arrived in the instant of the kill,
    # before it could be stored (any client loses those).
    assert max(paid.values()) <= 2
    assert {h for h, n in paid.items() if n > 1} <= lost, point
