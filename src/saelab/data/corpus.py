"""Stage `fetch_oscar`: stream a Spanish corpus, clean it, split it, and write data/corpus/.

Every source goes through `datasets.load_dataset(..., streaming=True)`: the shipped sample
and local files with the json/parquet builders, OSCAR's parquet export and FineWeb-2 from
the Hub. Reading stops at the token budget, so a 5 GB source costs only what is kept.

Cleaning drops empty and whitespace-only texts, exact duplicates and texts that are not
valid UTF-8 (or carry U+FFFD, the mark of an earlier lossy decode), and cuts documents
longer than `data.max_doc_chars`; the manifest counts each.

Documents are held out for evaluation by source work, never by chunk: every record belongs
to a group (`group_key`: the host of its `url` for web text, else its `source` field, the
novel a chunk of the shipped sample was cut from, else the document itself), and whole
groups, taken in the order of a hash of their key, are held out until they hold about
`data.heldout_fraction` of the documents. A work in the evaluation set is then never seen in
training. Choosing needs every group's size, so cleaned documents are staged first and
routed to their split's shards once the source or the budget ends.

Later stages read the corpus only through `iter_documents`: in written order, or with a
seed in a seeded random order of the whole split (extraction and streaming training draw
rows from across the split, not only its first part).
"""
from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import logging
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Iterator, Mapping
from urllib.parse import urlsplit

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..core import atomic, paths
from ..core.progress import Progress
from ..core.atomic import atomic_path
from ..core.config import DataCfg, Params
from ..core.errors import SaelabError
from ..core.hub_access import hub_errors, oscar_token

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
SPLITS = ("train", "heldout")
BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
HELDOUT_RULE = ("whole groups (group_key: 'domain:' url host, else 'work:' source field, "
                "else 'doc:' doc_id) in order of sha256(group); each held out while the "
                "held-out documents < fraction x all documents; the last group always trains")
DOC_ORDER_RULE = "numpy.random.default_rng(seed).permutation(documents of the split)"
DROP_REASONS = ("not_text", "invalid_utf8", "empty", "whitespace_only", "duplicate")
_STAGED = "staged"


def group_key(doc_id: str, rec: dict) -> str:
    """The source work of a record: a web site (url host), a novel (`source`), or itself."""
    meta = rec.get("metadata")
    url = rec.get("url") or (meta.get("url") if isinstance(meta, dict) else None)
    host = urlsplit(url).hostname if isinstance(url, str) else None
    if host:
        return "domain:" + host.removeprefix("www.")
    if isinstance(rec.get("source"), str) and rec["source"]:
        return "work:" + rec["source"]
    return "doc:" + doc_id


def heldout_groups(group_docs: Mapping[str, int], fraction: float) -> list[str]:
    """The groups to hold out, by HELDOUT_RULE: about `fraction` of the documents, in whole
    groups; at least one group held out and one trained on when `fraction` > 0.

    The order depends on the keys alone, so membership does not depend on file order; only
    how many groups are taken depends on the sizes.
    """
    if fraction == 0 or not group_docs:
        return []
    if len(group_docs) == 1:
        raise SaelabError(
            f"data.heldout_fraction = {fraction} needs two source works to hold one out, but "
            f"every document belongs to {next(iter(group_docs))}; add documents of other works "
            "or set data.heldout_fraction = 0")
    order = sorted(group_docs, key=lambda g: (hashlib.sha256(g.encode("utf-8")).digest(), g))
    target = fraction * sum(group_docs.values())
    held: list[str] = []
    n = 0
    for group in order[:-1]:
        if n >= target:
            break
        held.append(group)
        n += group_docs[group]
    return held


# --- sources -----------------------------------------------------------------------
# Each yields (label, row, record): label names the file or repo, for ids and errors.

def _local_files(data: DataCfg) -> list[Path]:
    if data.source == "sample":
        files = [Path(data.sample_path)]
        if not files[0].is_file():
            raise SaelabError(f"data.sample_path = {data.sample_path} not found; run from the "
                              "repository root or fix data.sample_path")
    else:
        if not data.local_files:
            raise SaelabError("data.source = local needs data.local_files (a glob of .jsonl or "
                              ".parquet files with a `text` column)")
        matches = [Path(f) for f in glob.glob(data.local_files, recursive=True)]
        files = sorted(f for f in matches if f.is_file())
        if not files:
            dirs = [f.as_posix() for f in matches if f.is_dir()]
            if dirs:
                raise SaelabError(f"data.local_files = {data.local_files!r} matches only "
                                  f"directories ({', '.join(dirs[:3])}); point it at the files "
                                  f"inside, e.g. '{dirs[0]}/*.jsonl'")
            raise SaelabError(f"data.local_files = {data.local_files!r} matches no files")
    unsupported = [f.as_posix() for f in files if f.suffix.lower() not in BUILDERS]
    if unsupported:
        raise SaelabError(f"{unsupported[:3]}: unsupported file type; use "
                          f"{', '.join(BUILDERS)} files")
    return files


def _file_rows(path: Path) -> int | None:
    """Row count when it is free to know (parquet footer), else None; raises on a bad footer."""
    if path.suffix != ".parquet":
        return None
    try:
        return pq.ParquetFile(path).metadata.num_rows
    except (pa.ArrowException, OSError) as e:
        raise SaelabError(f"{path} is not a readable parquet file ({e}); "
                          "fix or remove it") from None


def _local_records(files: list[Path], counts: Counter) -> Iterator[tuple[str, int, dict]]:
    import datasets

    for path in files:
        builder = BUILDERS[path.suffix.lower()]
        # The builders fail on an empty file (no schema to infer): count it instead.
        if path.stat().st_size == 0 or _file_rows(path) == 0:
            n = 0
        else:
            # Invalid UTF-8 bytes would fail the whole file; decoded with replacement they
            # become U+FFFD, and the record holding them is counted and dropped.
            opts = ({"encoding": "utf-8-sig", "encoding_errors": "replace"}
                    if builder == "json" else {})
            try:
                ds = datasets.load_dataset(builder, data_files=[str(path)], split="train",
                                           streaming=True, **opts)
                n = 0
                for n, rec in enumerate(ds, 1):
                    yield path.name, n - 1, rec
            except StopIteration:  # raised by schema inference when there are no records
                n = 0
            except (ValueError, OSError, pa.ArrowException) as e:
                raise SaelabError(f"{path} cannot be read as {builder} ({type(e).__name__}: "
                                  f"{str(e)[:200]}); fix or remove the file") from None
        if n == 0:
            log.warning("%s holds no records; skipped", path)
            counts["empty_files"] += 1


def _hub_records(data: DataCfg, manifest: dict) -> Iterator[tuple[str, int, dict]]:
    """Open the Hub stream now (token, access and revision fail before anything is written)."""
    import datasets
    import huggingface_hub

    if data.source == "oscar":
        repo, revision = data.oscar_repo, data.oscar_revision
        token = oscar_token(data)
        kwargs = {"data_files": data.oscar_files}
        manifest["files"] = data.oscar_files
    else:
        repo, revision = data.fineweb2_repo, data.fineweb2_revision
        token = os.environ.get("HF_TOKEN") or None  # public; a token only raises rate limits
        kwargs = {"name": data.fineweb2_config}
        manifest["config"] = data.fineweb2_config
    manifest.update(repo=repo, revision=revision)
    setting = f"data.{data.source}_repo / data.{data.source}_revision"
    with _hub_dataset_errors(repo, setting):
        # Pin the resolved commit: the manifest then names exactly the data read.
        sha = huggingface_hub.HfApi().dataset_info(repo, revision=revision, token=token).sha
        manifest["revision_sha"] = sha
        ds = datasets.load_dataset(repo, revision=sha, split="train", streaming=True,
                                   token=token, **kwargs)
    return _hub_rows(ds, repo, setting)


def _hub_rows(ds, repo: str, setting: str) -> Iterator[tuple[str, int, dict]]:
    with _hub_dataset_errors(repo, setting):
        for row, rec in enumerate(ds):
            yield repo, row, rec


@contextlib.contextmanager
def _hub_dataset_errors(repo: str, setting: str) -> Iterator[None]:
    from datasets.exceptions import DatasetNotFoundError

    try:
        with hub_errors(repo, setting, gated_url=f"https://huggingface.co/datasets/{repo}"):
            yield
    except DatasetNotFoundError as e:  # datasets' own wording of "gated" / "not found"
        raise SaelabError(f"{repo}: {e}; check {setting} and HF_TOKEN") from None


# --- cleaning ----------------------------------------------------------------------

def _text_or_reason(value) -> tuple[str | None, str | None, bytes | None]:
    """(text, None, utf-8 bytes) for a usable text, else (None, drop reason, None)."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            return None, "invalid_utf8", None
    if not isinstance(value, str):
        return None, "not_text", None
    if not value:
        return None, "empty", None
    if value.isspace():
        return None, "whitespace_only", None
    if "\ufffd" in value:
        return None, "invalid_utf8", None
    try:
        raw = value.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a \\udXXX escape in JSON
        return None, "invalid_utf8", None
    return value, None, raw


def clean(records: Iterator[tuple[str, int, dict]], data: DataCfg,
          counts: Counter) -> Iterator[tuple[str, str, str]]:
    """Yield (doc_id, group, text) for records that survive cleaning; count drops and cuts."""
    seen_text: set[bytes] = set()
    seen_ids: set[str] = set()
    for label, row, rec in records:
        counts["records_read"] += 1
        text, reason, raw = _text_or_reason(rec.get("text"))
        if reason:
            counts[reason] += 1
            continue
        digest = hashlib.blake2b(raw, digest_size=16).digest()
        if digest in seen_text:
            counts["duplicate"] += 1
            continue
        seen_text.add(digest)
        if len(text) > data.max_doc_chars:
            counts["cut_docs"] += 1
            counts["cut_chars"] += len(text) - data.max_doc_chars
            text = text[:data.max_doc_chars]
        doc_id = str(rec["id"]) if rec.get("id") is not None else f"{label}:{row}"
        if doc_id in seen_ids:  # ids repeat across local files; the position does not
            doc_id = f"{doc_id}@{label}:{row}"
        seen_ids.add(doc_id)
        yield doc_id, group_key(doc_id, rec), text


# --- writing -----------------------------------------------------------------------

class _ShardWriter:
    """Parquet shards of `shard_docs` documents, each renamed into place once complete."""

    def __init__(self, out_dir: Path, split: str, shard_docs: int):
        self.out_dir, self.split, self.shard_docs = out_dir, split, shard_docs
        self.ids: list[str] = []
        self.groups: list[str] = []
        self.texts: list[str] = []
        self.shards: list[str] = []
        self.docs = 0
        self.chars = 0

    def add(self, doc_id: str, group: str, text: str) -> None:
        self.ids.append(doc_id)
        self.groups.append(group)
        self.texts.append(text)
        self.docs += 1
        self.chars += len(text)
        if len(self.ids) >= self.shard_docs:
            self.flush()

    def flush(self) -> None:
        if not self.ids:
            return
        name = f"{self.split}-{len(self.shards):05d}.parquet"
        table = pa.table({"text": pa.array(self.texts, pa.string()),
                          "doc_id": pa.array(self.ids, pa.string()),
                          "group": pa.array(self.groups, pa.string())})
        with atomic_path(self.out_dir / name) as tmp:
            pq.write_table(table, tmp)
        self.shards.append(name)
        self.ids, self.groups, self.texts = [], [], []


def _empty_corpus_fix(data: DataCfg) -> str:
    return {
        "sample": f"check that {data.sample_path} holds JSON lines with a non-empty `text`",
        "local": f"point data.local_files (now {data.local_files!r}) at .jsonl/.parquet files "
                 "with a non-empty `text` column",
    }.get(data.source, "check the repo, revision and file settings of data.source, or raise "
                       "data.token_budget / data.max_docs")


def _write_splits(docs: Iterator[tuple[str, str, str]], data: DataCfg, out_dir: Path,
                  ) -> tuple[dict[str, _ShardWriter], list[str], int, list[str], str]:
    """Stage cleaned documents until the source or the budget ends, choose the held-out
    groups, then route each staged document to its split's shards (staging removed).

    Returns the split writers, the held-out groups, the number of groups, the held-out
    doc ids and what stopped the reading.
    """
    staged = _ShardWriter(out_dir, _STAGED, data.shard_docs)
    group_docs: Counter[str] = Counter()
    stopped_by = "end_of_source"
    # Counted in documents against max_docs when set; a token budget or the source's end
    # stops the loop at a length not known up front.
    bar = Progress(f"corpus ({data.source})", data.max_docs or None, unit="doc",
                   rate_unit="docs")
    for doc_id, group, text in docs:
        staged.add(doc_id, group, text)
        group_docs[group] += 1
        bar.update(1, tokens_est=f"{staged.chars / data.chars_per_token:,.0f}")
        if data.token_budget and staged.chars / data.chars_per_token >= data.token_budget:
            stopped_by = "token_budget"
            break
        if data.max_docs and staged.docs >= data.max_docs:
            stopped_by = "max_docs"
            break
    bar.close()
    staged.flush()
    held = heldout_groups(group_docs, data.heldout_fraction)
    held_set = set(held)
    writers = {s: _ShardWriter(out_dir, s, data.shard_docs) for s in SPLITS}
    heldout_ids: list[str] = []
    for name in staged.shards:
        table = pq.read_table(out_dir / name)
        for doc_id, group, text in zip(*(table.column(c).to_pylist()
                                         for c in ("doc_id", "group", "text"))):
            split = "heldout" if group in held_set else "train"
            writers[split].add(doc_id, group, text)
            if split == "heldout":
                heldout_ids.append(doc_id)
        (out_dir / name).unlink()
    for w in writers.values():
        w.flush()
    return writers, held, len(group_docs), heldout_ids, stopped_by


def fetch_corpus(params: Params, out_dir: Path = paths.CORPUS_DIR) -> dict:
    """Stream, clean and split `params.data.source` into parquet shards; return the manifest."""
    data = params.data
    out_dir = Path(out_dir)
    counts: Counter = Counter()
    manifest: dict = {"source": data.source}
    if data.source in ("sample", "local"):
        files = _local_files(data)
        manifest["files"] = [f.as_posix() for f in files]
        records = _local_records(files, counts)
    else:
        records = _hub_records(data, manifest)
    # Written beside out_dir and swapped in only when complete: a failed or empty fetch
    # leaves the previous corpus (if any) as it was.
    work = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        docs = clean(records, data, counts)
        writers, held, n_groups, heldout_ids, stopped_by = _write_splits(docs, data, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if writers["train"].docs == 0:
        shutil.rmtree(work)
        dropped = {k: counts[k] for k in DROP_REASONS if counts[k]}
        raise SaelabError(
            f"data.source = {data.source}: no training documents after cleaning "
            f"({counts['records_read']} records read, dropped {dropped or 'none'}, "
            f"{counts['empty_files']} empty files); {_empty_corpus_fix(data)}")
    manifest.update({
        "docs": {s: w.docs for s, w in writers.items()},
        "chars": {s: w.chars for s, w in writers.items()},
        "tokens_estimate": {s: round(w.chars / data.chars_per_token) for s, w in writers.items()},
        "chars_per_token": data.chars_per_token,
        "shards": {s: w.shards for s, w in writers.items()},
        "heldout": {"fraction": data.heldout_fraction, "rule": HELDOUT_RULE,
                    "groups_total": n_groups, "n_groups": len(held), "groups": held,
                    "doc_ids": heldout_ids},
        "records_read": counts["records_read"],
        "dropped": {k: counts[k] for k in DROP_REASONS},
        "cut": {"docs": counts["cut_docs"], "chars_removed": counts["cut_chars"],
                "max_doc_chars": data.max_doc_chars},
        "empty_files": counts["empty_files"],
        "stopped_by": stopped_by,
        "token_budget": data.token_budget,
        "max_docs": data.max_docs,
    })
    atomic.write_text(work / MANIFEST, json.dumps(manifest, indent=2, ensure_ascii=False) + "\n")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    work.rename(out_dir)
    return manifest


def read_manifest(corpus_dir: Path = paths.CORPUS_DIR) -> dict:
    path = Path(corpus_dir) / MANIFEST
    if not path.is_file():
        raise SaelabError(f"no corpus in {corpus_dir} ({MANIFEST} missing); "
                          "run `dvc repro fetch_oscar` first")
    return json.loads(path.read_text(encoding="utf-8"))


def iter_documents(corpus_dir: Path = paths.CORPUS_DIR, split: str = "train", *,
                   seed: int | None = None) -> Iterator[tuple[str, str]]:
    """(doc_id, text) of one split: in the order fetch_corpus wrote them, or, with `seed`, in
    a seeded random order of the whole split (DOC_ORDER_RULE; the same for the same seed).

    The seeded order holds the split's text in memory (as Arrow, about its size in UTF-8:
    ~40 MB for the 12 M-token corpus of the real profile).
    """
    if split not in SPLITS:
        raise SaelabError(f"unknown corpus split {split!r}; choose one of {list(SPLITS)}")
    corpus_dir = Path(corpus_dir)
    shards = [corpus_dir / name for name in read_manifest(corpus_dir)["shards"][split]]
    columns = ["doc_id", "text"]
    if seed is None:
        for path in shards:
            for batch in pq.ParquetFile(path).iter_batches(columns=columns):
                yield from zip(batch.column("doc_id").to_pylist(),
                               batch.column("text").to_pylist())
        return
    if not shards:
        return
    table = pa.concat_tables(pq.read_table(path, columns=columns) for path in shards)
    order = np.random.default_rng(seed).permutation(table.num_rows)
    for start in range(0, len(order), 1024):  # a block at a time: no copy of the whole split
        part = table.take(order[start:start + 1024])
        yield from zip(part.column("doc_id").to_pylist(), part.column("text").to_pylist())


def check_watched(data: DataCfg) -> None:
    """Refuse local files outside data.local_dir: dvc.yaml declares that folder as a
    dependency of fetch_oscar, so only an edit inside it makes `dvc status` rerun the stage."""
    if data.source != "local" or not data.local_files:
        return
    fixed = []
    for part in Path(data.local_files).parts:
        if any(c in part for c in "*?["):
            break
        fixed.append(part)
    if not Path(*fixed, ".").resolve().is_relative_to(Path(data.local_dir).resolve()):
        raise SaelabError(
            f"data.local_files = {data.local_files!r} lies outside data.local_dir = "
            f"{data.local_dir!r}, the folder DVC watches for fetch_oscar (an edit elsewhere "
            f"would not rerun it); move the files under {data.local_dir} or set "
            "data.local_dir to a folder that holds them")


def _run(params: Params) -> None:
    from ..core.tracking import log_artifact, log_metrics

    check_watched(params.data)
    m = fetch_corpus(params, paths.CORPUS_DIR)
    log.info("%s: %s docs (%s tokens est.), dropped %s, cut %d, stopped by %s", m["source"],
             m["docs"], m["tokens_estimate"], m["dropped"], m["cut"]["docs"], m["stopped_by"])
    log_metrics({"corpus": {k: m[k] for k in ("docs", "chars", "tokens_estimate", "dropped",
                                              "records_read", "empty_files")}
                 | {"cut_docs": m["cut"]["docs"]}})
    log_artifact(paths.CORPUS_DIR / MANIFEST)


def main() -> None:
    from ..core.stage import run_stage

    run_stage("fetch_oscar", _run)
