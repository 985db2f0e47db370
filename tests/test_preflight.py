"""The override rule and the preconditions every stage checks, for itself and the stages
after it, before any work (saelab.preflight, called first by stages/*.py)."""
import dataclasses
import logging
import shutil
from pathlib import Path

import pytest
import yaml

from saelab import preflight
from saelab.core.config import load_params
from saelab.core.errors import SaelabError

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """conf/ and the params.yaml composed from it, as in a fresh clone."""
    shutil.copytree(REPO / "conf", tmp_path / "conf")
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    return tmp_path


def _set(path: Path, section: str, **values) -> None:
    raw = yaml.safe_load(path.read_text())
    raw[section].update(values)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))


def test_params_in_step_with_conf_pass(workspace):
    assert preflight.check_overrides(workspace / "params.yaml", workspace) == []


def test_an_override_left_in_params_yaml_stops_repro(workspace):
    # What a workspace `dvc exp run -S sae.lr=...` leaves behind: the next `dvc repro`
    # must not quietly train at that lr.
    _set(workspace / "params.yaml", "sae", lr=1.0e-4)
    with pytest.raises(SaelabError, match=r"sae\.lr \(params\.yaml: 0\.0001, conf/: None\).*"
                                          r"saelab params"):
        preflight.check_overrides(workspace / "params.yaml", workspace)


def test_inside_an_experiment_overrides_are_named(workspace, monkeypatch):
    monkeypatch.setenv("DVC_EXP_NAME", "exp-1")
    _set(workspace / "params.yaml", "sae", lr=1.0e-4)
    assert preflight.check_overrides(workspace / "params.yaml", workspace) == ["sae.lr=0.0001"]


def test_an_earlier_override_not_repeated_is_named(workspace, monkeypatch, caplog):
    # The previous workspace experiment ran at sae.lr=1e-4 (dvc.lock); this one was
    # recomposed from conf/ with another -S only, so sae.lr is back to conf/'s null.
    monkeypatch.setenv("DVC_EXP_NAME", "exp-2")
    _set(workspace / "params.yaml", "sae", d_sae=1024)
    # adam_eps as dvc.lock has it: `1e-08`, which YAML 1.1 reads as a string.
    sae = dict(yaml.safe_load((workspace / "params.yaml").read_text())["sae"], lr=1.0e-4,
               d_sae=512, adam_eps="1e-08")
    (workspace / "dvc.lock").write_text(yaml.safe_dump({"schema": "2.0", "stages": {
        "train_sae": {"params": {"params.yaml": {"sae": sae, "run.seed": 0}}}}}))
    with caplog.at_level(logging.WARNING):
        assert preflight.check_overrides(workspace / "params.yaml", workspace) == ["sae.d_sae=1024"]
    dropped = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(dropped) == 1 and "sae.lr=0.0001" in dropped[0] and "d_sae" not in dropped[0]


def _params(**sections):
    p = load_params(REPO / "params.yaml")
    return dataclasses.replace(p, **{k: dataclasses.replace(getattr(p, k), **v)
                                     for k, v in sections.items()})


def test_missing_openai_key_stops_the_first_stage(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    params = _params(interpret={"backend": "openai"})
    for stage in preflight.STAGES:
        with pytest.raises(SaelabError, match="OPENAI_API_KEY"):
            preflight.preconditions(params, stage)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    preflight.preconditions(params, "fetch_model")


def test_missing_hub_token_stops_the_stages_before_fetch_model_only(monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub = _params(model={"source": "hub"})
    with pytest.raises(SaelabError, match="HF_TOKEN is not set"):
        preflight.preconditions(hub, "fetch_model")
    preflight.preconditions(hub, "fetch_oscar")  # the model is fetched already
    oscar = _params(data={"source": "oscar"})
    with pytest.raises(SaelabError, match="HF_TOKEN is not set.*accepted the terms"):
        preflight.preconditions(oscar, "fetch_model")
    preflight.preconditions(oscar, "extract_mlp8")


def test_too_little_disk_for_the_store_stops_the_stages_before_it(monkeypatch, tmp_path):
    import saelab.activations.store as store

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(store.shutil, "disk_usage", lambda p: usage._replace(free=1000))
    params = _params()
    for stage in ("fetch_model", "fetch_oscar"):
        with pytest.raises(SaelabError, match="activation store needs about"):
            preflight.preconditions(params, stage, tmp_path)
    preflight.preconditions(params, "fit_scaling_laws", tmp_path)


def test_every_stage_entry_point_checks_first():
    for stage in preflight.STAGES:
        code = (REPO / "stages" / f"{stage}.py").read_text()
        main = code[code.index('if __name__ == "__main__":'):]
        assert main.splitlines()[1].strip() == f'preflight.main("{stage}")', stage


def test_a_failed_check_exits_2_before_the_stage(tmp_path, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["interpret"]["backend"] = "openai"
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    with pytest.raises(SystemExit) as stop:
        preflight.main("fetch_model")
    assert stop.value.code == 2
    assert "fetch_model failed: interpret needs an API key" in caplog.text
