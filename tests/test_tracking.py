import hashlib
import json
import os
import socket
import subprocess
import sys
import time

import mlflow
import pytest

from saelab.core import tracking
from saelab.core.config import flatten, parse_params, to_dict


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


def _client(uri):
    return mlflow.MlflowClient(tracking_uri=uri)


@pytest.fixture(scope="module")
def _module_store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def shared_mlflow(_module_store, monkeypatch):
    """One throwaway store for the tests below, which find their runs by id: creating a
    sqlite store costs seconds."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _module_store)
    return _module_store


def test_the_experiment_is_a_model_training_one(shared_mlflow, monkeypatch):
    """MLflow 3 opens an experiment without a kind in its GenAI view; an existing store
    made before the kind was set gets it too."""
    monkeypatch.setattr(tracking, "EXPERIMENT", "made-before-the-kind")
    client = _client(shared_mlflow)
    client.create_experiment(tracking.EXPERIMENT)
    exp_id = tracking.setup()
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"


DVC_YAML = """stages:
  train_sae:
    cmd: python stages/train_sae.py
    deps: [data/activations, data/corpus, stages/train_sae.py]
    params: [sae, run.seed]
  other:
    cmd: python other.py
    deps: [data/corpus]
    params:
      - params.yaml: [extract.layer]
"""


def _data(root):
    (root / "data/corpus").mkdir(parents=True)
    (root / "data/corpus/manifest.json").write_text(json.dumps(
        {"source": "sample", "docs": {"train": 9}, "tokens_estimate": {"train": 99}}))
    (root / "data/activations").mkdir(parents=True)
    fp = "ab" * 32
    (root / "data/activations/manifest.json").write_text(json.dumps(
        {"fingerprint": fp, "model": "m", "layer": 8, "hook": "mlp_out", "n_tokens": 64,
         "d": 4, "dtype": "float32"}))
    return fp, hashlib.sha256((root / "data/corpus/manifest.json").read_bytes()).hexdigest()


def test_a_stage_run_logs_its_declared_params_datasets_and_system_metrics(
        shared_mlflow, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    store_fp, corpus_fp = _data(tmp_path)
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.2")
    params = parse_params({"sae": {"d_sae": 96, "lr": None}})
    with tracking.stage_run("train_sae", params) as run:
        time.sleep(1.0)  # a few samples of the machine
    r = _client(shared_mlflow).get_run(run.info.run_id)
    # Only what dvc.yaml declares, and no null: a null lr is logged by train as the lr used.
    assert set(r.data.params) == {k for k, v in flatten(to_dict(params)).items()
                                  if k.startswith("sae.") and v is not None} | {"run.seed"}
    assert "sae.lr" not in r.data.params and r.data.params["sae.d_sae"] == "96"
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} \
        <= set(r.data.metrics)
    inputs = {i.dataset.name: i for i in r.inputs.dataset_inputs}
    assert set(inputs) == {"m layer 8 mlp_out activations", "sample corpus"}
    for name, fp in (("m layer 8 mlp_out activations", store_fp), ("sample corpus", corpus_fp)):
        tags = {t.key: t.value for t in inputs[name].tags}
        assert inputs[name].dataset.digest == fp[:32] and tags["saelab.fingerprint"] == fp
        assert tags["mlflow.data.context"] == "train_sae"
        assert json.loads(inputs[name].dataset.source)["uri"].endswith(
            "data/activations" if "activations" in name else "data/corpus")

    with tracking.stage_run("other", params) as run:  # the long params form; one dataset
        pass
    r = _client(shared_mlflow).get_run(run.info.run_id)
    assert set(r.data.params) == {"extract.layer"}
    assert [i.dataset.name for i in r.inputs.dataset_inputs] == ["sample corpus"]


def test_nested_runs_are_tagged_like_their_stage(shared_mlflow, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-lr")
    params = parse_params({})
    with tracking.stage_run("fit_scaling_laws", params) as stage:
        with tracking.nested_run("pilot", {"lr": 0.01}, tags={"saelab.pilot": "true"}) as pilot:
            pass
    client = _client(shared_mlflow)
    s, p = client.get_run(stage.info.run_id), client.get_run(pilot.info.run_id)
    assert p.data.tags["mlflow.parentRunId"] == stage.info.run_id
    assert p.data.tags["saelab.pilot"] == "true"
    for key in ("dvc.stage", "dvc.exp_name", "dvc.baseline_rev", "git.commit", "profile"):
        assert p.data.tags[key] == s.data.tags[key], key
    assert not any(k.startswith("system/") for k in p.data.metrics)


def test_stages_of_one_run_group_share_one_parent_run(shared_mlflow, monkeypatch):
    params = parse_params({})
    client = _client(shared_mlflow)
    ids = {}
    for group, stage in (("g1", "fetch_model"), ("g1", "train_sae"), ("g2", "train_sae")):
        monkeypatch.setenv("SAELAB_RUN_GROUP", group)
        with tracking.stage_run(stage, params) as run:
            pass
        ids[group, stage] = client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"]
    assert ids["g1", "fetch_model"] == ids["g1", "train_sae"] != ids["g2", "train_sae"]
    parent = client.get_run(ids["g1", "train_sae"])
    assert parent.data.tags[tracking.RUN_GROUP_TAG] == "g1"
    assert "dvc.stage" not in parent.data.tags  # not taken for a stage run (hub share)
    assert parent.info.status == "FINISHED" and not parent.data.params
    # A failed stage leaves its parent FAILED.
    monkeypatch.setenv("SAELAB_RUN_GROUP", "g3")
    with pytest.raises(RuntimeError):
        with tracking.stage_run("train_sae", params) as run:
            raise RuntimeError("boom")
    parent_id = client.get_run(run.info.run_id).data.tags["mlflow.parentRunId"]
    assert client.get_run(parent_id).info.status == "FAILED"


def test_a_dvc_stage_command_finds_the_dvc_process_that_launched_it(monkeypatch):
    """DVC sets DVC_STAGE for its stage commands only: the group is the nearest ancestor
    without it, through any shell (or torchrun) between; here this test's own process."""
    monkeypatch.delenv("SAELAB_RUN_GROUP", raising=False)
    monkeypatch.delenv("DVC_STAGE", raising=False)
    code = "from saelab.core.tracking import run_group; print(run_group())"
    env = {**os.environ, "DVC_STAGE": "train_sae", "DVC_EXP_NAME": "exp-lr"}
    out = subprocess.run(["sh", "-c", f"{sys.executable} -c '{code}'; true"], env=env,
                         capture_output=True, text=True, check=True).stdout.strip()
    host, pid, _, exp = out.replace("|", ":").split(":")
    assert (host, int(pid), exp) == (socket.gethostname(), os.getpid(), "exp-lr")
    # Outside a DVC stage there is no group, so no parent run.
    assert tracking.run_group() is None
