"""The training loop: schedules, recovery of a known dictionary, resume after SIGKILL, NaN guard."""
import dataclasses
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch

from saelab.sae import checkpoint
from saelab.core.config import SAECfg
from saelab.core.errors import SaelabError
from saelab.sae.schedules import COSINE_FLOOR, l0_factor, lr_factor
from saelab.sae.train import train

REPO_SRC = os.path.join(os.path.dirname(__file__), "..", "src")


def cfg(**kw) -> SAECfg:
    base = dict(d_sae=32, batch_size=64, lr_warmup_steps=4, l0_warmup_steps=8, log_every=5,
                checkpoint_every=10, theta_param="raw")
    return dataclasses.replace(SAECfg(), **{**base, **kw})


def synthetic(d: int = 16, n_atoms: int = 32, seed: int = 0):
    """Known dictionary: unit atoms, each active w.p. 3/n_atoms with magnitude U(0.5, 1.5)."""
    g = torch.Generator().manual_seed(seed)
    atoms = torch.randn(n_atoms, d, generator=g)
    atoms /= atoms.norm(dim=1, keepdim=True)

    def batches(batch_size: int, start: int = 0, nan_at: int | None = None):
        i = start
        while True:
            gi = torch.Generator().manual_seed(1_000_003 * (seed + 1) + i)
            on = torch.rand(batch_size, n_atoms, generator=gi) < 3 / n_atoms
            coef = on * (0.5 + torch.rand(batch_size, n_atoms, generator=gi))
            x = (coef @ atoms + 0.01 * torch.randn(batch_size, d, generator=gi)) / 1.3
            if i == nan_at:
                x[0, 0] = math.nan
            yield x
            i += 1

    return atoms, batches


def test_lr_and_lambda_warmups():
    c = cfg(lr_warmup_steps=10, lr_warmup_start=0.1, l0_warmup_steps=20, lr_decay="constant")
    assert lr_factor(0, 100, c) == pytest.approx(0.1)
    assert lr_factor(5, 100, c) == pytest.approx(0.55)  # cosine midpoint
    assert lr_factor(10, 100, c) == 1.0 and lr_factor(99, 100, c) == 1.0
    cos = dataclasses.replace(c, lr_decay="cosine")
    assert lr_factor(10, 100, cos) == pytest.approx(1.0)
    assert lr_factor(99, 100, cos) == pytest.approx(COSINE_FLOOR)
    assert [l0_factor(s, c) for s in (0, 5, 20, 50)] == [0.0, 0.25, 1.0, 1.0]
    assert l0_factor(0, dataclasses.replace(c, l0_warmup_steps=0)) == 1.0

    _, batches = synthetic()
    c = cfg(lr_warmup_steps=6, l0_warmup_steps=12, log_every=1, l0_coeff=0.02)
    res = train(c, batches(64), d_in=16, n_tokens=64 * 16, lr=1e-2, device="cpu", seed=0)
    for row in res.history:
        s = row["step"] - 1  # the row logged after step s carries step s's values
        assert row["lr"] == pytest.approx(1e-2 * lr_factor(s, 16, c))
        assert row["lambda"] == pytest.approx(0.02 * min(1.0, s / 12))


@pytest.mark.parametrize("arch,lr,extra", [
    ("jumprelu", 1e-2, dict(theta_param="raw", l0_coeff=0.03)),
    ("jumprelu", 3e-2, dict(theta_param="log", l0_coeff=0.03)),
    ("topk", 3e-3, dict(k=3)),
])
def test_recovers_a_known_dictionary(arch, lr, extra):
    atoms, batches = synthetic(d=32, n_atoms=64)
    c = cfg(architecture=arch, d_sae=128, batch_size=512, lr_warmup_steps=10,
            l0_warmup_steps=100, log_every=100, **extra)
    res = train(c, batches(512), d_in=32, n_tokens=512 * 800, lr=lr, device="cpu", seed=0,
                eval_batches=batches(512, start=10**6), eval_n_batches=4)
    W = res.sae.W_dec.detach()
    best_cos = (atoms @ (W / W.norm(dim=1, keepdim=True)).t()).max(1).values
    assert (best_cos > 0.9).float().mean() >= 0.9
    assert res.metrics["fvu"] < 0.2 and 2 <= res.metrics["l0"] <= 5
    for key in ("mse", "fvu", "l0", "dead_fraction", "frac_active_gt_1pct",
                "frac_active_gt_10pct", "tokens_per_s", "final_loss"):
        assert math.isfinite(res.metrics[key]), key
    assert [r["step"] for r in res.history] == [100, 200, 300, 400, 500, 600, 700, 800]


def test_nan_guard_stops_and_keeps_last_good_checkpoint(tmp_path):
    _, batches = synthetic()
    with pytest.raises(SaelabError, match="step 13 of 30"):
        train(cfg(), lambda start: batches(64, start, nan_at=12), d_in=16, n_tokens=64 * 30,
              lr=1e-2, device="cpu", seed=0, checkpoint_dir=tmp_path)
    state = torch.load(checkpoint.latest(tmp_path), weights_only=False)
    assert state["state"]["step"] == 10
    assert all(torch.isfinite(v).all() for v in state["sae"].values())


def test_changed_config_starts_fresh(tmp_path):
    _, batches = synthetic()
    kw = dict(d_in=16, n_tokens=64 * 20, lr=1e-2, device="cpu", seed=0, checkpoint_dir=tmp_path)
    first = train(cfg(), lambda s: batches(64, s), **kw)
    again = train(cfg(), lambda s: batches(64, s), **kw)  # resumes at the end: nothing to do
    assert math.isnan(again.metrics["tokens_per_s"])
    assert torch.equal(again.sae.W_dec, first.sae.W_dec)
    changed = train(cfg(l0_coeff=0.05), lambda s: batches(64, s), **kw)
    assert math.isfinite(changed.metrics["tokens_per_s"])
    assert len(changed.history) == len(first.history)


CHILD = textwrap.dedent("""
    import sys, time, torch
    sys.path.insert(0, {src!r})
    sys.path.insert(0, {tests!r})
    torch.set_num_threads(1)
    from test_train import cfg, synthetic
    from saelab.sae.train import train
    ckpt, out, slow = sys.argv[1], sys.argv[2], sys.argv[3] == "slow"
    _, batches = synthetic()
    log = (lambda step, row: time.sleep(0.15)) if slow else None
    res = train(cfg(architecture="{arch}", k=4, aux_k=8, dead_tokens=64 * 5),
                lambda s: batches(64, s), d_in=16, n_tokens=64 * 60, lr=1e-2, device="cpu",
                seed=0, checkpoint_dir=ckpt, log_fn=log)
    torch.save(res.sae.state_dict(), out)
""")


# batchtopk: its threshold is calibrated on the last batches after the last step; a run
# resumed inside them reads them again.
@pytest.mark.parametrize("arch", ["jumprelu", "topk", "batchtopk"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, arch):
    script = tmp_path / "child.py"
    script.write_text(CHILD.format(src=os.path.abspath(REPO_SRC),
                                   tests=os.path.dirname(os.path.abspath(__file__)), arch=arch))
    env = {**os.environ, "PYTHONPATH": os.path.abspath(REPO_SRC)}

    def run(ckpt, out, mode):
        return subprocess.Popen([sys.executable, str(script), str(ckpt), str(out), mode], env=env)

    killed = run(tmp_path / "ck", tmp_path / "killed.pt", "slow")
    deadline = time.time() + 60
    while checkpoint.latest(tmp_path / "ck") is None:
        assert killed.poll() is None, "child finished or crashed before its first checkpoint"
        assert time.time() < deadline
        time.sleep(0.05)
    time.sleep(0.4)  # a little past the checkpoint: the kill loses some steps
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not (tmp_path / "killed.pt").exists()
    step = torch.load(checkpoint.latest(tmp_path / "ck"), weights_only=False)["state"]["step"]
    assert 0 < step < 60

    resumed = run(tmp_path / "ck", tmp_path / "resumed.pt", "fast")
    straight = run(tmp_path / "ck2", tmp_path / "straight.pt", "fast")
    assert resumed.wait() == 0 and straight.wait() == 0
    a = torch.load(tmp_path / "resumed.pt")
    b = torch.load(tmp_path / "straight.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def _tiny_store(path, n_rows=32, ctx=9, d=8):
    """A real store (through the store's writer) of random vectors, one per non-BOS token."""
    from saelab.activations.store import StoreWriter

    g = np.random.default_rng(0)
    rows = g.integers(0, 5000, size=(n_rows, ctx)).astype(np.uint32)
    rows[:, 0] = 128000
    acts = g.standard_normal((n_rows * (ctx - 1), d)).astype(np.float32) * 3
    index = np.array([[r, p] for r in range(n_rows) for p in range(1, ctx)], dtype=np.int64)
    writer = StoreWriter(path, fingerprint="test", d=d, dtype="float32", n_tokens=len(acts),
                         shard_tokens=100, context_len=ctx)
    writer.add(0, rows, acts, rows[:, 1:].reshape(-1), index, np.linalg.norm(acts, axis=1))
    writer.finalize({}, vocab_size=128256, special_ids=[128000, 128001], bos_id=128000,
                    eos_id=128001)
    return acts


def test_streaming_and_store_give_the_same_batches_and_sae(tmp_path):
    from saelab.activations.store import ActivationStore
    from saelab.sae.train import shuffled_batches

    acts = _tiny_store(tmp_path / "store")
    store = ActivationStore(tmp_path / "store")
    chunks = (torch.from_numpy(c) for c in np.array_split(acts, 7))  # as the producer yields
    streamed = shuffled_batches(chunks, capacity=len(acts), batch_size=32, seed=3,
                                scale=store.scale)
    from_store = store.iter_batches(32, seed=3)
    for _ in range(len(acts) // 32):
        assert torch.equal(next(streamed), next(from_store))
    assert next(streamed, None) is None  # a finite stream ends; train() names the shortfall

    c = cfg(d_sae=16, batch_size=32, architecture="topk", k=2)
    kw = dict(d_in=8, n_tokens=len(acts), lr=1e-2, device="cpu", seed=0)
    a = train(c, shuffled_batches(iter([torch.from_numpy(acts)]), capacity=10**6,
                                  batch_size=32, seed=3, scale=store.scale), **kw)
    b = train(c, lambda s: store.iter_batches(32, seed=3, start_batch=s), **kw)
    assert all(torch.equal(x, y) for x, y in zip(a.sae.state_dict().values(),
                                                 b.sae.state_dict().values()))


def test_small_shuffle_buffer_keeps_every_vector_once():
    from saelab.sae.train import shuffled_batches

    x = torch.arange(1000, dtype=torch.float32).unsqueeze(1)
    out = torch.cat(list(shuffled_batches(iter(x.split(64)), capacity=200, batch_size=50,
                                          seed=0, scale=1.0)))
    assert sorted(out.squeeze(1).tolist()) == list(range(1000))
    assert out.squeeze(1)[:200].max() < 264  # batches come from the buffer's window


def test_lr_and_token_sources(tmp_path):
    import json

    from saelab.sae.train import resolve_lr, resolve_tokens

    fit, budget = tmp_path / "fit.json", tmp_path / "budget.json"
    assert resolve_lr(cfg(lr=2e-4), fit) == (2e-4, "params.sae.lr")
    with pytest.raises(SaelabError, match="fit_scaling_laws"):
        resolve_lr(cfg(lr=None), fit)
    fit.write_text(json.dumps({"recommended": {"lr": 3e-4, "lr_source": "fit"}}))
    assert resolve_lr(cfg(lr=None), fit) == (3e-4, f"{fit} (fit)")
    assert resolve_tokens(cfg(n_tokens=4096), budget) == (4096, "params.sae.n_tokens")
    with pytest.raises(SaelabError, match="n_tokens"):
        resolve_tokens(cfg(n_tokens=None), budget)
    budget.write_text(json.dumps({"tokens": 2.1e9}))
    assert resolve_tokens(cfg(n_tokens=None), budget) == (2_100_000_000, str(budget))


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_free_decoder_norm_starts_small_and_is_left_to_training(arch):
    """sae.decoder_norm=free (SAELens): atoms start at encoder_init_scale, W_enc = W_dec^T,
    and training neither projects nor renormalises them. TopK picks and decodes with the
    unit atoms, the norms scaling its pre-activations."""
    from saelab.sae.autoencoder import SAE

    c = dataclasses.replace(SAECfg(), architecture=arch, k=4, d_sae=32, batch_size=64,
                            decoder_norm="free", encoder_init_scale=0.1, lr_warmup_steps=0,
                            l0_warmup_steps=0)
    sae = SAE(8, 32, c)
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.full((32,), 0.1))
    assert torch.equal(sae.W_enc, sae.W_dec.t())

    gen = torch.Generator().manual_seed(0)

    def batches():
        while True:
            yield torch.randn(64, 8, generator=gen)

    res = train(c, batches(), d_in=8, n_tokens=64 * 30, lr=1e-2, device="cpu", seed=0)
    norms = res.sae.W_dec.detach().norm(dim=1)
    assert (norms - 0.1).abs().max() > 1e-3  # moved by training...
    assert (norms - 1.0).abs().max() > 1e-3  # ...and not renormalised to 1
    if arch == "topk":
        x = torch.randn(16, 8, generator=gen)
        with torch.no_grad():
            z = (x - res.sae.b_dec) @ res.sae.W_enc + res.sae.b_enc
            torch.testing.assert_close(res.sae.pre_acts(x), z * norms)
            f = res.sae.encode(x)
            torch.testing.assert_close(res.sae.decode(f),
                                       f @ (res.sae.W_dec / norms[:, None]) + res.sae.b_dec)
