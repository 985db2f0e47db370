"""Two gloo processes (torchrun's engine, on CPU) against one: the extracted store and the
streaming-trained SAE come out the same."""
import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab.activations.store import ActivationStore
from saelab.core.config import parse_params

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAMPLE = os.path.join(REPO, "data/sample/spanish_novels_cligs.jsonl")
# 5 shards of 700 over forwards of 8 rows: rank 0 writes shards 0-1, rank 1 shards 2-4, and
# the boundary falls inside a forward batch that both ranks run.
EXTRACT = {"context_len": 64, "n_tokens": 3400, "batch_tokens": 512, "shard_tokens": 700}
SAE = {"stream": True, "stream_lanes": 2, "batch_size": 64, "shuffle_buffer": 512,
       "d_sae": 32, "n_tokens": 64 * 12, "lr_warmup_steps": 2, "l0_warmup_steps": 4,
       "log_every": 4, "eval_tokens": 0}


def params():
    return parse_params({"run": {"device": "cpu"}, "data": {"sample_path": SAMPLE, "max_docs": 150},
                         "extract": EXTRACT, "sae": SAE})


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A repository-shaped folder with the tiny model and a corpus of three novels."""
    from saelab.data.base_model import fetch_model
    from saelab.data.corpus import fetch_corpus

    root = tmp_path_factory.mktemp("repo")
    fetch_model(params(), root / "models/base", root / "models/base.json")
    fetch_corpus(params(), root / "data/corpus")
    return root


def _extract(root, out):
    from saelab.activations.extract import run_extract

    return run_extract(params(), model_dir=root / "models/base", corpus_dir=root / "data/corpus",
                       model_json=root / "models/base.json", out_dir=out)


def _stream_train(root, rank, world):
    from saelab.data.base_model import load_model
    from saelab.sae.train import _stream_source, train

    p = params()
    model, tok = load_model(root / "models/base", device="cpu", dtype=torch.float32)
    # The scale from the one-process store: saves streaming 65,536 vectors to measure it.
    store = ActivationStore(root / "acts-1")
    d_in, _, _, batches = _stream_source(p, model, tok, store, torch.device("cpu"), rank, world)
    return train(p.sae, batches, d_in=d_in, n_tokens=p.sae.n_tokens, lr=3e-3, device="cpu",
                 seed=0)


def _worker(rank, world, init_file, root):
    torch.set_num_threads(1)
    os.chdir(root)  # the stage's relative paths (data/corpus, models/base.json)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        _extract(root, root / "acts-2")
        res = _stream_train(root, rank, world)
        if rank == 0:
            torch.save(res.sae.state_dict(), root / "sae-2.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def one(root):
    """The one-process store, then both jobs on two gloo processes (one spawn)."""
    manifest = _extract(root, root / "acts-1")
    # fork: the ranks start without re-importing torch and transformers (seconds each)
    mp.start_processes(_worker, args=(2, str(root / "init"), root), nprocs=2, join=True,
                       start_method="fork")
    return manifest


def test_two_ranks_write_the_one_process_store(root, one):
    two = ActivationStore(root / "acts-2")
    assert two.verify() == []
    # Same shard names, same bytes: the manifests list the same files and hashes.
    assert two.manifest["shards"] == one["shards"] and two.manifest["rows"] == one["rows"]
    assert two.manifest["scale"] == one["scale"] and two.manifest["processes"] == 2
    assert sorted(p.name for p in (root / "acts-2").iterdir()) == \
        sorted(p.name for p in (root / "acts-1").iterdir())
    # A rerun finds the finished store (from either process count) and does nothing.
    again = _extract(root, root / "acts-2")
    assert again["shards"] == one["shards"]


def test_two_ranks_streaming_train_the_one_process_sae(root, one, monkeypatch):
    monkeypatch.chdir(root)
    single = _stream_train(root, 0, 1).sae.state_dict()  # same lanes, one process
    ddp = torch.load(root / "sae-2.pt")
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, rtol=1e-4, atol=1e-5)
    assert single["threshold" if "threshold" in single else "W_enc"].abs().sum() > 0


def test_lanes_split_rows_by_rank():
    """Rank r of W owns lanes l % W == r, which hold exactly its rows i % W == r."""
    from saelab.activations.extract import ActivationBatch
    from saelab.sae.streaming import lane_batches

    def batches(rank, world):  # 12 rows of 3 vectors, value = global row id
        rows = list(range(rank, 12, world))
        for j in range(0, len(rows), 2):
            part = rows[j:j + 2]
            local = np.repeat(np.arange(j, j + len(part)), 3)
            acts = torch.tensor(np.repeat(part, 3), dtype=torch.float32).unsqueeze(1)
            yield ActivationBatch(acts, np.zeros(len(local), np.uint32),
                                  np.stack([local, np.zeros_like(local)], 1))

    kw = dict(n_lanes=4, capacity=6, batch_size=3, seed=0, scale=1.0)
    one = [b.squeeze(1) for b in lane_batches(batches(0, 1), rank=0, world=1, **kw)]
    two = [[b.squeeze(1) for b in lane_batches(batches(r, 2), rank=r, world=2, **kw)]
           for r in range(2)]
    assert len(one) == len(two[0]) == len(two[1]) == 3
    for g, b0, b1 in zip(one, *two):
        lanes = g.reshape(4, 3)  # lane l's 3 vectors, lanes in order
        assert torch.equal(torch.cat([lanes[0], lanes[2]]), b0)
        assert torch.equal(torch.cat([lanes[1], lanes[3]]), b1)
        assert all(int(v) % 4 == lane for lane in range(4) for v in lanes[lane])
