"""Sharing the activation store on the Hub: the planned files and the card, without network."""
import hashlib
import json
import logging

import pytest
import yaml

from saelab.core.integrity import seal
from saelab.core import hub_access
from saelab.hub import share as hub_share
from saelab.core.errors import SaelabError
from saelab.hub.share import build_dataset_card, plan_upload, upload_store
from saelab.activations.store import ActivationStore

MODEL_JSON = {"name": "meta-llama/Llama-3.2-1B", "source": "hub",
              "hf_repo": "meta-llama/Llama-3.2-1B", "revision": "4e20de36" + "0" * 32}
CORPUS = {"source": "oscar", "repo": "oscar-corpus/oscar", "revision": "refs/convert/parquet",
          "docs": {"train": 950, "heldout": 50}}


def _entry(path):
    data = path.read_bytes()
    return {"file": path.name, "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _store(tmp_path, n_shards=2):
    """A store laid out as store.py writes it (file contents are stand-ins)."""
    store = tmp_path / "activations"
    store.mkdir()
    shards = []
    for k in range(n_shards):
        files = {}
        for kind in ("acts", "tokens", "index", "norms"):
            f = store / f"shard-{k:05d}.{kind}.npy"
            f.write_bytes(f"{kind}{k}".encode())
            files[kind] = _entry(f)
        shards.append({"id": k, "n": 100, "files": files})
    (store / "rows.npy").write_bytes(b"rows")
    (store / "shard-00099.acts.npy.tmp").write_bytes(b"unfinished")  # never uploaded
    manifest = {"format": "saelab-activations/1", "complete": True,
                "model": "meta-llama/Llama-3.2-1B", "revision": MODEL_JSON["revision"],
                "layer": 8, "hook": "mlp_out", "dtype": "bfloat16", "d": 2048,
                "n_tokens": 200, "context_len": 1024, "n_rows": 1, "scale": 0.5,
                "rows": _entry(store / "rows.npy"), "shards": shards}
    manifest = seal(manifest)  # as extraction writes it
    (store / "manifest.json").write_text(json.dumps(manifest))
    return store, manifest


def test_plan_lists_every_manifest_file_then_the_manifest(tmp_path):
    store, _ = _store(tmp_path)
    plan = plan_upload(store)
    names = [dst for _, dst in plan]
    assert names == [f"shard-{k:05d}.{kind}.npy" for k in range(2)
                     for kind in ("acts", "tokens", "index", "norms")] + ["rows.npy",
                                                                           "manifest.json"]
    assert all(src == store / dst for src, dst in plan)


def test_plan_accepts_plain_paths_and_refuses_missing_files(tmp_path):
    store, manifest = _store(tmp_path)
    manifest["shards"] = [{"name": "s0", "files": {"acts": "shard-00000.acts.npy"},
                           "sha256": {}, "n_tokens": 100}]
    del manifest["rows"]
    (store / "manifest.json").write_text(json.dumps(manifest))
    assert [dst for _, dst in plan_upload(store)] == ["shard-00000.acts.npy", "manifest.json"]
    (store / "shard-00000.acts.npy").unlink()
    with pytest.raises(SaelabError, match=r"shard-00000\.acts\.npy is listed .* but missing"):
        plan_upload(store)
    with pytest.raises(SaelabError, match="run `dvc repro extract_mlp8`"):
        plan_upload(tmp_path / "nowhere")


def test_card_has_yaml_metadata_and_the_facts(tmp_path):
    _, manifest = _store(tmp_path)
    card = build_dataset_card(manifest, MODEL_JSON, CORPUS)
    assert card.startswith("---\n")
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["license"] == "cc0-1.0" and meta["base_model"] == "meta-llama/Llama-3.2-1B"
    assert meta["saelab"] == {"model": "meta-llama/Llama-3.2-1B",
                              "revision": MODEL_JSON["revision"], "layer": 8, "hook": "mlp_out",
                              "dtype": "bfloat16", "d": 2048, "n_tokens": 200,
                              "context_len": 1024, "corpus": "oscar"}
    body = card.split("---\n", 2)[2]
    for fact in ("meta-llama/Llama-3.2-1B", MODEL_JSON["revision"], "| layer | 8 |",
                 "`mlp_out`", "`bfloat16`", "| tokens | 200 |", "oscar-corpus/oscar",
                 "refs/convert/parquet", "950 train, 50 held out"):
        assert fact in body, fact
    # A random-weight model has no Hub page to link or to name as base_model.
    tiny = build_dataset_card(manifest, {"name": "tiny-llama-16L-64d", "source": "tiny",
                                         "hf_repo": None, "revision": "random-seed-0"},
                              {"source": "sample"})
    assert "base_model" not in yaml.safe_load(tiny.split("---\n")[1])
    assert "huggingface.co/tiny" not in tiny and "cc-by-4.0" in tiny


def test_upload_makes_one_commit_with_card_and_files(tmp_path, monkeypatch, caplog):
    import huggingface_hub

    store, manifest = _store(tmp_path)
    (tmp_path / "base.json").write_text(json.dumps(MODEL_JSON))
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS))
    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))

    def create_commit(self, repo_id, operations, **kwargs):
        calls.append(("create_commit", repo_id, operations, kwargs))

    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", create_commit)
    monkeypatch.setattr(ActivationStore, "verify", lambda self: [])
    caplog.set_level(logging.DEBUG)
    upload_store(store, "me/acts", model_json=tmp_path / "base.json",
                 corpus_manifest=tmp_path / "corpus.json")

    (_, repo, kwargs, token), (_, repo2, ops, commit_kwargs) = calls
    assert repo == repo2 == "me/acts" and token == "hf_secret_value"
    assert kwargs == {"repo_type": "dataset", "private": True, "exist_ok": True}
    assert commit_kwargs["repo_type"] == "dataset"
    assert [op.path_in_repo for op in ops] == ["README.md"] + [d for _, d in plan_upload(store)]
    card = ops[0].path_or_fileobj.decode()
    assert card == build_dataset_card(manifest, MODEL_JSON, CORPUS, "me/acts")
    assert 'snapshot_download("me/acts", repo_type="dataset")' in card
    assert "hf_secret_value" not in caplog.text


def test_upload_refuses_without_token_or_with_a_damaged_store(tmp_path, monkeypatch):
    import huggingface_hub

    store, _ = _store(tmp_path)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "create_commit", no_network)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(SaelabError, match="HF_TOKEN is not set"):
        upload_store(store, "me/acts")
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    monkeypatch.setattr(ActivationStore, "verify", lambda self: ["shard-00000.acts.npy: sha256 "
                                                                  "differs from the manifest"])
    with pytest.raises(SaelabError, match="fails verification.*sha256 differs"):
        upload_store(store, "me/acts")


def test_hub_errors_name_the_fix():
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    def response(status):
        return httpx2.Response(status, request=httpx2.Request("GET", "https://huggingface.co"))

    with pytest.raises(SaelabError, match="revision not found; fix model.revision"):
        with hub_access.hub_errors("meta-llama/Llama-3.2-1B", "model.revision"):
            raise RevisionNotFoundError("nope", response=response(404))
    with pytest.raises(SaelabError, match="refused HF_TOKEN.*HTTP 401"):
        with hub_access.hub_errors("me/acts", "the repo id"):
            raise HfHubHTTPError("unauthorized", response=response(401))
    with pytest.raises(SaelabError, match="cannot reach the Hugging Face Hub for me/acts"):
        with hub_access.hub_errors("me/acts", "the repo id"):
            raise httpx2.ConnectError("Name or service not known")
