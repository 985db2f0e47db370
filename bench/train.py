"""Training throughput (tokens/s): saelab's trainer vs SAELens's SAETrainer, same sizes.

Both train from the same in-memory batches for the same number of steps, timed wall-clock
around the whole training call after a short warm-up run of each. On a GPU both use bf16
autocast, and the default size is DESIGN §9's (d_in 2048, d_sae 16384, batch 4096),
also reported as a percentage of the SAE roofline: 6 x 2 x d_in x d_sae FLOP per token
against 790 TFLOP/s (H100 bf16 dense).

    .venv/bin/python bench/train.py      # saelab + SAELens (installed by `make test`) on CPU
    .venv/bin/python bench/train.py --device cuda
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import time

import torch

from saelab.core.config import SAECfg
from saelab.sae.train import train

PEAK_FLOPS = 790e12
CPU_SIZES = "64x512x4096,256x2048x4096"
GPU_SIZES = "2048x16384x4096"


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _timed(fn, device: str) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def ours(arch: str, d_in: int, d_sae: int, batch: int, steps: int, data, device: str) -> float:
    cfg = dataclasses.replace(SAECfg(), architecture=arch, d_sae=d_sae, batch_size=batch,
                              lr_warmup_steps=10, l0_warmup_steps=10, k=32, log_every=20)

    def run(n: int):
        train(cfg, itertools.cycle(data), d_in=d_in, n_tokens=batch * n, lr=1e-4,
              device=device, seed=0)

    run(3)
    return steps * batch / _timed(lambda: run(steps), device)


def saelens(arch: str, d_in: int, d_sae: int, batch: int, steps: int, data, device: str) -> float:
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    def run(n: int):
        if arch == "jumprelu":
            sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(
                d_in=d_in, d_sae=d_sae, device=device, jumprelu_init_threshold=1e-3,
                jumprelu_bandwidth=1e-3, l0_coefficient=1e-3, l0_warm_up_steps=10))
        else:
            sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d_in, d_sae=d_sae, k=32,
                                                        device=device))
        cfg = SAETrainerConfig(
            total_training_samples=batch * n, train_batch_size_samples=batch, lr=1e-4,
            lr_end=1e-4, lr_warm_up_steps=10, adam_beta1=0.0, adam_beta2=0.999,
            device=device, autocast=device == "cuda",
            logger=LoggingConfig(log_to_wandb=False, eval_every_n_wandb_logs=2**31 - 1))
        SAETrainer(cfg=cfg, sae=sae, data_provider=itertools.cycle(data)).fit()

    run(3)
    return steps * batch / _timed(lambda: run(steps), device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--sizes", default=None, help="d_in x d_sae x batch, comma-separated")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--archs", default="jumprelu,topk")
    ap.add_argument("--repeats", type=int, default=3, help="best of N timings (shared CPUs)")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0: torch default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gpu = args.device == "cuda"
    sizes = [tuple(int(v) for v in s.split("x"))
             for s in (args.sizes or (GPU_SIZES if gpu else CPU_SIZES)).split(",")]
    steps = args.steps or (200 if gpu else 20)
    try:
        import sae_lens  # noqa: F401
        have_saelens = True
    except ImportError:
        have_saelens = False
        print("sae_lens is not installed here: SAELens column skipped")
    name = torch.cuda.get_device_name() if gpu else f"CPU, {torch.get_num_threads()} threads"
    print(f"device: {name}; {steps} timed steps per run; torch {torch.__version__}")
    print(f"{'arch':9s} {'d_in':>5s} {'d_sae':>6s} {'batch':>6s} {'saelab tok/s':>13s} "
          f"{'sae_lens tok/s':>15s} {'ratio':>6s}" + (f" {'% roofline':>10s}" if gpu else ""))
    for (d_in, d_sae, batch), arch in itertools.product(sizes, args.archs.split(",")):
        g = torch.Generator().manual_seed(0)
        data = [torch.randn(batch, d_in, generator=g).div_(d_in ** 0.5).to(args.device)
                for _ in range(4)]
        mine, theirs = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            mine.append(ours(arch, d_in, d_sae, batch, steps, data, args.device))
            if have_saelens:
                theirs.append(saelens(arch, d_in, d_sae, batch, steps, data, args.device))
        a, b = max(mine), max(theirs, default=float("nan"))
        line = (f"{arch:9s} {d_in:5d} {d_sae:6d} {batch:6d} {a:13,.0f} {b:15,.0f} "
                f"{a / b:6.2f}")
        if gpu:
            line += f" {100 * a * 12 * d_in * d_sae / PEAK_FLOPS:10.1f}"
        print(line, flush=True)


if __name__ == "__main__":
    main()
