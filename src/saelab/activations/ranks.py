"""`extract_mlp8` under torchrun: each rank writes a contiguous range of the store's shards.

Shard k holds vectors [k S, (k + 1) S) of the one-process order (S = extract.shard_tokens);
rank r of W writes shards [r K // W, (r + 1) K // W) of the K. Every rank tokenizes the
same seeded rows and counts, from the token ids alone, the vectors each row yields (the
specials are dropped; extract.outlier_k, which drops by value, must be 0). That fixes where
a rank's first shard starts: the forward batch holding its first vector (batches of
rows_per_batch rows from row 0, cut as one process cuts them) and how many of that batch's
vectors come before it. The rank forwards from that batch to the one holding its last
vector: the same batches as one process, so the same bits. A batch that straddles two
ranks' ranges is forwarded by both (at most one batch per rank boundary).

Shards keep their one-process names (shard-NNNNN.*), so the finished store is the same
files as a one-process store; rank 0 assembles rows.npy and manifest.json once every rank
is done. A rank keeps its progress in manifest.partial.rank-R-of-W.json: a rerun with the
same number of ranks resumes each rank after its last complete shard (another number of
ranks starts over). Multi-node runs need `out_dir` on a file system every node sees.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Collection, Iterable

import numpy as np
import torch.distributed as dist

from ..core.config import ExtractCfg
from ..core.errors import SaelabError
from .store import StoreWriter, clear_for_ranks, rank_partial, read_rank_shards, store_header

log = logging.getLogger(__name__)


def rows_for(rows: Iterable[np.ndarray], n_tokens: int, exclude: Collection[int],
             ) -> tuple[np.ndarray, np.ndarray]:
    """The rows a store of `n_tokens` vectors is cut from, and the running count of the
    vectors they yield (ends[i]: vectors in rows 0..i)."""
    excl = np.fromiter(exclude, dtype=np.int64)
    kept, ends, total = [], [], 0
    for row in rows:
        kept.append(row)
        total += int(len(row) - np.isin(row, excl).sum())
        ends.append(total)
        if total >= n_tokens:
            return np.stack(kept), np.asarray(ends, dtype=np.int64)
    raise SaelabError(ran_out(total, n_tokens))


def ran_out(done: int, n_tokens: int) -> str:
    return (f"the corpus ran out after {done} of extract.n_tokens = {n_tokens} storable "
            "tokens; fetch more text (raise data.token_budget or data.max_docs) or lower "
            "extract.n_tokens")


def part_start(v: int, ends: np.ndarray, per_batch: int) -> tuple[int, int, int]:
    """For a part starting at vector `v`: (first row of the batch holding it, vectors of
    that batch before it, first row of the part's rows.npy slice)."""
    row = int(np.searchsorted(ends, v, side="right"))
    first = row // per_batch * per_batch
    skip = v - (int(ends[first - 1]) if first else 0)
    rows_lo = int(np.searchsorted(ends, v - 1, side="right")) + 1 if v else 0
    return first, skip, rows_lo


def rank_writer(rows: Iterable[np.ndarray], cfg: ExtractCfg, out_dir: Path, *, fp: str, d: int,
                exclude: Collection[int], per_batch: int, rank: int, world: int,
                ) -> tuple[dict[str, Any] | None, StoreWriter | None, Iterable[np.ndarray]]:
    """(the finished store's manifest, None, ()) when there is one; else (None, this rank's
    writer, the rows it forwards, from writer.resume_row on)."""
    if cfg.outlier_k > 0:
        raise SaelabError(f"extract.outlier_k = {cfg.outlier_k:g} drops vectors by value, so "
                          "the ranks cannot tell where their shards start; extract with one "
                          "process (run.launcher = python) or set extract.outlier_k = 0")
    header = store_header(fingerprint=fp, d=d, dtype=cfg.store_dtype, n_tokens=cfg.n_tokens,
                          shard_tokens=cfg.shard_tokens, context_len=cfg.context_len)
    box = [clear_for_ranks(Path(out_dir), header, world) if rank == 0 else None]
    dist.broadcast_object_list(box, src=0)
    complete, work = box[0]
    if complete is not None:
        return complete, None, ()
    all_rows, ends = rows_for(rows, cfg.n_tokens, exclude)
    n_shards = -(-cfg.n_tokens // cfg.shard_tokens)
    part = range(rank * n_shards // world, (rank + 1) * n_shards // world)
    first_v = part.start * cfg.shard_tokens
    writer = StoreWriter(work, **{k: v for k, v in header.items() if k != "format"},
                         part=part, partial=rank_partial(rank, world),
                         start=part_start(first_v, ends, per_batch) if part else (0, 0, 0))
    if not part:
        return None, writer, ()
    last_v = min(part.stop * cfg.shard_tokens, cfg.n_tokens) - 1
    last_row = int(np.searchsorted(ends, last_v, side="right"))
    stop = (last_row // per_batch + 1) * per_batch
    log.info("rank %d of %d: shards %d..%d (vectors %d..%d), rows %d..%d", rank, world,
             part.start, part.stop - 1, first_v, last_v, writer.resume_row,
             min(stop, len(all_rows)) - 1)
    return None, writer, iter(all_rows[writer.resume_row:stop])


def assemble(out_dir: Path, header: dict[str, Any], world: int) -> StoreWriter | None:
    """After every rank finished: rank 0 gets a writer holding all shards (to finalize),
    the other ranks None."""
    dist.barrier()
    if dist.get_rank() != 0:
        return None
    return StoreWriter.assembled(out_dir, header, read_rank_shards(Path(out_dir), world))


def share(manifest: dict[str, Any] | None) -> dict[str, Any]:
    """Rank 0's manifest, on every rank."""
    box = [manifest]
    dist.broadcast_object_list(box, src=0)
    return box[0]
