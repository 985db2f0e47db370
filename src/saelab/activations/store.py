"""The activation store (DESIGN §5): on-disk layout, a resumable writer and the reader.

Layout of a finished store (`data/activations/`)::

    manifest.json               what, how, statistics, sha256 of every file
    rows.npy                    uint32 [n_rows, context_len]  packed token rows (BOS first)
    shard-NNNNN.acts.npy        [n, d] float32, or bfloat16 stored as a uint16 view
    shard-NNNNN.tokens.npy      uint32 [n]       token id of each stored vector
    shard-NNNNN.index.npy       int64 [n, 2]     (row in rows.npy, position in the row)
    shard-NNNNN.norms.npy       float32 [n]      L2 norm of each stored vector

Every shard holds exactly `shard_tokens` vectors except the last, so the total is exactly
`n_tokens`. Files are written sequentially under a `.tmp` name (hashing as they go) and
renamed when complete. While extraction runs, `manifest.partial.json` lists the finished
shards plus, per shard, its rows (`shard-NNNNN.rows.npy`, concatenated into rows.npy at the
end) and the forward batch to restart from, so a killed run continues after its last
complete shard and ends with the same bytes as an uninterrupted one.

A store of other inputs (a changed extract parameter) is built in `.next/` beside a
finished one, which stays whole until the new one is finished and moved in (`promote`).
"""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import re
import shutil
from concurrent.futures import ThreadPoolExecutor
from itertools import count
from pathlib import Path
from typing import Any, Collection, Iterator

import numpy as np
import torch

from ..core import atomic
from ..core.atomic import sha256_file
from ..core import paths
from ..core.errors import SaelabError
from ..core.integrity import seal, seal_problem

log = logging.getLogger(__name__)

FORMAT = "saelab-activations/1"
MANIFEST = "manifest.json"
PARTIAL = "manifest.partial.json"
ROWS = "rows.npy"
# Where a store of new inputs is built while a finished one of other inputs stays in place.
NEXT = ".next"
# numpy dtype of each per-token file; activations depend on the store dtype.
TOKEN_FILES = {"tokens": np.dtype(np.uint32), "index": np.dtype(np.int64),
               "norms": np.dtype(np.float32)}
# store dtype -> (numpy storage dtype, torch dtype); bf16 has no numpy dtype, so its bits
# are stored as uint16 and the manifest records the real dtype.
STORE_DTYPES = {"float32": (np.dtype(np.float32), torch.float32),
                "bfloat16": (np.dtype(np.uint16), torch.bfloat16)}
# The fix for a damaged store, in every message that finds one.
REBUILD = ("run `saelab verify` to list every problem, then restore it (`dvc checkout "
           "data/activations`) or rebuild it (`dvc repro -f extract_mlp8`)")
# Readers hash the activation files in full up to this size; above it, sizes only (every
# other file is always hashed: 24 of 4,120 bytes per token at d 2048 in bf16). sha256 runs at
# ~1.77 GB/s on one core, so this line is 0.6 s. The 1B profile's 34.6 GB store would take
# 19.5 s: more than 5% of fit_scaling_laws (15 pilots of 4.2 M tokens, 9.4 s at the SAE
# roofline) and of interpret (one pass over the store, >= 11.5 s at 3 GB/s of disk).
# train_sae hashes in full at any size (`check(full=True)`): at the 1B profile its 2.1 B
# tokens take >= 1,050 s at the SAE roofline, so 19.5 s is < 2%.
FULL_HASH_MAX_BYTES = 1 << 30
PERCENTILES = (0.0, 1.0, 5.0, 25.0, 50.0, 75.0, 95.0, 99.0, 99.9, 100.0)
_STORE_FILE = re.compile(
    r"^(shard-\d{5}\.\w+\.npy|rows\.npy|manifest(\.partial(\.rank-\d+-of-\d+)?)?\.json)(\.tmp)?$")


def rank_partial(rank: int, world: int) -> str:
    """The progress file of rank `rank` of `world` under torchrun (activations.ranks)."""
    return f"manifest.partial.rank-{rank}-of-{world}.json"


def shard_name(k: int, kind: str) -> str:
    return f"shard-{k:05d}.{kind}.npy"


def file_problem(path: Path, entry: dict[str, Any], source: str = "the manifest",
                 hash: bool = True) -> str | None:
    """What is wrong with `path` against its manifest entry (missing, size, sha256), or
    None. The size goes first, so a truncated file is not hashed."""
    if not path.is_file():
        return f"{path.name}: missing (listed in {source})"
    size = path.stat().st_size
    if size != entry.get("bytes"):
        return f"{path.name}: {size} bytes, {source} says {entry.get('bytes')}"
    if hash and sha256_file(path) != entry.get("sha256"):
        return f"{path.name}: sha256 differs from {source}"
    return None


def _write_json(path: Path, obj: Any) -> None:
    atomic.write_text(path, json.dumps(obj, indent=1) + "\n")


def _npy_header(dtype: np.dtype, shape: tuple[int, ...]) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": np.lib.format.dtype_to_descr(dtype),
                                               "fortran_order": False, "shape": shape})
    return buf.getvalue()


class NpyStream:
    """A .npy file of known shape written front to back under `.tmp`, hashed on the way.

    sha256 runs in a helper thread beside the file write (both release the GIL), so a
    shard costs max(write, hash) rather than their sum: at GPU rates (~2.9 GB/s produced,
    ~1.8 GB/s sha256 per core) the sum would halve throughput.
    """

    def __init__(self, path: Path, dtype: np.dtype, shape: tuple[int, ...]):
        self.path, self.dtype, self.shape = path, np.dtype(dtype), shape
        self.tmp = path.with_name(path.name + ".tmp")
        self._left = int(np.prod(shape))
        self._hash = hashlib.sha256()
        self._hasher = ThreadPoolExecutor(1, thread_name_prefix="saelab-sha256")
        self._f = open(self.tmp, "wb")
        self._put(_npy_header(self.dtype, shape))

    def _put(self, data) -> None:
        hashed = self._hasher.submit(self._hash.update, data)
        self._f.write(data)
        hashed.result()  # `data` may be a reused pinned buffer: done with it only now

    def write(self, arr: np.ndarray) -> None:
        arr = np.ascontiguousarray(arr, dtype=self.dtype)
        if arr.size > self._left:
            raise ValueError(f"{self.path.name}: {arr.size} values exceed the declared shape")
        self._left -= arr.size
        self._put(arr)

    def close(self) -> dict[str, Any]:
        """Rename to the final name; return the manifest entry of the file."""
        if self._left:
            raise ValueError(f"{self.path.name}: {self._left} values missing")
        self._f.close()
        self._hasher.shutdown()
        os.replace(self.tmp, self.path)
        return {"file": self.path.name, "sha256": self._hash.hexdigest(),
                "bytes": self.path.stat().st_size}

    def discard(self) -> None:
        try:
            self._f.close()
        except OSError:  # the buffered tail cannot be written (full disk): drop it anyway
            pass
        self._hasher.shutdown()
        self.tmp.unlink(missing_ok=True)


def estimate_bytes(n_tokens: int, d: int, dtype: str, context_len: int) -> int:
    """Disk space a store needs: vectors, per-token files, and rows (twice, at the end)."""
    per_token = d * STORE_DTYPES[dtype][0].itemsize + sum(t.itemsize for t in TOKEN_FILES.values())
    rows = 2 * 4 * context_len * -(-n_tokens // max(1, context_len - 2))
    return n_tokens * per_token + rows


def check_disk(out_dir: Path, needed: int) -> None:
    """Refuse to start when the file system holding `out_dir` lacks `needed` bytes."""
    probe = Path(out_dir).resolve()
    while not probe.exists():
        probe = probe.parent
    free = shutil.disk_usage(probe).free
    if needed > free:
        raise SaelabError(
            f"the activation store needs about {needed / 1e9:.2f} GB ({needed} bytes) in "
            f"{out_dir} but only {free / 1e9:.2f} GB ({free} bytes) are free; free space or "
            "lower extract.n_tokens (or use extract.store_dtype = bfloat16)")


def _remove_store_files(out_dir: Path, keep: Collection[str] = ()) -> None:
    """Delete what a store (or an unfinished one) consists of, except `keep`."""
    for p in out_dir.iterdir():
        if p.is_file() and _STORE_FILE.match(p.name) and p.name not in keep:
            p.unlink()


def store_header(*, fingerprint: str, d: int, dtype: str, n_tokens: int, shard_tokens: int,
                 context_len: int) -> dict[str, Any]:
    """What a partial store must match to be resumed."""
    return {"format": FORMAT, "fingerprint": fingerprint, "d": d, "dtype": dtype,
            "n_tokens": n_tokens, "shard_tokens": shard_tokens, "context_len": context_len}


class StoreWriter:
    """Assembles fixed-size shards from forward batches; resumes a matching partial store.

    `add` receives, per forward batch in order, the rows that were forwarded and the
    vectors kept from them. Forward batches are the unit of restart: each shard records the
    first row of the batch holding its last vector and how many of that batch's vectors it
    has taken, so a resumed run recomputes that exact batch (same composition, same bits)
    and drops what earlier shards already hold.
    """

    def __init__(self, out_dir: Path, *, fingerprint: str, d: int, dtype: str, n_tokens: int,
                 shard_tokens: int, context_len: int, part: range | None = None,
                 start: tuple[int, int, int] = (0, 0, 0), partial: str = PARTIAL):
        """`part` (a range of shard ids), `start` (the row to forward from, the vectors of its
        batch to skip, the first row of the part's rows) and `partial` make a writer of one
        rank's shards (activations.ranks): it resumes its own progress file only and leaves
        the rest of `out_dir` alone."""
        self.out_dir = Path(out_dir)
        self.np_dtype = STORE_DTYPES[dtype][0]
        self.header = store_header(fingerprint=fingerprint, d=d, dtype=dtype, n_tokens=n_tokens,
                                   shard_tokens=shard_tokens, context_len=context_len)
        self.num_shards = -(-n_tokens // shard_tokens)
        self.part = part if part is not None else range(self.num_shards)
        self._start, self._partial = start, partial
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.complete, self.shards = _resume(self.out_dir, self.header, len(self.part),
                                             partial=partial, whole=part is None)
        if self.complete is None and self.shards:
            self._save_partial()
        self._streams: dict[str, NpyStream] = {}
        self._filled = 0
        self._pending: list[tuple[int, np.ndarray]] = []  # forwarded rows not yet in a shard
        self._rows_lo = self.shards[-1]["rows"][1] if self.shards else start[2]
        self._skip = self.resume_skip

    @classmethod
    def assembled(cls, out_dir: Path, header: dict[str, Any],
                  shards: list[dict[str, Any]]) -> "StoreWriter":
        """A writer holding every shard that the ranks wrote, ready to `finalize`."""
        self = cls.__new__(cls)
        self.out_dir, self.header, self.shards, self.complete = Path(out_dir), header, shards, None
        self.num_shards = -(-header["n_tokens"] // header["shard_tokens"])
        self.part, self._partial = range(self.num_shards), PARTIAL
        return self

    def _save_partial(self) -> None:
        _write_json(self.out_dir / self._partial, {**self.header, "shards": self.shards})

    @property
    def resume_row(self) -> int:
        """First row the producer must forward (earlier rows are already stored)."""
        return self.shards[-1]["resume"][0] if self.shards else self._start[0]

    @property
    def resume_skip(self) -> int:
        """Vectors of the first forwarded batch that earlier shards already hold."""
        return self.shards[-1]["resume"][1] if self.shards else self._start[1]

    @property
    def tokens_done(self) -> int:
        return sum(s["n"] for s in self.shards)

    @property
    def tokens_wanted(self) -> int:
        """Vectors this writer stores in all (the whole store, or one rank's part of it)."""
        return sum(self._shard_size(k) for k in self.part)

    @property
    def done(self) -> bool:
        return len(self.shards) == len(self.part)

    @property
    def _next(self) -> int:
        return self.part.start + len(self.shards)

    # --- writing -----------------------------------------------------------------------

    def _shard_size(self, k: int) -> int:
        size = self.header["shard_tokens"]
        return min(size, self.header["n_tokens"] - k * size)

    def _open_shard(self) -> None:
        k, n = self._next, self._shard_size(self._next)
        self._streams = {"acts": NpyStream(self.out_dir / shard_name(k, "acts"), self.np_dtype,
                                           (n, self.header["d"]))}
        for kind, dtype in TOKEN_FILES.items():
            shape = (n, 2) if kind == "index" else (n,)
            self._streams[kind] = NpyStream(self.out_dir / shard_name(k, kind), dtype, shape)

    def add(self, first_row: int, rows: np.ndarray, acts: np.ndarray, token_ids: np.ndarray,
            index: np.ndarray, norms: np.ndarray) -> int:
        """Take one forward batch: `rows` [b, ctx] starting at global row `first_row`, and the
        vectors kept from it (`acts` in the store's numpy dtype, in batch order). Returns
        how many of them were stored (fewer at the end, or when resuming)."""
        if self.done:
            return 0
        self._pending.append((first_row, rows))
        start = pos = self._skip
        n, self._skip = len(token_ids), 0
        while pos < n and not self.done:
            if not self._streams:
                self._open_shard()
            take = min(n - pos, self._shard_size(self._next) - self._filled)
            part = slice(pos, pos + take)
            for kind, arr in (("acts", acts), ("tokens", token_ids), ("index", index),
                              ("norms", norms)):
                self._streams[kind].write(arr[part])
            self._filled += take
            pos += take
            if self._filled == self._shard_size(self._next):
                self._close_shard(first_row, pos, int(index[pos - 1, 0]) + 1)
        return pos - start

    def _close_shard(self, first_row: int, taken: int, rows_hi: int) -> None:
        k = self._next
        files = {kind: s.close() for kind, s in self._streams.items()}
        part = self._rows(self._rows_lo, rows_hi)
        rows_stream = NpyStream(self.out_dir / shard_name(k, "rows"), np.uint32, part.shape)
        rows_stream.write(part)
        files["rows"] = rows_stream.close()
        self.shards.append({"id": k, "n": self._filled, "rows": [self._rows_lo, rows_hi],
                            "resume": [first_row, taken], "files": files})
        self._save_partial()
        self._streams, self._filled, self._rows_lo = {}, 0, rows_hi
        self._pending = [(r, b) for r, b in self._pending if r + len(b) > rows_hi]

    def _rows(self, lo: int, hi: int) -> np.ndarray:
        parts = [b[max(lo - r, 0):hi - r] for r, b in self._pending if r < hi and r + len(b) > lo]
        if sum(len(p) for p in parts) != hi - lo:
            raise RuntimeError(f"rows {lo}..{hi} were not all forwarded")
        # empty when the whole shard lies in the row where the previous one ended
        return np.concatenate(parts) if parts else np.zeros((0, self.header["context_len"]),
                                                            np.uint32)

    def abort(self) -> None:
        """Drop the shard being written; finished shards stay for the next run."""
        for s in self._streams.values():
            s.discard()
        self._streams = {}

    # --- finishing ---------------------------------------------------------------------

    def finalize(self, meta: dict[str, Any], *, vocab_size: int, special_ids: Collection[int],
                 bos_id: int, eos_id: int) -> dict[str, Any]:
        """Write rows.npy and manifest.json; return the manifest. `meta` adds the extractor's
        fields (model, revision, layer, hook, ...; no timings: DVC tracks the manifest)."""
        if not self.done:
            raise RuntimeError(f"{len(self.shards)} of {self.num_shards} shards written")
        ctx = self.header["context_len"]
        parts = [self.out_dir / s["files"]["rows"]["file"] for s in self.shards]
        n_rows = self.shards[-1]["rows"][1]
        stream = NpyStream(self.out_dir / ROWS, np.uint32, (n_rows, ctx))
        for p in parts:
            stream.write(np.load(p, mmap_mode="r"))
        rows_entry = stream.close()
        rows = np.load(self.out_dir / ROWS, mmap_mode="r")
        shards = [{"id": s["id"], "n": s["n"],
                   "files": {k: v for k, v in s["files"].items() if k != "rows"}}
                  for s in self.shards]
        manifest = {
            "format": FORMAT, "complete": True, **meta,
            "dtype": self.header["dtype"], "d": self.header["d"],
            "n_tokens": self.header["n_tokens"], "context_len": ctx, "n_rows": n_rows,
            "vocab_size": vocab_size, "bos_id": bos_id, "eos_id": eos_id,
            **_statistics(self.out_dir, self.shards, rows, n_tokens=self.header["n_tokens"],
                          special_ids=special_ids, bos_id=bos_id, eos_id=eos_id),
            "fingerprint": self.header["fingerprint"],
            "shard_tokens": self.header["shard_tokens"],
            "rows": rows_entry, "shards": shards,
        }
        manifest = seal(manifest)
        _write_json(self.out_dir / MANIFEST, manifest)
        for p in parts:
            p.unlink()
        _remove_store_files(self.out_dir, keep=[MANIFEST, *_files(manifest)])
        self.complete = manifest
        return manifest


def _resume(out_dir: Path, header: dict[str, Any], num_shards: int, *, partial: str = PARTIAL,
            whole: bool = True) -> tuple[dict[str, Any] | None, list[dict[str, Any]]]:
    """What a writer with `header` can keep of `out_dir`: (the manifest of a finished store
    that matches it, or None; the sound leading shards of a matching unfinished one).
    Every other store file there is deleted, unless the writer is one rank's (`whole`
    False): that one reads only its `partial` file and deletes nothing."""
    partial = out_dir / partial
    shards: list[dict[str, Any]] = []
    if whole and (out_dir / MANIFEST).is_file():
        manifest = _finished(out_dir, header)
        if manifest is not None:
            return manifest, []
    elif partial.is_file():
        state = atomic.read_json(partial)
        if state and {k: state.get(k) for k in header} == header:
            shards = _sound_prefix(out_dir, state["shards"])
            log.info("resuming %s after %d complete shard(s) of %d", out_dir, len(shards),
                     num_shards)
        else:
            log.info("unfinished store in %s was made with other inputs: starting over",
                     out_dir)
    if whole:
        _remove_store_files(out_dir, keep=[e["file"] for s in shards
                                           for e in s["files"].values()])
    return None, shards


def build_dir(out_dir: Path, header: dict[str, Any]) -> tuple[dict[str, Any] | None, Path]:
    """(the manifest of the finished store in `out_dir` made with `header`, out_dir): nothing
    to do; else (None, the directory to build the store in): `out_dir` itself, or its
    `.next/` while `out_dir` holds a finished store of other inputs (kept until `promote`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    promote(out_dir)  # a run killed while moving a finished store in
    if (out_dir / MANIFEST).is_file() and (manifest := _finished(out_dir, header)):
        return manifest, out_dir
    if (out_dir / MANIFEST).is_file() or (out_dir / NEXT).is_dir():
        log.info("building the new store in %s; the one in %s stays until it is finished",
                 out_dir / NEXT, out_dir)
        return None, out_dir / NEXT
    return None, out_dir


def promote(out_dir: Path) -> None:
    """Move a finished store from `out_dir/.next` into `out_dir`, replacing the store there.
    Safe to repeat after a kill at any point: the old manifest goes first, the new one last."""
    nxt = out_dir / NEXT
    new = atomic.read_json(nxt / MANIFEST)
    if new is None:
        return
    (out_dir / MANIFEST).unlink(missing_ok=True)
    _remove_store_files(out_dir, keep=_files(new))
    for name in _files(new):
        if (nxt / name).is_file():
            os.replace(nxt / name, out_dir / name)
    os.replace(nxt / MANIFEST, out_dir / MANIFEST)
    shutil.rmtree(nxt)
    log.info("the new store replaced the old one in %s", out_dir)


def _finished(out_dir: Path, header: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of the finished, sound store in `out_dir` made with `header`'s
    fingerprint (its leftover files deleted), or None."""
    manifest = atomic.read_json(out_dir / MANIFEST)
    if manifest and manifest.get("fingerprint") == header["fingerprint"] and \
            not seal_problem(manifest, MANIFEST) and not ActivationStore(out_dir).verify():
        # a run killed while finishing may have left its partial files behind
        _remove_store_files(out_dir, keep=[MANIFEST, *_files(manifest)])
        return manifest
    log.info("existing store in %s was made with other inputs (or is damaged)", out_dir)
    return None


def clear_for_ranks(out_dir: Path, header: dict[str, Any], world: int,
                    ) -> tuple[dict[str, Any] | None, Path]:
    """Rank 0, before `world` ranks extract into `out_dir`: `build_dir`'s answer, once
    every store file in the build directory that no rank can resume (other inputs, another
    world size, a one-process partial store) is deleted."""
    manifest, work = build_dir(out_dir, header)
    if manifest is not None:
        return manifest, work
    work.mkdir(exist_ok=True)
    keep = []
    for r in range(world):
        state = atomic.read_json(work / rank_partial(r, world))
        if state and {k: state.get(k) for k in header} == header:
            keep += [rank_partial(r, world)] + [e["file"] for s in state["shards"]
                                                for e in s["files"].values()]
    _remove_store_files(work, keep=keep)
    return None, work


def read_rank_shards(out_dir: Path, world: int) -> list[dict[str, Any]]:
    """Every rank's finished shards, in shard order (rank r holds a contiguous range)."""
    return [s for r in range(world)
            for s in atomic.read_json(out_dir / rank_partial(r, world))["shards"]]


def _sound_prefix(out_dir: Path, shards: list[dict[str, Any]]) -> list[dict[str, Any]]:
    for i, shard in enumerate(shards):
        for entry in shard["files"].values():
            if file_problem(out_dir / entry["file"], entry):
                log.warning("shard %d is damaged (%s): recomputing from there", i,
                            entry["file"])
                return shards[:i]
    return shards


def _statistics(out_dir: Path, shards: list[dict[str, Any]], rows: np.ndarray, *,
                n_tokens: int, special_ids: Collection[int], bos_id: int,
                eos_id: int) -> dict[str, Any]:
    """The manifest's normalisation scalar, norm statistics and exclusion counts."""
    ctx = rows.shape[1]
    norms, sums, counts = [], np.zeros(ctx), np.zeros(ctx)
    last_pos = 0
    for s in shards:
        nm = np.load(out_dir / s["files"]["norms"]["file"]).astype(np.float64)
        pos = np.load(out_dir / s["files"]["index"]["file"], mmap_mode="r")[:, 1]
        sums += np.bincount(pos, weights=nm, minlength=ctx)
        counts += np.bincount(pos, minlength=ctx)
        norms.append(nm)
        last_pos = int(pos[-1])
    norms = np.concatenate(norms)
    mean_sq = float(np.mean(norms ** 2))
    # Exclusions are read off the rows up to the last stored vector: a fact of the store,
    # identical however many times the run was interrupted.
    seen = rows.reshape(-1)[: rows.size - (ctx - 1 - last_pos)]
    is_special = np.isin(seen, np.fromiter(special_ids, np.int64))
    n_special = int(is_special.sum())
    n_bos, n_eos = int((seen == bos_id).sum()), int((seen == eos_id).sum())
    per_pos = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    return {
        "scale": 1.0 / float(np.sqrt(mean_sq)),
        "norm": {
            "mean": float(norms.mean()), "rms": float(np.sqrt(mean_sq)),
            "percentiles": {f"p{q:g}": float(v)
                            for q, v in zip(PERCENTILES, np.percentile(norms, PERCENTILES))},
            "per_position_mean": [None if np.isnan(v) else round(float(v), 6)
                                  for v in per_pos],
        },
        "excluded": {"bos": n_bos, "eos": n_eos, "other_special": n_special - n_bos - n_eos,
                     "outlier": int(seen.size - n_special - n_tokens)},
    }


def _files(manifest: dict[str, Any]) -> list[str]:
    """Data files a finished store's manifest lists."""
    return [manifest["rows"]["file"]] + [e["file"] for s in manifest["shards"]
                                         for e in s["files"].values()]


class ActivationStore:
    """Read side of the store: memory-mapped shards, shuffled float32 batches, verification."""

    def __init__(self, path: Path | str = paths.ACTIVATIONS_DIR):
        self.path = Path(path)
        manifest = atomic.read_json(self.path / MANIFEST)
        if manifest is None or not manifest.get("complete"):
            why = ("is incomplete (extraction was interrupted)" if (self.path / PARTIAL).exists()
                   else "is missing" if not self.path.exists() else "has no valid manifest.json")
            raise SaelabError(f"the activation store {self.path} {why}; "
                              "run `dvc repro extract_mlp8`")
        if problem := seal_problem(manifest, f"{self.path / MANIFEST}"):
            raise SaelabError(f"the activation store is not trustworthy: {problem}; "
                              f"{REBUILD}")
        self.manifest: dict[str, Any] = manifest
        self.d: int = manifest["d"]
        self.n_tokens: int = manifest["n_tokens"]
        self.dtype: str = manifest["dtype"]
        self.scale: float = manifest["scale"]
        self.context_len: int = manifest["context_len"]
        self.num_shards: int = len(manifest["shards"])
        sizes = np.array([s["n"] for s in manifest["shards"]], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(sizes)])
        self._maps: dict[str, np.ndarray] = {}

    # --- raw access --------------------------------------------------------------------

    def _load(self, name: str) -> np.ndarray:
        if name not in self._maps:
            path = self.path / name
            if not path.is_file():
                raise SaelabError(f"{path} is missing from the activation store; "
                                  "run `dvc repro extract_mlp8` (or `dvc pull`)")
            self._maps[name] = np.load(path, mmap_mode="r")
        return self._maps[name]

    def _file(self, i: int, kind: str) -> str:
        return self.manifest["shards"][i]["files"][kind]["file"]

    def activations(self, i: int) -> np.ndarray:
        """Shard `i`'s vectors as stored (memmap; bf16 appears as its uint16 bits)."""
        return self._load(self._file(i, "acts"))

    def activations_f32(self, i: int) -> torch.Tensor:
        """Shard `i`'s vectors as float32 (a copy, not normalised)."""
        return self._to_f32(np.array(self.activations(i)))

    def token_ids(self, i: int) -> np.ndarray:
        return self._load(self._file(i, "tokens"))

    def index(self, i: int) -> np.ndarray:
        return self._load(self._file(i, "index"))

    def norms(self, i: int) -> np.ndarray:
        return self._load(self._file(i, "norms"))

    def rows(self) -> np.ndarray:
        """All packed token rows [n_rows, context_len] (memmap); index()[:, 0] points here."""
        return self._load(self.manifest["rows"]["file"])

    def _to_f32(self, raw: np.ndarray) -> torch.Tensor:
        """Stored values (an in-memory array, not a read-only memmap) as float32."""
        t = torch.from_numpy(raw)
        if self.dtype == "bfloat16":
            t = t.view(torch.bfloat16)
        return t.float()

    def gather(self, ids: np.ndarray, *, normalise: bool = True) -> torch.Tensor:
        """Vectors with global ids `ids` (sorted ascending), float32 [len(ids), d]."""
        shard_of = np.searchsorted(self._starts, ids, side="right") - 1
        pieces = []
        for k in np.unique(shard_of):
            local = ids[shard_of == k] - self._starts[k]
            pieces.append(self.activations(int(k))[local])
        out = self._to_f32(np.concatenate(pieces) if pieces else
                           np.zeros((0, self.d), STORE_DTYPES[self.dtype][0]))
        return out.mul_(self.scale) if normalise else out

    # --- training access ---------------------------------------------------------------

    def iter_batches(self, batch_size: int, *, seed: int, start_batch: int = 0,
                     normalise: bool = True, rank: int = 0, world_size: int = 1,
                     n_tokens: int | None = None) -> Iterator[torch.Tensor]:
        """Endless shuffled batches of float32 [batch_size // world_size, d] from the first
        `n_tokens` stored vectors (all of them by default).

        Batch k is a pure function of (seed, k): epoch e = k // batches_per_epoch draws its
        own permutation of those tokens, the remainder of an epoch is dropped. So starting at
        `start_batch` reproduces an uninterrupted run, and rank r of `world_size` takes the
        r-th slice of every global batch (disjoint, together the whole batch).
        """
        n_tokens = self.n_tokens if n_tokens is None else min(n_tokens, self.n_tokens)
        if batch_size > n_tokens:
            raise SaelabError(f"batch size {batch_size} exceeds the {n_tokens} tokens in "
                              f"{self.path}; raise extract.n_tokens or lower the batch size")
        if batch_size % world_size or not 0 <= rank < world_size:
            raise SaelabError(f"batch size {batch_size} must split evenly over {world_size} "
                              f"ranks (rank {rank})")
        per_epoch = n_tokens // batch_size
        per_rank = batch_size // world_size
        epoch, perm = -1, None
        for k in count(start_batch):
            e, j = divmod(k, per_epoch)
            if e != epoch:
                epoch, perm = e, np.random.default_rng([seed, e]).permutation(n_tokens)
            lo = j * batch_size + rank * per_rank
            yield self.gather(np.sort(perm[lo:lo + per_rank]), normalise=normalise)

    def sample(self, n: int, *, seed: int, normalise: bool = True) -> torch.Tensor:
        """`n` distinct random vectors, float32 [n, d] (in store order)."""
        n = min(n, self.n_tokens)
        ids = np.random.default_rng(seed).choice(self.n_tokens, size=n, replace=False)
        return self.gather(np.sort(ids), normalise=normalise)

    # --- integrity ---------------------------------------------------------------------

    def _entries(self) -> list[tuple[str, dict[str, Any]]]:
        m = self.manifest
        return [("rows", m["rows"])] + [(kind, e) for s in m["shards"]
                                        for kind, e in s["files"].items()]

    def check(self, full: bool | None = None) -> None:
        """Before a stage spends compute on the store: every file present at its size, and
        its sha256 (the activation files' only when `full`, by default when they hold at
        most FULL_HASH_MAX_BYTES). Raises a SaelabError naming the first problem."""
        entries = self._entries()
        if full is None:
            full = sum(e["bytes"] for k, e in entries if k == "acts") <= FULL_HASH_MAX_BYTES
        problems = [p for k, e in entries
                    if (p := file_problem(self.path / e["file"], e, hash=full or k != "acts"))]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise SaelabError(f"the activation store {self.path} is damaged: {problems[0]}"
                              f"{more}; {REBUILD}")
        log.info("activation store %s: %d files checked (%s)", self.path, len(entries),
                 "sizes and sha256" if full else "sizes; sha256 of all but the activations")

    def verify(self) -> list[str]:
        """Check every file against the manifest (sha256, shape, dtype) and the contents
        (finite vectors, token ids below the vocabulary, index within rows). Returns the
        problems found; an empty list means the store is sound."""
        problems: list[str] = []
        m = self.manifest
        n_rows, ctx = m["n_rows"], self.context_len
        rows = self._check_file(m["rows"], np.dtype(np.uint32), (n_rows, ctx), problems)
        if rows is not None and rows.size and int(rows.max()) >= m["vocab_size"]:
            problems.append(f"{ROWS}: token id {int(rows.max())} >= vocab {m['vocab_size']}")
        total = 0
        for i, s in enumerate(m["shards"]):
            n, files = s["n"], s["files"]
            total += n
            acts = self._check_file(files["acts"], STORE_DTYPES[self.dtype][0], (n, self.d),
                                    problems)
            arrs = {kind: self._check_file(files[kind], dtype, (n, 2) if kind == "index" else (n,),
                                           problems)
                    for kind, dtype in TOKEN_FILES.items()}
            if acts is not None:
                for lo in range(0, n, 65536):
                    if not torch.isfinite(self._to_f32(np.array(acts[lo:lo + 65536]))).all():
                        problems.append(f"{files['acts']['file']}: NaN or Inf values")
                        break
            tok, idx = arrs["tokens"], arrs["index"]
            if tok is not None and n and int(tok.max()) >= m["vocab_size"]:
                problems.append(f"{files['tokens']['file']}: token id {int(tok.max())} >= "
                                f"vocab {m['vocab_size']}")
            if idx is not None and n:
                if idx[:, 0].min() < 0 or idx[:, 0].max() >= n_rows or idx[:, 1].min() < 0 \
                        or idx[:, 1].max() >= ctx:
                    problems.append(f"{files['index']['file']}: (row, position) out of range")
                elif tok is not None and rows is not None and \
                        not np.array_equal(rows[idx[:, 0], idx[:, 1]], tok):
                    problems.append(f"{files['tokens']['file']}: ids differ from rows.npy at "
                                    "their index")
        if total != self.n_tokens:
            problems.append(f"shards hold {total} vectors, manifest says n_tokens = "
                            f"{self.n_tokens}")
        return problems

    def _check_file(self, entry: dict[str, Any], dtype: np.dtype, shape: tuple[int, ...],
                    problems: list[str]) -> np.ndarray | None:
        """Problems of one file; its contents (memmap) when they can be read."""
        path = self.path / entry["file"]
        if problem := file_problem(path, entry):
            problems.append(problem)
            if not path.is_file():
                return None
        try:
            arr = np.load(path, mmap_mode="r")
        except (ValueError, OSError) as e:
            problems.append(f"{entry['file']}: unreadable ({e})")
            return None
        if arr.dtype != dtype or arr.shape != shape:
            problems.append(f"{entry['file']}: {arr.dtype} {arr.shape}, expected {dtype} {shape}")
            return None
        return arr
