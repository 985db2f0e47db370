import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]

# Tests share two cores with each other; one intra-op thread keeps them predictable.
torch.set_num_threads(1)
# Tests must never reach a hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO


@pytest.fixture
def isolated_mlflow(tmp_path, monkeypatch):
    """Point MLflow at a throwaway sqlite db so unit tests never touch the repo's."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    return uri


@pytest.fixture
def gated_repo():
    """gated_repo(url): a stand-in for a Hub call on a gated repo the token cannot read;
    it raises what huggingface_hub raises there (a 403 GatedRepoError for `url`)."""
    import httpx2
    from huggingface_hub.errors import GatedRepoError

    def make(url: str):
        def call(*args, **kwargs):
            raise GatedRepoError("gated", response=httpx2.Response(
                403, request=httpx2.Request("GET", url)))
        return call
    return make
