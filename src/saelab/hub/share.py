"""Sharing on the Hugging Face Hub: the activation store as a dataset repo.

`upload_store` pushes the store (every shard file its manifest lists, the manifest and a
dataset card) to a dataset repo in one commit, so a reader never sees half a store.
The token (core.hub_access) comes only from `HF_TOKEN` in the environment and is never
logged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

from ..core import paths
from ..core.errors import SaelabError
from ..core.hub_access import hub_errors, hub_token

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
CARD = "README.md"
# Dataset-card license of the text the activations were computed on.
CORPUS_LICENSE = {"sample": "cc-by-4.0", "oscar": "cc0-1.0", "fineweb2": "odc-by"}


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except json.JSONDecodeError as e:
        raise SaelabError(f"{path} is not valid JSON ({e}); "
                          "rerun the stage that writes it") from None


def _store_manifest(store_dir: Path) -> dict:
    manifest = _read_json(store_dir / MANIFEST)
    if not manifest:
        raise SaelabError(f"no activation store in {store_dir} ({MANIFEST} missing); "
                          "run `dvc repro extract_mlp8` first")
    if not isinstance(manifest.get("shards"), list) or not manifest["shards"]:
        raise SaelabError(f"{store_dir / MANIFEST} lists no shards; rerun "
                          "`dvc repro extract_mlp8`")
    return manifest


def _entry_file(entry) -> str | None:
    """A manifest file entry is a relative path, or a dict naming it under "file"."""
    if isinstance(entry, str):
        return entry
    if isinstance(entry, dict) and isinstance(entry.get("file"), str):
        return entry["file"]
    return None


def plan_upload(store_dir: Path | str) -> list[tuple[Path, str]]:
    """(local file, path in the repo) for every file the store manifest names, then the manifest.

    That is each shard's files plus store-wide files such as the packed token rows. Paths
    in the repo mirror the store, so a downloaded snapshot opens like the local store.
    """
    store_dir = Path(store_dir)
    manifest = _store_manifest(store_dir)
    names: list[str] = []
    for i, shard in enumerate(manifest["shards"]):
        files = shard.get("files") if isinstance(shard, dict) else None
        shard_names = [_entry_file(e) for e in files.values()] if isinstance(files, dict) else []
        if not shard_names or None in shard_names:
            raise SaelabError(f"{store_dir / MANIFEST}: shard {i} does not list its files; "
                              "rerun `dvc repro extract_mlp8`")
        names += shard_names
    names += [_entry_file(v) for k, v in manifest.items()
              if k != "shards" and isinstance(v, dict) and _entry_file(v)]
    plan = []
    for rel in dict.fromkeys(names):  # once each, in manifest order
        local = store_dir / rel
        if not local.is_file():
            raise SaelabError(f"{local} is listed in the store manifest but missing; "
                              "rerun `dvc repro extract_mlp8`")
        plan.append((local, Path(rel).as_posix()))
    plan.append((store_dir / MANIFEST, MANIFEST))
    return plan


def _yaml_str(value) -> str:
    return json.dumps(str(value), ensure_ascii=False)  # a JSON string is a valid YAML scalar


def build_dataset_card(manifest: dict, model_json: dict, corpus_manifest: dict,
                       repo_id: str | None = None) -> str:
    """README.md of the dataset repo: YAML metadata, what the store holds, how to read it."""
    hf_repo = model_json.get("hf_repo")
    model = hf_repo or model_json.get("name") or manifest.get("model", "?")
    model_ref = f"[{model}](https://huggingface.co/{model})" if hf_repo else f"`{model}`"
    revision = model_json.get("revision") or manifest.get("revision", "?")
    layer, hook = manifest.get("layer", "?"), manifest.get("hook", "?")
    dtype, d = manifest.get("dtype", "?"), manifest.get("d", "?")
    n_tokens, context_len = manifest.get("n_tokens", "?"), manifest.get("context_len", "?")
    source = corpus_manifest.get("source", "unknown")
    corpus_repo = corpus_manifest.get("repo") or corpus_manifest.get("files") or source
    corpus_rev = " at ".join(f"`{r}`" for r in dict.fromkeys(
        r for r in (corpus_manifest.get("revision"), corpus_manifest.get("revision_sha")) if r))
    corpus_rev = f", revision {corpus_rev}" if corpus_rev else ""
    docs = corpus_manifest.get("docs", {})
    n_shards = len(manifest.get("shards", []))
    tokens = f"{n_tokens:,}" if isinstance(n_tokens, int) else n_tokens
    header = "\n".join([
        "---",
        f"license: {CORPUS_LICENSE.get(source, 'other')}",
        f"pretty_name: {_yaml_str(f'{model} layer {layer} {hook} activations')}",
        "tags:",
        "  - sparse-autoencoder",
        "  - interpretability",
        "  - activations",
        "  - saelab",
        *([f"base_model: {_yaml_str(hf_repo)}"] if hf_repo else []),
        "saelab:",
        f"  model: {_yaml_str(model)}",
        f"  revision: {_yaml_str(revision)}",
        f"  layer: {layer}",
        f"  hook: {_yaml_str(hook)}",
        f"  dtype: {_yaml_str(dtype)}",
        f"  d: {d}",
        f"  n_tokens: {n_tokens}",
        f"  context_len: {context_len}",
        f"  corpus: {_yaml_str(source)}",
        "---",
    ])
    body = f"""
# {model}: layer {layer} `{hook}` activations

Activation vectors of {model_ref} (revision `{revision}`),
written by saelab's `extract_mlp8` stage to train and study sparse autoencoders.

| | |
|---|---|
| model | `{model}` |
| revision | `{revision}` |
| layer | {layer} |
| hook | `{hook}` |
| dtype | `{dtype}` |
| width (d) | {d} |
| tokens | {tokens} |
| context length | {context_len} |
| shards | {n_shards} |
| corpus | `{source}` ({corpus_repo}{corpus_rev}) |
| corpus documents | {docs.get('train', '?')} train, {docs.get('heldout', '?')} held out |

Documents were tokenized with the Llama-3 tokenizer, concatenated with BOS at each row
start and cut into rows of {context_len} tokens (no padding). BOS and EOS positions are
not stored. Each shard holds the vectors, their token ids (uint32) and a (row, position)
index into the packed token rows. `{MANIFEST}` lists every file with its sha256, plus the
normalisation scalar and norm statistics.

## Use

```python
from huggingface_hub import snapshot_download
from saelab.activations.store import ActivationStore

store = ActivationStore(snapshot_download("{repo_id or '<this repo>'}", repo_type="dataset"))
x = store.sample(4096, seed=0)  # float32 [4096, {d}], scaled so E||x||^2 = 1
```

## License

The text comes from `{source}` (license: {CORPUS_LICENSE.get(source, 'see the corpus source')}).
The activations are outputs of {model}; its own license applies to them as well.
"""
    return header + "\n" + body


def upload_store(store_dir: Path | str, repo_id: str, *, private: bool = True,
                 model_json: Path | str = paths.MODEL_JSON,
                 corpus_manifest: Path | str = paths.CORPUS_DIR / "manifest.json") -> str:
    """Create (or reuse) the dataset repo, push store and card in one commit, return its URL."""
    from huggingface_hub import CommitOperationAdd, HfApi

    from ..activations.store import ActivationStore

    store_dir = Path(store_dir)
    token = hub_token(f"uploading the store to {repo_id}",
                      "export HF_TOKEN=... (a token with write access)")
    plan = plan_upload(store_dir)
    # Never publish a damaged or unfinished store: check every file against its sha256.
    problems = ActivationStore(store_dir).verify()
    if problems:
        raise SaelabError(f"{store_dir} fails verification ({'; '.join(problems[:3])}); "
                          "rerun `dvc repro extract_mlp8` before uploading")
    card = build_dataset_card(_store_manifest(store_dir), _read_json(Path(model_json)),
                              _read_json(Path(corpus_manifest)), repo_id)
    operations = [CommitOperationAdd(path_in_repo=CARD, path_or_fileobj=card.encode("utf-8"))]
    operations += [CommitOperationAdd(path_in_repo=dst, path_or_fileobj=str(src))
                   for src, dst in plan]
    api = HfApi(token=token)
    with hub_errors(repo_id, "the repo id"):
        api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
        info = api.create_commit(repo_id, operations, repo_type="dataset",
                                 commit_message=f"saelab activation store ({len(plan)} files)")
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/datasets/{repo_id}"
    log.info("uploaded %d files and the card to %s", len(plan), url)
    return url
