"""Stage `extract_mlp8`: Llama activations at one hook point into the store (DESIGN §5).

Text -> token rows -> truncated forward -> vectors, in three reusable pieces:

- `token_rows` tokenizes documents (EOS after each) and `pack_rows` cuts the stream into
  rows of `context_len` tokens, each starting with BOS; no padding anywhere.
- `ActivationSource` forwards a block of rows only up to the hooked layer (`hooks.capture`)
  and keeps the vectors of ordinary tokens (the tokenizer's BOS/EOS and other specials
  dropped, optionally norm outliers). `stream_activations` wraps it as an iterator: the single producer behind
  both the store writer here and the trainer's streaming mode.
- `extract_store` runs the producer on a GPU (or every CPU core) while a writer thread
  hashes and writes shards (`store.StoreWriter`), so the device never waits for the disk.

`run_extract` reads the training documents in a seeded random order of the whole split
(`iter_documents(..., seed=run.seed)`), so a store smaller than the corpus samples every
part of it rather than its first part in file order. Documents stay whole and rows are
packed as above; the order is fixed by the seed, so a resumed run sees the same rows, and
the seed is part of the store's fingerprint (another seed never resumes this store).
"""
from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import queue
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, Collection, Iterable, Iterator, NamedTuple

import numpy as np
import torch
from torch import nn

from ..core import paths
from ..core.config import ExtractCfg, Params
from ..core.errors import SaelabError
from ..core.runtime import rank_world
from ..core.tracking import log_metrics
from .hooks import capture, hook_dim, hook_module
from .ranks import ran_out
from .store import (STORE_DTYPES, StoreWriter, build_dir, check_disk, estimate_bytes, promote,
                    store_header)

log = logging.getLogger(__name__)

_CODE = ("extract.py", "store.py", "hooks.py", "ranks.py")


# --- text to rows ----------------------------------------------------------------------

def special_token_ids(tokenizer) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (BOS, EOS, reserved): never stored.

    For the Llama-3.2 tokenizer these are 128000..128255; for SmolLM2's, 0..16.
    """
    ids = {i for i, tok in tokenizer.added_tokens_decoder.items() if tok.special}
    return frozenset(ids | set(tokenizer.all_special_ids))


def encode_documents(tokenizer, texts: Iterable[str], *, batch_docs: int = 256,
                     ) -> Iterator[np.ndarray]:
    """Token ids of each document followed by EOS (uint32), tokenized in batches."""
    eos = tokenizer.eos_token_id
    batch: list[str] = []

    def flush() -> Iterator[np.ndarray]:
        for ids in tokenizer(batch, add_special_tokens=False,
                             return_attention_mask=False)["input_ids"]:
            ids.append(eos)
            yield np.asarray(ids, dtype=np.uint32)
        batch.clear()

    for text in texts:
        batch.append(text)
        if len(batch) == batch_docs:
            yield from flush()
    if batch:
        yield from flush()


def pack_rows(token_stream: Iterable[np.ndarray], context_len: int, bos_id: int,
              ) -> Iterator[np.ndarray]:
    """Rows of `context_len` uint32 ids: BOS, then the next `context_len - 1` stream tokens.

    Documents run on across row boundaries (their EOS separates them); the incomplete
    tail of the stream is dropped rather than padded.
    """
    body = context_len - 1
    if body < 1:
        raise SaelabError(f"context_len = {context_len} leaves no room after BOS; use >= 2")
    pending: list[np.ndarray] = []
    have = 0
    for chunk in token_stream:
        pending.append(np.asarray(chunk, dtype=np.uint32))
        have += len(chunk)
        if have < body:
            continue
        flat = np.concatenate(pending)
        n = len(flat) // body
        rows = np.empty((n, context_len), dtype=np.uint32)
        rows[:, 0] = bos_id
        rows[:, 1:] = flat[: n * body].reshape(n, body)
        yield from rows
        pending, have = [flat[n * body:]], len(flat) - n * body


def token_rows(tokenizer, texts: Iterable[str], context_len: int) -> Iterator[np.ndarray]:
    """Documents to packed rows with the tokenizer's BOS/EOS."""
    return pack_rows(encode_documents(tokenizer, texts), context_len, tokenizer.bos_token_id)


def batched_rows(rows: Iterable[np.ndarray], rows_per_batch: int, first_row: int = 0,
                 ) -> Iterator[tuple[int, np.ndarray]]:
    """(global id of the first row, rows [b, ctx]) blocks of `rows_per_batch` rows."""
    block: list[np.ndarray] = []
    for row in rows:
        block.append(row)
        if len(block) == rows_per_batch:
            yield first_row, np.stack(block)
            first_row += len(block)
            block = []
    if block:
        yield first_row, np.stack(block)


def prefetch(iterable: Iterable, depth: int = 4) -> Iterator:
    """Run `iterable` in a background thread (tokenization overlaps the forward passes)."""
    q: queue.Queue = queue.Queue(depth)
    end = object()
    stop = threading.Event()

    def work() -> None:
        try:
            for item in iterable:
                if stop.is_set():
                    return
                q.put((item, None))
        except BaseException as e:  # re-raised in the consumer
            q.put((end, e))
            return
        q.put((end, None))

    thread = threading.Thread(target=work, daemon=True, name="saelab-rows")
    thread.start()
    try:
        while True:
            item, err = q.get()
            if err is not None:
                raise err
            if item is end:
                return
            yield item
    finally:
        stop.set()
        while thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                q.get(timeout=0.1)
            except queue.Empty:
                pass


# --- rows to activations ---------------------------------------------------------------

class ActivationBatch(NamedTuple):
    acts: torch.Tensor       # [n, d] on the model's device, its compute dtype, no autograd
    token_ids: np.ndarray    # uint32 [n]
    index: np.ndarray        # int64 [n, 2]: (global row, position in row)


class ActivationSource:
    """One truncated forward per block of rows; keeps the vectors worth storing."""

    def __init__(self, model: nn.Module, *, layer: int, hook: str, device: torch.device | str,
                 exclude_ids: Collection[int], outlier_k: float = 0.0):
        hook_module(model, layer, hook)  # fail now, naming what exists
        self.model, self.layer, self.hook = model, layer, hook
        self.device = torch.device(device)
        self.d = hook_dim(model.config, hook)
        self.exclude = np.fromiter(exclude_ids, dtype=np.int64)
        self.outlier_k = outlier_k

    def __call__(self, rows: np.ndarray, first_row: int) -> ActivationBatch:
        ctx = rows.shape[1]
        flat = rows.reshape(-1)
        keep = np.flatnonzero(~np.isin(flat, self.exclude)) if self.exclude.size \
            else np.arange(flat.size)
        ids = torch.from_numpy(rows.astype(np.int64))
        keep_t = torch.from_numpy(keep)
        if self.device.type == "cuda":  # pinned -> async copies queue behind the forward
            ids, keep_t = ids.pin_memory(), keep_t.pin_memory()
        ids = ids.to(self.device, non_blocking=True)
        keep_t = keep_t.to(self.device, non_blocking=True)
        with torch.inference_mode(), capture(self.model, self.layer, self.hook) as h:
            hidden = h.run(ids).reshape(-1, self.d)
        # Selecting outside inference mode makes `acts` an ordinary tensor: a trainer may
        # feed it to autograd (inference tensors cannot be saved for backward).
        with torch.no_grad():
            acts = hidden.index_select(0, keep_t)
            if self.outlier_k > 0 and len(keep):
                # The median of this forward batch: a reference that needs no second pass
                # and is the same whether or not the run was interrupted.
                norms = torch.linalg.vector_norm(acts, dim=1, dtype=torch.float32)
                ok = norms <= self.outlier_k * norms.median()
                acts = acts[ok]
                keep = keep[ok.cpu().numpy()]
        index = np.stack([first_row + keep // ctx, keep % ctx], axis=1)
        return ActivationBatch(acts, flat[keep], index)


def rows_per_batch(batch_tokens: int, context_len: int) -> int:
    return max(1, batch_tokens // context_len)


def stream_activations(model: nn.Module, rows_iter: Iterable[np.ndarray], *, layer: int,
                       hook: str, batch_tokens: int, device: torch.device | str,
                       exclude_ids: Collection[int], first_row: int = 0,
                       ) -> Iterator[ActivationBatch]:
    """(acts [n, d], token_ids, index) per forward of ~`batch_tokens` tokens, without disk.

    `rows_iter` yields packed rows (`token_rows`); `acts` stay on `device` in the model's
    dtype. Tokens in `exclude_ids` (the tokenizer's `special_token_ids`) are dropped. Row
    ids in `index` count from `first_row`.
    """
    rows_iter = iter(rows_iter)
    first = next(rows_iter, None)
    if first is None:
        return
    source = ActivationSource(model, layer=layer, hook=hook, device=device,
                              exclude_ids=exclude_ids)
    rows = itertools.chain([first], rows_iter)
    for start, block in batched_rows(rows, rows_per_batch(batch_tokens, len(first)), first_row):
        yield source(block, start)


# --- the store writer pipeline ---------------------------------------------------------

def fingerprint(cfg: ExtractCfg, inputs: dict[str, Any]) -> str:
    """Hash of everything that decides the store's bytes; resume only across equal ones."""
    here = Path(__file__).parent
    code = {name: hashlib.sha256((here / name).read_bytes()).hexdigest() for name in _CODE}
    blob = json.dumps({"extract": dataclasses.asdict(cfg), "inputs": inputs, "code": code,
                       "torch": torch.__version__}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


class _HostCopies:
    """Device -> host copies of each batch's vectors and norms, handed to the writer thread.

    On a GPU the copies go into a ring of pinned buffers, non-blocking, with an event the
    writer waits on; `depth` batches may be in flight, and a buffer is reused only after
    the writer finished the batch that used it `depth + 1` batches ago.
    """

    def __init__(self, device: torch.device, max_tokens: int, d: int, dtype: torch.dtype,
                 depth: int):
        self.cuda = device.type == "cuda"
        self.ring = [(torch.empty(max_tokens, d, dtype=dtype, pin_memory=True),
                      torch.empty(max_tokens, dtype=torch.float32, pin_memory=True))
                     for _ in range(depth + 1)] if self.cuda else []
        self.i = 0

    def __call__(self, acts: torch.Tensor, norms: torch.Tensor):
        if not self.cuda:
            return acts, norms, None
        buf_a, buf_n = self.ring[self.i % len(self.ring)]
        self.i += 1
        n = len(acts)
        buf_a[:n].copy_(acts, non_blocking=True)
        buf_n[:n].copy_(norms, non_blocking=True)
        event = torch.cuda.Event()
        event.record()
        return buf_a[:n], buf_n[:n], event


def _numpy_bits(t: torch.Tensor) -> np.ndarray:
    """A host tensor as numpy; bf16 as its uint16 bits (numpy has no bf16)."""
    return (t.view(torch.uint16) if t.dtype == torch.bfloat16 else t).numpy()


def extract_store(model: nn.Module, tokenizer, texts: Iterable[str], cfg: ExtractCfg,
                  out_dir: Path, *, device: torch.device | str, inputs: dict[str, Any],
                  meta: dict[str, Any] | None = None, depth: int = 2) -> dict[str, Any]:
    """Fill `out_dir` with `cfg.n_tokens` vectors from `texts`; return the manifest.

    `inputs` identifies the model and corpus for the resume fingerprint; `meta` goes into
    the manifest. A partial store with the same fingerprint is continued; a finished store
    of other inputs stays until the new one, built beside it, is finished and replaces it.
    """
    device = torch.device(device)
    out_dir = Path(out_dir)
    d = hook_dim(model.config, cfg.hook)
    specials = special_token_ids(tokenizer)
    compute = str(next(model.parameters()).dtype).removeprefix("torch.")
    fp = fingerprint(cfg, {**inputs, "device": device.type, "compute_dtype": compute})
    per_batch = rows_per_batch(cfg.batch_tokens, cfg.context_len)
    rows = token_rows(tokenizer, texts, cfg.context_len)
    rank, world = rank_world()
    if world > 1:  # torchrun: this rank's shards (activations.ranks)
        from . import ranks

        complete, writer, rows = ranks.rank_writer(
            rows, cfg, out_dir, fp=fp, d=d, exclude=specials, per_batch=per_batch, rank=rank,
            world=world)
    else:
        shape = dict(d=d, dtype=cfg.store_dtype, n_tokens=cfg.n_tokens,
                     shard_tokens=cfg.shard_tokens, context_len=cfg.context_len)
        complete, work = build_dir(out_dir, store_header(fingerprint=fp, **shape))
        if complete is None:
            writer = StoreWriter(work, fingerprint=fp, **shape)
            # Rows before `resume_row` are already stored: tokenized again, not forwarded.
            rows = itertools.islice(rows, writer.resume_row, None)
    if complete is not None:
        log.info("%s already holds this store (fingerprint %s): nothing to do", out_dir, fp[:12])
        return complete
    done_bytes = sum(e["bytes"] for s in writer.shards for e in s["files"].values())
    check_disk(writer.out_dir, estimate_bytes(writer.tokens_wanted, d, cfg.store_dtype,
                                              cfg.context_len) - done_bytes)

    kept_shards, left = len(writer.shards), writer.tokens_wanted - writer.tokens_done
    who = f" (rank {rank} of {world})" if world > 1 else ""
    log.info("extracting %d tokens (%s of layer %d, d=%d, %s) into %s from row %d%s",
             left, cfg.hook, cfg.layer, d, cfg.store_dtype, out_dir, writer.resume_row, who)
    source = ActivationSource(model, layer=cfg.layer, hook=cfg.hook, device=device,
                              exclude_ids=specials, outlier_k=cfg.outlier_k)
    blocks = prefetch(batched_rows(rows, per_batch, writer.resume_row))
    t0 = time.perf_counter()
    try:
        _produce(writer, source, blocks, cfg, device, depth, desc=f"extract{who}")
    except BaseException:
        writer.abort()
        raise
    finally:
        blocks.close()
    elapsed = time.perf_counter() - t0
    if not writer.done:
        writer.abort()
        raise SaelabError(ran_out(writer.tokens_done, cfg.n_tokens))
    rate = left / elapsed if elapsed > 0 else float("nan")
    # Per rank, so a many-GPU run shows how it scales.
    log.info("stored %d tokens%s in %.1f s (%.0f tokens/s)", left, who, elapsed, rate)
    if world > 1:
        from . import ranks

        writer = ranks.assemble(writer.out_dir, writer.header, world)
        elapsed = time.perf_counter() - t0
        left, rate = cfg.n_tokens, cfg.n_tokens / elapsed  # every rank's vectors
    # Timings and what a resumed run found done go to MLflow only: the manifest is tracked
    # by DVC, and a resumed store must be byte-identical to an uninterrupted one.
    log_metrics({"extract": {"tokens_per_s": rate, "seconds": elapsed,
                             "resumed_shards": kept_shards}})
    manifest = writer.finalize(
        {**(meta or {}), "layer": cfg.layer, "hook": cfg.hook, "compute_dtype": compute,
         "device": str(device), "outlier_k": cfg.outlier_k, "processes": world,
         "config": dataclasses.asdict(cfg)},
        vocab_size=model.config.vocab_size, special_ids=specials,
        bos_id=tokenizer.bos_token_id, eos_id=tokenizer.eos_token_id) if writer else None
    if writer:
        promote(out_dir)  # a store built beside the old one replaces it now
    if world > 1:
        manifest = ranks.share(manifest)
    log.info("the store holds %d tokens; scale C = %.4g", cfg.n_tokens, manifest["scale"])
    return manifest


def _produce(writer: StoreWriter, source: ActivationSource, blocks: Iterator,
             cfg: ExtractCfg, device: torch.device, depth: int, desc: str = "extract") -> None:
    """Forward blocks until the writer has enough; at most `depth` batches wait for it."""
    from ..core.progress import Progress

    store_dtype = STORE_DTYPES[cfg.store_dtype][1]
    copies = _HostCopies(device, rows_per_batch(cfg.batch_tokens, cfg.context_len)
                         * cfg.context_len, source.d, store_dtype, depth)
    # A resumed run's first batch repeats `resume_skip` vectors stored before.
    need = writer.tokens_wanted - writer.tokens_done + writer.resume_skip
    pending: deque[Future] = deque()
    with ThreadPoolExecutor(1, thread_name_prefix="saelab-writer") as pool, \
            Progress(desc, writer.tokens_wanted, initial=writer.tokens_done, unit="token",
                     rate_unit="tokens") as bar:
        for first_row, block in blocks:
            batch = source(block, first_row)
            with torch.no_grad():
                stored = batch.acts.to(store_dtype)
                norms = torch.linalg.vector_norm(stored, dim=1, dtype=torch.float32)
            while len(pending) >= depth:
                bar.update(pending.popleft().result())
            acts, norms, event = copies(stored, norms)
            pending.append(pool.submit(_write, writer, event, first_row, block, acts,
                                       batch.token_ids, batch.index, norms))
            need -= len(batch.token_ids)
            if need <= 0:
                break
        while pending:
            bar.update(pending.popleft().result())


def _write(writer: StoreWriter, event, first_row, block, acts, token_ids, index, norms) -> int:
    if event is not None:
        event.synchronize()  # the non-blocking device -> host copy has landed
    return writer.add(first_row, block, _numpy_bits(acts), token_ids, index, norms.numpy())


# --- the stage -------------------------------------------------------------------------

def run_extract(params: Params, *, model_dir: Path = paths.MODEL_DIR,
                corpus_dir: Path = paths.CORPUS_DIR, out_dir: Path = paths.ACTIVATIONS_DIR,
                model_json: Path = paths.MODEL_JSON) -> dict[str, Any]:
    """The `extract_mlp8` stage body: model + corpus in, store out; returns the manifest."""
    from ..data.base_model import load_model
    from ..data.corpus import DOC_ORDER_RULE, iter_documents, read_manifest
    from ..core.runtime import compute_dtype, init_distributed, resolve_device

    corpus = read_manifest(corpus_dir)
    estimate = corpus["tokens_estimate"]["train"]
    if estimate < params.extract.n_tokens:
        log.warning("the corpus holds an estimated %d training tokens, fewer than "
                    "extract.n_tokens = %d: extraction will likely run out (raise "
                    "data.token_budget or lower extract.n_tokens)", estimate,
                    params.extract.n_tokens)
    device = resolve_device(params)
    init_distributed(device)  # under torchrun: each rank writes its part of the store
    dtype = compute_dtype(params, device)
    model, tokenizer = load_model(model_dir, device=device, dtype=dtype,
                                  attn_implementation=params.extract.attn_implementation)
    info = json.loads(Path(model_json).read_text()) if Path(model_json).is_file() else {}
    seed = params.run.seed
    corpus_id = {"dir": Path(corpus_dir).as_posix(), "source": corpus.get("source"),
                 "manifest_sha256": hashlib.sha256(
                     (Path(corpus_dir) / "manifest.json").read_bytes()).hexdigest(),
                 "doc_order": {"seed": seed, "rule": DOC_ORDER_RULE}}
    texts = (text for _, text in iter_documents(corpus_dir, split="train", seed=seed))
    return extract_store(model, tokenizer, texts, params.extract, out_dir, device=device,
                         inputs={"model": info or model.config.to_dict(), "corpus": corpus_id},
                         meta={"model": info.get("name", params.model.name),
                               "revision": info.get("revision"), "corpus": corpus_id})


def _run(params: Params) -> None:
    from ..core.tracking import log_artifact

    import torch.distributed as dist

    try:
        manifest = run_extract(params)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    log_metrics({"extract": {"scale": manifest["scale"],
                             "norm": manifest["norm"]["percentiles"],
                             "excluded": manifest["excluded"]}})
    log_artifact(paths.ACTIVATIONS_DIR / "manifest.json")


def main() -> None:
    from ..core.stage import run_stage

    run_stage("extract_mlp8", _run)
