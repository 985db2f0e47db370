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
