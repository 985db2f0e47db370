"""dvc.yaml against the code: each stage depends on the params its outputs depend on (and
no more, so a sweep reruns only what it changes); local corpus files are dependencies."""
import dataclasses
import shutil
from pathlib import Path

import yaml

from saelab.core.config import SAECfg
from saelab.scaling.laws import PILOT_READS, TRAIN_ONLY

REPO = Path(__file__).resolve().parents[1]


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _declared(stage: str) -> list[str]:
    return [p for p in _stages()[stage].get("params", []) if isinstance(p, str)]


def test_every_declared_param_is_in_params_yaml():
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for stage in _stages():
        for key in _declared(stage):
            node = params
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{stage}: {key}"
                node = node[part]


def test_scaling_depends_on_the_sae_keys_pilots_use_only():
    declared = _declared("fit_scaling_laws")
    assert "sae" not in declared  # a train_sae-only change must not rerun the pilot grid
    used = ({f.name for f in dataclasses.fields(SAECfg)} - set(TRAIN_ONLY)) | set(PILOT_READS)
    assert {k.removeprefix("sae.") for k in declared if k.startswith("sae.")} == used
    assert "sae" in _declared("train_sae")


def test_an_edited_local_corpus_file_makes_fetch_oscar_stale(tmp_path, monkeypatch):
    from dvc.repo import Repo

    monkeypatch.chdir(tmp_path)  # DVC resolves the stage paths from here
    shutil.copy(REPO / "dvc.yaml", tmp_path)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(source="local", local_files="in/*.jsonl", local_dir="in")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    Repo.init(tmp_path, no_scm=True)
    repo = Repo(tmp_path)
    stage = next(s for s in repo.index.stages if s.name == "fetch_oscar")
    deps = [d.def_path for d in stage.deps]
    assert "in" in deps and params["data"]["sample_path"] in deps
    for dep in deps:  # stand-ins: only their hashes matter here
        if dep != "params.yaml":
            (tmp_path / dep).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / dep).write_text("x") if dep != "in" else (tmp_path / dep).mkdir()
    (tmp_path / "in/docs.jsonl").write_text('{"text": "hola"}\n')
    (tmp_path / "data/corpus").mkdir(parents=True)
    (tmp_path / "data/corpus/manifest.json").write_text("{}")
    repo.commit("fetch_oscar", force=True)
    assert repo.status(targets=["fetch_oscar"]) == {}
    (tmp_path / "in/docs.jsonl").write_text('{"text": "adiós"}\n')
    assert repo.status(targets=["fetch_oscar"]) == {
        "fetch_oscar": [{"changed deps": {"in": "modified"}}]}
