"""Sharing in the ecosystem's formats, without network: the `datasets` export of the store
(read back by datasets and SAELens), the Hub cards, and both uploads against a mocked HfApi.

Card snapshots live in tests/snapshots/; after a deliberate card change rewrite them with
SAELAB_UPDATE_SNAPSHOTS=1 (the test still fails that run, so a rewrite is never silent).
"""
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from saelab.activations.store import ActivationStore, StoreWriter
from saelab.cli import main
from saelab.core import hub_access
from saelab.core.errors import SaelabError
from saelab.hub import cards
from saelab.hub.hf_dataset import export_hf, read_export

SNAPSHOTS = Path(__file__).parent / "snapshots"
HOOK = "blocks.8.hook_mlp_out"
CTX, D, N_ROWS = 16, 8, 12
TOKEN = "hf_secret_value_123"
LLAMA = {"name": "meta-llama/Llama-3.2-1B", "source": "hub", "hf_repo": "meta-llama/Llama-3.2-1B",
         "revision": "4e20de362430cd3b72f300e6b0f18e50e7166e08"}
TINY = {"name": "tiny-llama-16L-64d", "source": "tiny", "hf_repo": None,
        "revision": "random-seed-0"}
OSCAR = {"source": "oscar", "repo": "oscar-corpus/oscar", "revision": "refs/convert/parquet",
         "docs": {"train": 950, "heldout": 50}}
SAMPLE = {"source": "sample", "files": ["data/sample/spanish_novels_cligs.jsonl"],
          "docs": {"train": 1463, "heldout": 111}}


def make_store(path, dtype="bfloat16"):
    """A real store (the store's writer) over several shards: 180 vectors, BOS excluded."""
    g = np.random.default_rng(0)
    rows = g.integers(0, 128000, size=(N_ROWS, CTX)).astype(np.uint32)
    rows[:, 0] = 128000
    acts = torch.from_numpy(g.standard_normal((N_ROWS * (CTX - 1), D)).astype(np.float32) * 3)
    bits = acts.bfloat16().view(torch.uint16).numpy() if dtype == "bfloat16" else acts.numpy()
    index = np.array([[r, p] for r in range(N_ROWS) for p in range(1, CTX)], dtype=np.int64)
    w = StoreWriter(path, fingerprint="t", d=D, dtype=dtype, n_tokens=len(acts),
                    shard_tokens=50, context_len=CTX)
    w.add(0, rows, bits, rows[:, 1:].reshape(-1), index, acts.norm(dim=1).numpy())
    w.finalize({"model": LLAMA["name"], "revision": LLAMA["revision"], "layer": 8,
                "hook": "mlp_out"}, vocab_size=128256, special_ids=[128000, 128001],
               bos_id=128000, eos_id=128001)
    return ActivationStore(path)


def _write(path, obj):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture
def exported(tmp_path):
    store = make_store(tmp_path / "store")
    info = export_hf(tmp_path / "store", tmp_path / "hf", seq_len=CTX,
                     model_json=_write(tmp_path / "base.json", LLAMA),
                     corpus_manifest=_write(tmp_path / "corpus.json", OSCAR))
    return store, info, tmp_path / "hf"


def _meta(card):
    return yaml.safe_load(card.split("---\n")[1])


def test_export_is_a_datasets_dataset_holding_the_store_vectors(exported, tmp_path):
    import datasets

    store, info, out = exported
    # 180 vectors in rows of 16: 11 rows, the last 4 vectors fill no row.
    assert (info["n_rows"], info["n_tokens"], info["left_out_tokens"]) == (11, 176, 4)
    assert info["hook_name"] == HOOK and read_export(out) == info
    ds = datasets.load_from_disk(str(out))
    assert ds.column_names == [HOOK, "token_ids"] and len(ds) == 11
    assert ds.features[HOOK].shape == (CTX, D) and ds.features[HOOK].dtype == "float32"
    rows = ds.with_format("numpy")[:]
    ids = np.concatenate([store.token_ids(i) for i in range(store.num_shards)])[:176]
    # Exactly the store's values (bf16 widened), in store order, across shard boundaries.
    assert torch.equal(torch.from_numpy(rows[HOOK].reshape(-1, D)),
                       store.gather(np.arange(176), normalise=False))
    assert np.array_equal(rows["token_ids"].reshape(-1), ids.astype(np.int32))
    assert not list(tmp_path.glob("*.tmp"))
    with pytest.raises(SaelabError, match="already exists; delete it"):
        export_hf(tmp_path / "store", out)


def test_saelens_trains_from_the_export(exported, monkeypatch):
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.jumprelu_sae import JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    store, info, out = exported
    # The card's own snippet, with the download served from the local folder.
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: str(out))
    snippet = cards.saelens_snippet("me/acts", info).replace("train_batch_size_tokens=4096",
                                                             "train_batch_size_tokens=16")
    scope: dict = {}
    exec(snippet, scope)
    sl_store = scope["store"]
    assert scope["x"].shape == (16, D)
    # SAELens reads the rows in order: the same vectors and token ids as the store.
    sl_store.current_row_idx = 0
    acts, ids = sl_store.get_raw_llm_batch()
    n = len(acts)
    assert torch.equal(acts, store.gather(np.arange(n), normalise=False))
    all_ids = np.concatenate([store.token_ids(i) for i in range(store.num_shards)])
    assert torch.equal(ids.long(), torch.from_numpy(all_ids[:n].astype(np.int64)))
    sae = JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=D, d_sae=16, dtype="float32",
                                                        device="cpu"))
    before = sae.W_enc.detach().clone()
    trainer = SAETrainer(SAETrainerConfig(total_training_samples=160,
                                          train_batch_size_samples=16, lr=1e-2, lr_end=1e-2,
                                          n_batches_for_norm_estimate=1), sae, sl_store)
    trainer.fit()
    assert trainer.n_training_steps == 10
    assert torch.isfinite(sae.W_enc).all() and not torch.equal(sae.W_enc, before)


def test_card_metadata_is_what_the_hub_reads(exported, tmp_path):
    import datasets

    _, info, out = exported
    card = (out / "README.md").read_text()
    meta = _meta(card)
    # Llama 3.2 Community License: no Hub id, so `other` with its name and link.
    assert (meta["license"], meta["license_name"]) == ("other", "llama3.2")
    assert meta["license_link"].endswith("Llama-3.2-1B/blob/main/LICENSE.txt")
    assert meta["language"] == ["es"] and meta["task_categories"] == ["feature-extraction"]
    assert meta["size_categories"] == ["n<1K"] and meta["source_datasets"] == ["oscar-corpus/oscar"]
    assert "CC0 1.0" in card and "Llama 3.2 Community License" in card
    # The Hub resolves `configs:` against the repo's files: a copy without the
    # save_to_disk state loads the same rows through it.
    hub = tmp_path / "hub"
    hub.mkdir()
    for f in out.iterdir():
        if f.name != "state.json":
            shutil.copy(f, hub)
    assert meta["configs"] == [{"config_name": "default",
                                "data_files": [{"split": "train", "path": "data-*.arrow"}]}]
    ds = datasets.load_dataset(str(hub), split="train", cache_dir=str(tmp_path / "cache"))
    assert ds.features == datasets.load_from_disk(str(out)).features and len(ds) == 11
    # A random-weight model is flagged; the corpus reads as text, not a Python list.
    tiny = cards.dataset_card(info, TINY, SAMPLE)
    assert _meta(tiny)["license"] == "cc-by-4.0" and "random-weights" in _meta(tiny)["tags"]
    assert _meta(tiny)["saelab"]["random_weights"] is True and "**Random weights.**" in tiny
    assert "files `data/sample/spanish_novels_cligs.jsonl`" in tiny and "['" not in tiny


def _sae_export(root):
    from saelab.core.config import SAECfg
    from saelab.sae.autoencoder import SAE, export_sae

    torch.manual_seed(0)
    export_sae(SAE(D, 16, SAECfg(d_sae=16)), root / "models/sae", scale=0.5, meta={
        "model_name": LLAMA["name"], "model_revision": LLAMA["revision"], "hook_name": HOOK,
        "layer": 8, "hook": "mlp_out", "lr": 7e-5, "lr_source": "params.sae.lr",
        "training_tokens": 4096, "data_source": "store"})


METRICS = {"l0": 31.5, "fvu": 0.21, "delta_lm_loss": 0.0123, "ce_loss_recovered": 0.93,
           "dead_fraction": 0.02, "tokens": 4096, "lm_metrics_meaningful": True,
           "sources": {"eval": "heldout documents"}}


def _tracked_run(metrics, commit):
    from saelab.core import tracking
    import mlflow

    tracking.setup()
    with mlflow.start_run() as run:
        mlflow.set_tags({"dvc.stage": "train_sae", "git.commit": commit})
        mlflow.log_metrics({"final.fvu": metrics["fvu"], "final.l0": metrics["l0"]})
    return run.info.run_id


@pytest.fixture
def hub_calls(monkeypatch, tmp_path):
    """HfApi with create_repo / upload_folder recorded; uploaded folders are copied."""
    import huggingface_hub

    calls = []

    def create_repo(self, repo_id, **kwargs):
        calls.append(("create_repo", repo_id, kwargs, self.token))

    def upload_folder(self, *, repo_id, folder_path, **kwargs):
        copy = tmp_path / f"uploaded-{len(calls)}"
        shutil.copytree(folder_path, copy)
        calls.append(("upload_folder", repo_id, kwargs, copy))

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return calls


def _files(folder):
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file())


def test_upload_sae_in_from_pretrained_layout(tmp_path, monkeypatch, hub_calls, caplog,
                                              capsys, isolated_mlflow):
    monkeypatch.chdir(tmp_path)
    _sae_export(tmp_path)
    _write(tmp_path / "reports/train/metrics.json", METRICS)
    _write(tmp_path / "models/base.json", LLAMA)
    _write(tmp_path / "data/corpus/manifest.json", OSCAR)
    ours = _tracked_run(METRICS, "abc123")
    _tracked_run({"fvu": 0.5, "l0": 9.0}, "later0")  # a newer, unrelated run
    caplog.set_level(logging.DEBUG)
    assert main(["upload-sae", "me/sae", "--dataset", "me/acts"]) == 0

    (_, repo, kw, token), (_, repo2, up_kw, folder) = hub_calls
    assert repo == repo2 == "me/sae" and token == TOKEN
    assert kw == {"repo_type": "model", "private": True, "exist_ok": True}
    assert up_kw["repo_type"] == "model"
    assert _files(folder) == ["README.md", f"{HOOK}/cfg.json", f"{HOOK}/sae_weights.safetensors"]
    card = (folder / "README.md").read_text()
    meta = _meta(card)
    assert meta["library_name"] == "saelens" and meta["license"] == "other"
    assert meta["base_model"] == "meta-llama/Llama-3.2-1B" and meta["datasets"] == ["me/acts"]
    assert meta["saelab"]["mlflow_run_id"] == ours and meta["saelab"]["git_commit"] == "abc123"
    for fact in ("| L0 | 31.5 |", "| FVU | 0.21 |", "| delta LM loss (nats) | 0.0123 |",
                 "| CE loss recovered | 0.93 |", "| dead fraction | 0.02 |",
                 "| training tokens | 4,096 |", "7e-05 (from params.sae.lr)", "| d_sae | 16 |",
                 f'SAE.from_pretrained("me/sae", "{HOOK}")'):
        assert fact in card, fact
    # SAELens's Hub loader reads the uploaded layout: the same encoder as ours.
    import sae_lens
    from huggingface_hub.errors import EntryNotFoundError
    from sae_lens.loading import pretrained_sae_loaders as loaders
    from saelab.sae.autoencoder import load_sae

    def download(repo_id, filename, **kwargs):
        if not (folder / filename).is_file():
            raise EntryNotFoundError(filename)
        return str(folder / filename)

    monkeypatch.setattr(loaders, "hf_hub_download", download)
    theirs = sae_lens.SAE.from_pretrained("me/sae", HOOK, device="cpu")
    x = torch.randn(20, D)
    with torch.no_grad():
        torch.testing.assert_close(theirs.encode(x), load_sae(tmp_path / "models/sae").encode(x))
    assert TOKEN not in caplog.text + "".join(capsys.readouterr())


def test_upload_store_exports_and_uploads_the_dataset(tmp_path, monkeypatch, hub_calls, caplog,
                                                      capsys):
    monkeypatch.chdir(tmp_path)
    make_store(tmp_path / "data/activations")
    _write(tmp_path / "models/base.json", TINY)
    _write(tmp_path / "data/corpus/manifest.json", SAMPLE)
    caplog.set_level(logging.DEBUG)
    assert main(["upload-store", "me/acts", "--public"]) == 0
    (_, _, kw, token), (_, repo, up_kw, folder) = hub_calls
    assert kw == {"repo_type": "dataset", "private": False, "exist_ok": True} and token == TOKEN
    assert up_kw["repo_type"] == "dataset" and repo == "me/acts"
    assert _files(folder) == ["README.md", "data-00000-of-00001.arrow", "dataset_info.json",
                              "saelab_export.json", "state.json"]
    card = (folder / "README.md").read_text()
    assert 'load_dataset("me/acts", split="train")' in card and "**Random weights.**" in card
    # the temporary export next to the store is gone
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["activations", "corpus"]
    # The README's two-step form: export once, upload that folder (private by default).
    assert main(["export-store", "--format", "hf", "data/activations-hf"]) == 0
    assert main(["upload-store", "me/acts", "--export", "data/activations-hf"]) == 0
    (_, _, kw, _), (_, _, _, folder2) = hub_calls[2:]
    assert kw["private"] is True
    assert (folder2 / "data-00000-of-00001.arrow").read_bytes() == \
        (folder / "data-00000-of-00001.arrow").read_bytes()
    assert TOKEN not in caplog.text + "".join(capsys.readouterr())


def test_uploads_refuse_without_token_or_with_bad_input(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub.HfApi, "create_repo", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "upload_folder", no_network)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _sae_export(tmp_path)
    make_store(tmp_path / "s")
    assert main(["export-store", "hf", "--store", "s"]) == 0
    assert main(["upload-sae", "me/sae"]) == 2
    assert main(["upload-store", "me/acts", "--export", "hf"]) == 2
    assert capsys.readouterr().err.count("HF_TOKEN is not set") == 2
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert main(["upload-store", "me/acts", "--export", "s"]) == 2
    assert "holds no saelab dataset export" in capsys.readouterr().err
    weights = tmp_path / "models/sae/sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])
    assert main(["upload-sae", "me/sae"]) == 2
    assert "before uploading" in capsys.readouterr().err


def test_card_snapshots():
    info = {"model": LLAMA["name"], "revision": LLAMA["revision"], "layer": 8,
            "hook": "mlp_out", "hook_name": HOOK, "d": 2048, "seq_len": 1024,
            "n_rows": 2048, "n_tokens": 2097152, "store_dtype": "bfloat16",
            "scale": 0.125, "context_len": 1024}
    cfg = {"architecture": "jumprelu", "d_in": 2048, "d_sae": 16384,
           "metadata": {"hook_name": HOOK, "layer": 8, "hook": "mlp_out", "lr": 7e-5,
                        "lr_source": "reports/scaling/fit.json", "training_tokens": 2097152}}
    made = {"dataset_card_llama.md": cards.dataset_card(info, LLAMA, OSCAR, "me/acts"),
            "sae_card_llama.md": cards.sae_card(
                cfg, METRICS, LLAMA, OSCAR, repo_id="me/sae", sae_id=HOOK,
                dataset_repo="me/acts", run={"run_id": "0123abcd", "git_commit": "abc123"})}
    if os.environ.get("SAELAB_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOTS.mkdir(exist_ok=True)
        for name, text in made.items():
            (SNAPSHOTS / name).write_text(text)
        pytest.fail(f"rewrote {sorted(made)}; rerun without SAELAB_UPDATE_SNAPSHOTS")
    for name, text in made.items():
        assert text == (SNAPSHOTS / name).read_text(), f"{name} changed; see the docstring"


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
