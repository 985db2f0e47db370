"""Secrets: interpret with backend=openai, both secrets set to known strings, the default
MLflow location (the workspace's mlflow.db and mlartifacts/): neither string is written
anywhere the run leaves files."""
from __future__ import annotations

from .conftest import INTERPRET_INPUTS
from .harness import without

SECRETS = {"OPENAI_API_KEY": "sk-faultsSecretKey0123456789", "HF_TOKEN": "hf_faultsSecretToken0123456789"}
PLACES = ("mlartifacts", "reports", ".cache", ".saelab", "logs", "models", "data")


def test_secrets_are_written_nowhere(base, trained, openai_server, stage_env, tmp_path):
    env = {**without(stage_env, ["MLFLOW_TRACKING_URI"]), **SECRETS}
    ws = base.clone(tmp_path / "ws", *INTERPRET_INPUTS[:3], env=env)
    ws.link(trained, "models/sae")
    ws.run("interpret").ok()
    assert f"Bearer {SECRETS['OPENAI_API_KEY']}" in openai_server.auth  # the key was used
    assert (ws.root / "mlartifacts").is_dir() and (ws.root / "reports/interpret").is_dir()
    assert any((ws.root / ".cache/interpret").rglob("*.json"))

    files = [p for place in PLACES for p in sorted((ws.root / place).rglob("*"))
             if p.is_file()] + sorted(ws.root.glob("mlflow.db*"))
    assert len(files) > 20
    for path in files:
        blob = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in blob, f"{name} leaked into {path}"
