"""Extraction split over ranks (torchrun's engine) against one process, on the same rows.

One process with T threads, then T gloo processes with one thread each (what
`torchrun --nproc_per_node=T stages/extract_mlp8.py` runs), extract the same store from the
same seeded model and documents. It prints both rates, their ratio, each rank's own rate
(the scaling a many-GPU user sees) and whether the two stores hold the same bytes (their
manifests list the same sha256 for every shard file). Runs alternate and each side keeps
its best time, so other load on the machine penalises neither more.

    python bench/extract_ranks.py                 # 2 ranks, hidden-256 model, CPU
    python bench/extract_ranks.py --ranks 2 --hidden 64 --tokens 65536
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from saelab.activations.extract import extract_store  # noqa: E402
from saelab.core.config import ExtractCfg, ModelCfg  # noqa: E402
from saelab.data.tokenizer import load_llama3_tokenizer  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from extract import build_model, load_texts  # noqa: E402


def setup(args):
    model_cfg = dataclasses.replace(ModelCfg(), hidden_size=args.hidden,
                                    intermediate_size=4 * args.hidden)
    ext = ExtractCfg(context_len=args.context, n_tokens=args.tokens, batch_tokens=4096,
                     shard_tokens=args.tokens // 8)
    model = build_model(model_cfg, torch.device("cpu"), torch.float32)
    with torch.no_grad():  # start-up costs (allocator, kernels) are no one's throughput
        model(torch.ones(1, args.context, dtype=torch.long))
    return model, load_llama3_tokenizer(), load_texts(args.docs), ext


def _rank(rank, world, init, args, out, result):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init}", rank=rank, world_size=world)
    try:
        model, tok, texts, ext = setup(args)
        lines: list[str] = []  # the extractor's own per-rank line: tokens, seconds, tokens/s
        logger = logging.getLogger("saelab.activations.extract")
        logger.setLevel(logging.INFO)
        logger.addFilter(lambda rec: lines.append(rec.getMessage()) or True)
        dist.barrier()
        t0 = time.perf_counter()
        extract_store(model, tok, texts, ext, out, device="cpu", inputs={"bench": "ranks"})
        seconds = time.perf_counter() - t0
        own = next(line for line in lines if line.startswith("stored"))
        Path(f"{result}.{rank}").write_text(json.dumps({"seconds": seconds, "line": own}))
    finally:
        dist.destroy_process_group()


def run_ranks(args, tmp: Path, rep: int) -> tuple[float, list[float], dict]:
    out, init, result = tmp / f"ranks{rep}", tmp / f"init{rep}", tmp / f"result{rep}"
    mp.spawn(_rank, args=(args.ranks, str(init), args, out, str(result)), nprocs=args.ranks,
             join=True)
    per_rank = [json.loads(Path(f"{result}.{r}").read_text()) for r in range(args.ranks)]
    return (max(r["seconds"] for r in per_rank), [r["line"] for r in per_rank],
            json.loads((out / "manifest.json").read_text()))


def run_one(args, tmp: Path, rep: int) -> tuple[float, dict]:
    torch.set_num_threads(args.ranks)
    model, tok, texts, ext = setup(args)
    out = tmp / f"one{rep}"
    t0 = time.perf_counter()
    manifest = extract_store(model, tok, texts, ext, out, device="cpu", inputs={"bench": "ranks"})
    return time.perf_counter() - t0, manifest


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--context", type=int, default=128)
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--docs", type=int, default=60)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    one_s = ranks_s = float("inf")
    ranks_each: list[str] = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for rep in range(args.repeat):
            for side in (("one", "ranks") if rep % 2 == 0 else ("ranks", "one")):
                if side == "one":
                    s, one_m = run_one(args, tmp, rep)
                    one_s = min(one_s, s)
                else:
                    s, each, ranks_m = run_ranks(args, tmp, rep)
                    if s < ranks_s:
                        ranks_s, ranks_each = s, each
    same = [s["files"] for s in one_m["shards"]] == [s["files"] for s in ranks_m["shards"]]
    n = args.tokens
    print(f"extraction of {n} tokens, hidden {args.hidden}, context {args.context}, CPU "
          f"({os.cpu_count()} cores), best of {args.repeat}")
    print(f"  1 process x {args.ranks} threads : {n / one_s:10,.0f} tokens/s ({one_s:.1f} s)")
    print(f"  {args.ranks} ranks x 1 thread     : {n / ranks_s:10,.0f} tokens/s ({ranks_s:.1f} s)")
    for line in ranks_each:
        print(f"    {line}")
    print(f"  ratio ranks / one process: {one_s / ranks_s:.2f}x (target >= 0.9x)")
    print(f"  same store bytes (every shard file's sha256): {same}")


if __name__ == "__main__":
    main()
