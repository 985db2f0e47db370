"""Secrets: interpret with backend=openai, both secrets set to known strings, the default
MLflow location (the workspace's mlflow.db and mlartifacts/), one run that succeeds and one
the API refuses: neither string is written anywhere the runs leave files."""
from __future__ import annotations

from .conftest import interpret_workspace
from .harness import without

SECRETS = {"OPENAI_API_KEY": "sk-faultsSecretKey0123456789",
           "HF_TOKEN": "hf_faultsSecretToken0123456789"}
PLACES = ("mlartifacts", "reports", ".cache", ".saelab", "logs", "models", "data")


def test_secrets_are_written_nowhere(base, trained, openai_server, stage_env, tmp_path):
    env = {**without(stage_env, ["MLFLOW_TRACKING_URI"]), **SECRETS}
    ws = interpret_workspace(base, trained, tmp_path / "ws", env=env)
    ws.run("interpret").ok()
    assert f"Bearer {SECRETS['OPENAI_API_KEY']}" in openai_server.auth  # the key was used
    assert (ws.root / "mlartifacts").is_dir() and (ws.root / "reports/interpret").is_dir()
    assert any((ws.root / ".cache/interpret").rglob("*.json"))
    # And a run the API refuses (401): its error line must not carry the key either.
    ws.update_params(interpret={"cache_dir": ".cache/refused"})
    openai_server.inject = lambda body, attempt: 401
    try:
        refused = ws.run("interpret")
    finally:
        openai_server.inject = lambda body, attempt: None
    assert refused.status == 2 and "refused the key in OPENAI_API_KEY" in refused.stderr

    files = [p for place in PLACES for p in sorted((ws.root / place).rglob("*"))
             if p.is_file()] + sorted(ws.root.glob("mlflow.db*"))
    assert len(files) > 20
    for path in files:
        blob = path.read_bytes()
        for name, secret in SECRETS.items():
            assert secret.encode() not in blob, f"{name} leaked into {path}"
