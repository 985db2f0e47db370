"""The activation store as a Hugging Face `datasets` dataset in SAELens's cached layout.

SAELens's cached-activations loader (`ActivationsStore.load_cached_activation_dataset`)
opens a folder with `datasets.load_from_disk` and reads, row by row, a column named by the
hook point (TransformerLens name, e.g. `blocks.8.hook_mlp_out`: Array2D float32
[context_size, d_in]) and `token_ids` (int32 [context_size]) beside it; its own
CacheActivationsRunner writes that layout. `export_hf` writes the same from our store,
so SAELens, and anything that reads Arrow, trains from it without saelab.

A row is `seq_len` consecutive stored vectors (the store's context length by default).
The store holds no BOS/EOS vectors, so rows do not line up with the model's context
windows; SAELens flattens rows into tokens anyway. The last `n_tokens % seq_len` vectors
do not fill a row and are left out (counted in `saelab_export.json`). Values are the
store's, as float32 (bf16 widens exactly; Arrow has no bf16), not normalised: SAELens
applies its own `normalize_activations`.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from ..activations.hooks import saelens_hook_name
from ..activations.store import ActivationStore
from ..core import atomic, paths
from ..core.errors import SaelabError
from .cards import dataset_card

log = logging.getLogger(__name__)

EXPORT_INFO = "saelab_export.json"
CARD = "README.md"
FORMAT = "saelab-hf-activations/1"
# Rows per Arrow record batch, and so per write: bounds memory at ~64 MB whatever d.
_BATCH_BYTES = 64 << 20
_SHARD_SIZE = "500MB"


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file saelab wrote, {} when absent, one clear error when damaged."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise SaelabError(f"{path} is not valid JSON ({e}); rerun the stage that writes "
                          "it") from None


def _rows(store_dir: str, seq_len: int, n_rows: int, hook_name: str,
          ) -> Iterator[dict[str, np.ndarray]]:
    """Rows of `seq_len` consecutive vectors and their token ids, in store order."""
    store = ActivationStore(store_dir)
    block = max(seq_len, _BATCH_BYTES // (4 * store.d) // seq_len * seq_len)
    acts_left = np.zeros((0, store.d), np.float32)
    ids_left = np.zeros(0, np.int32)
    start, emitted = 0, 0
    for i, shard in enumerate(store.manifest["shards"]):
        tokens = store.token_ids(i)
        for lo in range(0, shard["n"], block):
            hi = min(lo + block, shard["n"])
            acts = store.gather(np.arange(start + lo, start + hi), normalise=False).numpy()
            acts = np.concatenate([acts_left, acts])
            ids = np.concatenate([ids_left, np.asarray(tokens[lo:hi], dtype=np.int32)])
            full = len(ids) // seq_len
            for r in range(min(full, n_rows - emitted)):
                yield {hook_name: acts[r * seq_len:(r + 1) * seq_len],
                       "token_ids": ids[r * seq_len:(r + 1) * seq_len]}
            emitted += full
            acts_left, ids_left = acts[full * seq_len:], ids[full * seq_len:]
        start += shard["n"]


def export_info(store: ActivationStore, seq_len: int) -> dict[str, Any]:
    """What the export holds and where it came from (saelab_export.json; the cards read it)."""
    m = store.manifest
    n_rows = store.n_tokens // seq_len
    return {
        "format": FORMAT, "model": m.get("model"), "revision": m.get("revision"),
        "layer": m["layer"], "hook": m["hook"], "hook_name": saelens_hook_name(m["layer"],
                                                                             m["hook"]),
        "d": store.d, "seq_len": seq_len, "n_rows": n_rows, "n_tokens": n_rows * seq_len,
        "left_out_tokens": store.n_tokens - n_rows * seq_len, "dtype": "float32",
        "store_dtype": store.dtype, "normalised": False, "scale": store.scale,
        "context_len": store.context_len, "vocab_size": m.get("vocab_size"),
        "bos_id": m.get("bos_id"), "eos_id": m.get("eos_id"), "norm": m.get("norm"),
        "excluded": m.get("excluded"), "corpus": m.get("corpus"),
        "store_fingerprint": m.get("fingerprint"),
    }


def export_hf(store_dir: Path | str, out_dir: Path | str, *, seq_len: int | None = None,
              model_json: Path | str = paths.MODEL_JSON,
              corpus_manifest: Path | str = paths.CORPUS_DIR / "manifest.json",
              ) -> dict[str, Any]:
    """Write the store in `store_dir` as a `load_from_disk`-able dataset in `out_dir`, with
    saelab_export.json and a dataset card; return the export info.

    The dataset is built in `<out_dir>.tmp` and renamed when complete, so `out_dir` is
    either absent or a whole export.
    """
    from datasets import Array2D, Dataset, Features, Sequence, Value

    store = ActivationStore(store_dir)
    out_dir = Path(out_dir)
    if out_dir.exists():
        raise SaelabError(f"{out_dir} already exists; delete it or export to another "
                          "directory")
    seq_len = seq_len or store.context_len
    if not 0 < seq_len <= store.n_tokens:
        raise SaelabError(f"--seq-len {seq_len} must be between 1 and the store's "
                          f"{store.n_tokens} tokens")
    # Never export a damaged or unfinished store: check every file against its sha256.
    problems = store.verify()
    if problems:
        raise SaelabError(f"{store.path} fails verification ({'; '.join(problems[:3])}); "
                          "rerun `dvc repro extract_mlp8` before exporting")
    info = export_info(store, seq_len)
    needed = 2 * info["n_tokens"] * (4 * store.d + 4)  # the Arrow cache, then the copy
    probe = out_dir.resolve().parent
    free = shutil.disk_usage(probe).free if probe.exists() else None
    if free is not None and needed > free:
        raise SaelabError(f"the export needs about {needed / 1e9:.2f} GB in {probe} while it "
                          f"runs, {free / 1e9:.2f} GB are free; free space or export "
                          "elsewhere")
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)  # left by an interrupted export
    hook_name = info["hook_name"]
    features = Features({hook_name: Array2D((seq_len, store.d), "float32"),
                         "token_ids": Sequence(Value("int32"), length=seq_len)})
    ds = Dataset.from_generator(
        _rows, features=features, cache_dir=str(tmp / "cache"),
        gen_kwargs={"store_dir": str(store.path.resolve()), "seq_len": seq_len,
                    "n_rows": info["n_rows"], "hook_name": hook_name},
        writer_batch_size=max(1, _BATCH_BYTES // (4 * store.d * seq_len)))
    ds.save_to_disk(str(tmp / "data"), max_shard_size=_SHARD_SIZE)
    del ds
    atomic.write_text(tmp / "data" / EXPORT_INFO, json.dumps(info, indent=1) + "\n")
    write_card(tmp / "data", model_json=model_json, corpus_manifest=corpus_manifest)
    (tmp / "data").rename(out_dir)
    shutil.rmtree(tmp)
    log.info("exported %d rows x %d tokens (%d left out) to %s", info["n_rows"], seq_len,
             info["left_out_tokens"], out_dir)
    return info


def read_export(export_dir: Path | str) -> dict[str, Any]:
    """The export info of a finished export, or one clear error."""
    export_dir = Path(export_dir)
    info = read_json(export_dir / EXPORT_INFO)
    if info.get("format") != FORMAT:
        raise SaelabError(f"{export_dir} holds no saelab dataset export ({EXPORT_INFO} "
                          "missing); run `saelab export-store --format hf "
                          f"{export_dir}` first")
    return info


def write_card(export_dir: Path, *, repo_id: str | None = None,
               model_json: Path | str = paths.MODEL_JSON,
               corpus_manifest: Path | str = paths.CORPUS_DIR / "manifest.json") -> str:
    """(Re)write README.md of an export, naming `repo_id` in its usage snippets."""
    card = dataset_card(read_export(export_dir), read_json(Path(model_json)),
                        read_json(Path(corpus_manifest)), repo_id)
    atomic.write_text(Path(export_dir) / CARD, card)
    return card
