"""Sharing on the Hugging Face Hub: the SAE as a model repo, the activations as a dataset.

`upload_sae` lays the export out as SAELens's `SAE.from_pretrained(repo, sae_id)` reads it
from a Hub repo (`<sae_id>/cfg.json`, `<sae_id>/sae_weights.safetensors`; SAELens's
`sae_lens_huggingface_loader`), with a model card at the root. `upload_store` pushes the
`datasets` export of the store (hub.hf_dataset) with its dataset card.

Both go through `HfApi.upload_folder`: with hf_xet installed (it is in requirements.lock)
it is huggingface_hub 2.x's resumable path for large folders, batched into several
commits, skipping what an interrupted call already committed (2.x folded the former
`upload_large_folder` into it). Repos are private unless asked otherwise. The token
(core.hub_access) comes only from `HF_TOKEN` in the environment and is never logged.
"""
from __future__ import annotations

import importlib.util
import logging
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..core import paths, tracking
from ..core.errors import SaelabError
from ..core.hub_access import hub_errors, hub_token
from .cards import sae_card
from .hf_dataset import CARD, read_export, read_json, write_card

log = logging.getLogger(__name__)

SAE_FILES = ("cfg.json", "sae_weights.safetensors")
TRAIN_STAGE = "train_sae"


def _token(repo_id: str) -> str:
    return hub_token(f"uploading to {repo_id}", "export HF_TOKEN=... (a token with write "
                     "access)")


def _upload_folder(folder: Path, repo_id: str, repo_type: str, *, token: str, private: bool,
                   message: str) -> str:
    from huggingface_hub import HfApi, constants

    if importlib.util.find_spec("hf_xet") is None or constants.HF_HUB_DISABLE_XET:
        log.warning("hf_xet is not installed: the upload goes in one commit and cannot "
                    "resume; `pip install hf_xet` for the resumable path")
    api = HfApi(token=token)
    with hub_errors(repo_id, "the repo id"):
        api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True)
        info = api.upload_folder(repo_id=repo_id, folder_path=str(folder),
                                 repo_type=repo_type, commit_message=message)
    prefix = "datasets/" if repo_type == "dataset" else ""
    url = getattr(info, "commit_url", None) or f"https://huggingface.co/{prefix}{repo_id}"
    log.info("uploaded %s to %s (%s)", folder, url, "private" if private else "public")
    return url


def upload_store(export_dir: Path | str, repo_id: str, *, private: bool = True,
                 model_json: Path | str = paths.MODEL_JSON,
                 corpus_manifest: Path | str = paths.CORPUS_DIR / "manifest.json") -> str:
    """Push a `saelab export-store --format hf` folder to a dataset repo; return its URL.

    The card is rewritten first so that its usage snippets name `repo_id`.
    """
    export_dir = Path(export_dir)
    read_export(export_dir)
    token = _token(repo_id)
    write_card(export_dir, repo_id=repo_id, model_json=model_json,
               corpus_manifest=corpus_manifest)
    return _upload_folder(export_dir, repo_id, "dataset", token=token, private=private,
                          message="saelab activations (SAELens cached-activations layout)")


def training_run(metrics: dict[str, Any]) -> dict[str, str | None]:
    """MLflow run id and git commit of the train_sae run whose final metrics these are.

    The newest finished train_sae run whose logged `final.fvu` and `final.l0` equal
    reports/train/metrics.json's: a later run of another experiment is not taken for it.
    Nothing found (tracking off, no database, no match): both None.
    """
    none: dict[str, str | None] = {"run_id": None, "git_commit": None}
    if not tracking.enabled() or not all(isinstance(metrics.get(k), (int, float))
                                         for k in ("fvu", "l0")):
        return none
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    experiment = mlflow.get_experiment_by_name(tracking.EXPERIMENT)
    if experiment is None:
        return none
    runs = mlflow.search_runs([experiment.experiment_id], output_format="list",
                              filter_string=f"tags.`dvc.stage` = '{TRAIN_STAGE}' and "
                                            "attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    for run in runs:
        logged = run.data.metrics
        if all(k in logged and math.isclose(logged[k], metrics[v], rel_tol=1e-9)
               for k, v in (("final.fvu", "fvu"), ("final.l0", "l0"))):
            return {"run_id": run.info.run_id, "git_commit": run.data.tags.get("git.commit")}
    return none


def upload_sae(sae_dir: Path | str, repo_id: str, *, private: bool = True,
               sae_id: str | None = None, dataset_repo: str | None = None,
               run_id: str | None = None,
               metrics_json: Path | str = paths.TRAIN_METRICS,
               model_json: Path | str = paths.MODEL_JSON,
               corpus_manifest: Path | str = paths.CORPUS_DIR / "manifest.json") -> str:
    """Push the SAE export (checked by the caller) and its model card; return the URL.

    `sae_id` (the folder in the repo, SAELens's second `from_pretrained` argument) defaults
    to the hook name, as SAELens's own releases name theirs.
    """
    sae_dir = Path(sae_dir)
    cfg = read_json(sae_dir / SAE_FILES[0])
    if not cfg or not (sae_dir / SAE_FILES[1]).is_file():
        raise SaelabError(f"{sae_dir} holds no exported SAE ({' + '.join(SAE_FILES)}); run "
                          "`dvc repro train_sae` first")
    token = _token(repo_id)
    sae_id = sae_id or cfg.get("metadata", {}).get("hook_name") or "sae"
    if sae_id.startswith("/") or ".." in Path(sae_id).parts:
        raise SaelabError(f"--sae-id {sae_id!r} must be a relative folder name")
    metrics = read_json(Path(metrics_json))
    if not metrics:
        log.warning("%s is missing: the model card will say the metrics were not measured",
                    metrics_json)
    run = training_run(metrics)
    if run_id:
        run = {"run_id": run_id, "git_commit": run["git_commit"]
               if run["run_id"] == run_id else None}
    card = sae_card(cfg, metrics, read_json(Path(model_json)), read_json(Path(corpus_manifest)),
                    repo_id=repo_id, sae_id=sae_id, dataset_repo=dataset_repo, run=run)
    with tempfile.TemporaryDirectory(prefix="saelab-sae-") as tmp:
        folder = Path(tmp)
        (folder / CARD).write_text(card, encoding="utf-8")
        (folder / sae_id).mkdir(parents=True)
        for name in SAE_FILES:
            shutil.copyfile(sae_dir / name, folder / sae_id / name)
        return _upload_folder(folder, repo_id, "model", token=token, private=private,
                              message=f"saelab SAE {sae_id}")
