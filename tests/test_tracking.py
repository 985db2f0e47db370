import mlflow

from saelab.core import tracking
from saelab.core.config import parse_params


def test_queued_experiment_logs_to_the_users_repo(tmp_path, monkeypatch):
    """`dvc exp run --queue` runs in <repo>/.dvc/tmp/exps/<tmp>; runs must land in <repo>/mlflow.db."""
    repo = tmp_path / "repo"
    work = repo / ".dvc" / "tmp" / "exps" / "tmpabc123"
    work.mkdir(parents=True)
    (work / "dvc.yaml").write_text("stages: {}\n")
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(work))
    assert tracking.repo_root() == repo
    assert tracking.tracking_uri() == f"sqlite:///{repo / 'mlflow.db'}"


def test_env_uri_wins(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:5000")
    assert tracking.tracking_uri() == "http://127.0.0.1:5000"


def test_stage_run_logs_params_and_dvc_tags(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    params = parse_params({"sae": {"d_sae": 96}})
    with tracking.stage_run("train_sae", params) as run:
        tracking.log_metrics({"fvu": 0.25, "nested": {"l0": 3}, "label": "x", "bad": float("nan")}, step=1)
    r = mlflow.get_run(run.info.run_id)
    assert r.data.tags["dvc.stage"] == "train_sae"
    assert r.data.tags["dvc.exp_name"] == "exp-lr"
    assert r.data.tags["dvc.baseline_rev"] == "abc123"
    assert r.data.tags["profile"] == "tiny"
    assert r.data.params["sae.d_sae"] == "96"
    assert r.data.metrics == {"fvu": 0.25, "nested.l0": 3.0}


def test_secrets_are_scrubbed_from_logged_values(isolated_mlflow, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-SECRET-123")
    params = parse_params({"interpret": {"base_url": "http://h/?key=sk-test-SECRET-123"}})
    with tracking.stage_run("interpret", params) as run:
        pass
    r = mlflow.get_run(run.info.run_id)
    assert "sk-test-SECRET-123" not in r.data.params["interpret.base_url"]
    assert "<OPENAI_API_KEY>" in r.data.params["interpret.base_url"]
