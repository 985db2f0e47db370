"""The whole pipeline as a user runs it: a fresh git repo, `dvc repro` on the tiny profile,
then a `dvc exp run --queue` sweep; and `dvc exp run -S profile=smollm2-135m` on the real
model at small token counts. Slow (minutes); part of `make test`."""
import json
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Known fake secrets: the pipeline runs with them set and must never write them anywhere.
SECRETS = {"HF_TOKEN": "hf_e2eSecretToken0123456789", "OPENAI_API_KEY": "sk-e2eSecretKey0123456789"}
STAGES = ["fetch_model", "fetch_oscar", "extract_mlp8", "fit_scaling_laws", "train_sae", "interpret"]
pytestmark = pytest.mark.slow


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DVC_ROOT")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", DVC_NO_ANALYTICS="true", GIT_AUTHOR_NAME="t",
               GIT_AUTHOR_EMAIL="t@example.com", GIT_COMMITTER_NAME="t",
               GIT_COMMITTER_EMAIL="t@example.com", **SECRETS)
    return env


def sh(cmd: list[str], cwd: Path, timeout: int = 900) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{' '.join(cmd)} failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}"
    return out


def _repo_copy(dst: Path) -> Path:
    """A copy of the working tree (tracked + untracked, not ignored) in a new git repo."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                           cwd=REPO, capture_output=True, text=True, check=True).stdout.split("\0")
    for rel in filter(None, files):
        src = REPO / rel
        if src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)
    sh(["git", "init", "-q", "-b", "main"], dst)
    sh(["git", "add", "-A"], dst)
    sh(["git", "commit", "-qm", "init"], dst)
    return dst


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory) -> Path:
    """The tiny profile in a fresh copy, as `make run` leaves it: reproduced, then committed
    as the baseline experiments start from (tests/test_baseline.py checks the recipe)."""
    dst = _repo_copy(tmp_path_factory.mktemp("e2e") / "repo")
    out = sh(["dvc", "repro"], dst)
    (dst / "repro.log").write_text(out.stdout + out.stderr)
    sh(["saelab", "baseline"], dst)
    return dst


def test_every_output_exists(pipeline):
    for rel in ["models/base/config.json", "models/base.json", "data/corpus/manifest.json",
                "data/activations/manifest.json", "reports/scaling/fit.json", "reports/budget.json",
                "reports/budget.md", "reports/scaling/loss_vs_size.png", "models/sae/cfg.json",
                "models/sae/sae_weights.safetensors", "reports/train/metrics.json",
                "reports/train/curves.csv", "reports/train/density.png",
                "reports/train/density.csv", "reports/interpret/index.html",
                "reports/interpret/requests.jsonl", "reports/interpret_metrics.json"]:
        assert (pipeline / rel).exists(), rel


def test_outputs_are_consistent(pipeline):
    act = json.loads((pipeline / "data/activations/manifest.json").read_text())
    assert act["layer"] == 8 and act["hook"] == "mlp_out" and act["d"] == 64
    assert act["n_tokens"] >= 262144
    fit = json.loads((pipeline / "reports/scaling/fit.json").read_text())
    assert fit["recommended"]["lr"] > 0
    cfg = json.loads((pipeline / "models/sae/cfg.json").read_text())
    assert cfg["d_in"] == 64 and cfg["d_sae"] == 512
    metrics = json.loads((pipeline / "reports/train/metrics.json").read_text())
    assert 0.0 <= metrics["fvu"] < 1.0 and metrics["l0"] > 0
    budget = json.loads((pipeline / "reports/budget.json").read_text())
    assert budget["tokens"] == pytest.approx(2.1e9)


def _keys(obj) -> set[str]:
    if isinstance(obj, dict):
        return set(obj) | {k for v in obj.values() for k in _keys(v)}
    return {k for v in obj for k in _keys(v)} if isinstance(obj, list) else set()


def test_tracked_outputs_hold_no_timings(pipeline):
    # DVC tracks these: a wall-clock figure in one would make every rerun (or a resumed
    # extraction) look like new data to the stages after it. Timings go to MLflow.
    timings = {"tokens_per_s", "elapsed_s", "seconds"}
    for rel in ["data/activations/manifest.json", "reports/scaling/fit.json",
                "reports/budget.json", "reports/train/metrics.json",
                "reports/interpret_metrics.json"]:
        assert not _keys(json.loads((pipeline / rel).read_text())) & timings, rel
    header = (pipeline / "reports/scaling/pilots.csv").read_text().splitlines()[0].split(",")
    assert not set(header) & timings
    db = sqlite3.connect(pipeline / "mlflow.db")
    logged = {k for (k,) in db.execute("select distinct key from metrics")}
    assert {"extract.tokens_per_s", "extract.seconds", "tokens_per_s", "seconds"} <= logged


def test_pipeline_is_up_to_date_and_committed_after_make_run(pipeline):
    out = sh(["dvc", "status", "--json"], pipeline).stdout
    assert json.loads(out) == {}, out
    # The baseline commit holds dvc.lock and every output DVC leaves to git.
    assert sh(["git", "status", "--porcelain", "--untracked-files=no"], pipeline).stdout == ""
    committed = sh(["git", "ls-files"], pipeline).stdout.split()
    assert {"dvc.lock", "reports/metrics/train.json", "reports/train/curves.csv",
            "reports/scaling/fit.json"} <= set(committed)


def test_mlflow_has_a_run_per_stage(pipeline):
    db = sqlite3.connect(pipeline / "mlflow.db")
    tagged = {v for (v,) in db.execute("select value from tags where key = 'dvc.stage'")}
    assert set(STAGES) <= tagged
    # The pilot grid of the scaling stage is nested under its stage run.
    nested = db.execute("select count(*) from tags where key = 'mlflow.parentRunId'").fetchone()[0]
    assert nested >= 15


def _readme_sweep_commands() -> list[str]:
    """The command block of the README's Sweeps section, one command per line."""
    readme = (REPO / "README.md").read_text()
    section = readme[readme.index("\n## Sweeps\n"):]
    start = section.index("```bash\n") + len("```bash\n")
    block = section[start:section.index("```", start)]
    return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip()]


def _experiments(pipeline: Path) -> dict[str, dict]:
    """Each experiment's name -> its params.yaml."""
    exps = {}
    for baseline in json.loads(sh(["dvc", "exp", "show", "--json"], pipeline).stdout):
        for exp in baseline.get("experiments") or []:
            for rev in exp.get("revs", []):
                data = rev.get("data") or {}
                if rev.get("name"):
                    exps[rev["name"]] = data["params"]["params.yaml"]["data"]
    return exps


def test_readme_sweep_reuses_the_store_and_reruns_only_what_changed(pipeline):
    commands = _readme_sweep_commands()
    assert any("--run-all" in c for c in commands) and any("exp show" in c for c in commands)
    for command in commands:
        sh(["bash", "-c", command], pipeline)

    exps = _experiments(pipeline)
    lr_exps = {n for n, p in exps.items() if p["sae"]["lr"] is not None}
    topk = {n for n, p in exps.items() if p["sae"]["architecture"] == "topk"}
    assert {exps[n]["sae"]["lr"] for n in lr_exps} == {1e-3, 3e-3} and len(topk) == 1
    # Extraction ran once, for the baseline (make run); the pilot grid again only for the
    # experiment that changed a key the pilots use (the architecture); training for each.
    baseline = (pipeline / "repro.log").read_text()
    for name in exps:
        log = sh(["dvc", "queue", "logs", name], pipeline).stdout
        for stage in ("fetch_model", "fetch_oscar", "extract_mlp8"):
            assert f"Running stage '{stage}'" in baseline
            assert f"Stage '{stage}' didn't change, skipping" in log, (name, log[-3000:])
        fit = "Running stage 'fit_scaling_laws'" if name in topk else \
            "Stage 'fit_scaling_laws' didn't change, skipping"
        assert fit in log and "Running stage 'train_sae'" in log, (name, log[-3000:])

    # The README's table: the quantities the issue asks for, one column each, numbers only,
    # and narrow enough for a terminal (a table wider than the terminal gets squeezed).
    show = next(c for c in commands if "exp show" in c)
    table = sh(["bash", "-c", f"{show} --csv"], pipeline).stdout.splitlines()
    header = table[0].split(",")
    assert {h.split(":")[-1] for h in header} == {
        "Experiment", "sae.d_sae", "lr", "l0", "fvu", "dead_fraction", "delta_lm_loss",
        "lm_metrics_meaningful"}, header
    assert len(table) == 1 + 2 + len(exps), table  # the workspace, main, the experiments
    wide = subprocess.run(["bash", "-c", show], cwd=pipeline, env={**_env(), "COLUMNS": "400"},
                          capture_output=True, text=True, timeout=300).stdout
    assert max(len(line.rstrip()) for line in wide.splitlines()) <= 140, wide
    plots = next(c for c in commands if "plots" in c)
    page = (pipeline / "dvc_plots" / "index.html").read_text()
    assert all(name in page for name in exps), plots


def test_mlflow_layout_read_back(pipeline):
    """What `mlflow ui` shows (README "MLflow"), after the repro and the queued sweep: a
    model-training experiment, one parent run per DVC invocation with its stage runs
    nested, stage-scoped params, the lr used as a number, system metrics, the corpus and
    store as dataset inputs, pilots nested in and tagged like their stage."""
    import mlflow
    import yaml

    client = mlflow.MlflowClient(f"sqlite:///{pipeline / 'mlflow.db'}")
    exp = client.get_experiment_by_name("saelab")
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    runs = client.search_runs([exp.experiment_id], max_results=10000)
    parents = [r for r in runs if "saelab.run_group" in r.data.tags]
    pilots = [r for r in runs if r.data.tags.get("saelab.pilot") == "true"]
    stages = [r for r in runs if "dvc.stage" in r.data.tags and r not in pilots]
    assert len(parents) + len(pilots) + len(stages) == len(runs)
    for r in runs:  # no name is both a param and a metric (the compare view's axes)
        assert not set(r.data.params) & set(r.data.metrics), (r.info.run_name, r.data.params)

    # One parent per DVC invocation; each stage run it made is nested under it, once.
    kids = {p.info.run_id: [s for s in stages if s.data.tags["mlflow.parentRunId"] == p.info.run_id]
            for p in parents}
    assert all(s.data.tags.get("mlflow.parentRunId") in kids for s in stages)
    for p in parents:
        names = [s.data.tags["dvc.stage"] for s in kids[p.info.run_id]]
        assert names and len(set(names)) == len(names), (p.info.run_name, names)
        assert {s.data.tags["dvc.exp_name"] for s in kids[p.info.run_id]} == {p.data.tags["dvc.exp_name"]}
        assert p.info.status == "FINISHED" and "dvc.stage" not in p.data.tags
    first = min(parents, key=lambda p: p.info.start_time)  # `dvc repro`
    assert first.data.tags["dvc.exp_name"] == "" and first.info.run_name.startswith("repro ")
    assert sorted(s.data.tags["dvc.stage"] for s in kids[first.info.run_id]) == sorted(STAGES)
    queued = [p for p in parents if p.data.tags["dvc.exp_name"]]
    assert len({p.data.tags["dvc.exp_name"] for p in queued}) == len(queued) >= 2
    assert {p.info.run_name for p in queued} == {p.data.tags["dvc.exp_name"] for p in queued}

    dvc = yaml.safe_load((pipeline / "dvc.yaml").read_text())["stages"]
    store = json.loads((pipeline / "data/activations/manifest.json").read_text())
    fit = json.loads((pipeline / "reports/scaling/fit.json").read_text())
    for s in stages:
        stage = s.data.tags["dvc.stage"]
        # Only the params dvc.yaml declares (train_sae adds the values it resolved).
        declared = dvc[stage]["params"]
        for key in s.data.params:
            assert any(key == d or key.startswith(d + ".") for d in declared) or \
                (stage == "train_sae" and key.startswith("train.")), (stage, key)
        assert "None" not in s.data.params.values(), stage
        inputs = {i.dataset.name: i.dataset.digest for i in s.inputs.dataset_inputs}
        if "data/activations" in dvc[stage]["deps"]:
            assert inputs[f"{store['model']} layer 8 mlp_out activations"] == store["fingerprint"][:32]
        if "data/corpus" in dvc[stage]["deps"]:
            assert any(n.endswith(" corpus") for n in inputs), (stage, inputs)
        if s.info.end_time - s.info.start_time > 12_000:  # > 2 sampling intervals
            assert {"system/cpu_utilization_percentage",
                    "system/system_memory_usage_megabytes"} <= set(s.data.metrics), stage
    # The README's search for the compare view.
    train = client.search_runs([exp.experiment_id], filter_string="tags.dvc.stage = 'train_sae'")
    assert {s.info.run_id for s in train} == \
        {s.info.run_id for s in stages if s.data.tags["dvc.stage"] == "train_sae"}
    assert all(float(s.data.params["sae.lr"]) > 0 for s in train)
    # The repro left sae.lr null: its run logs the fitted lr it trained at.
    (repro_train,) = [s for s in kids[first.info.run_id] if s.data.tags["dvc.stage"] == "train_sae"]
    assert float(repro_train.data.params["sae.lr"]) == pytest.approx(fit["recommended"]["lr"])
    assert repro_train.data.tags["train.lr_source"] != "params.sae.lr"
    assert any(k.startswith("system/") for k in repro_train.data.metrics)

    fits = {s.info.run_id: s for s in stages if s.data.tags["dvc.stage"] == "fit_scaling_laws"}
    assert pilots
    for p in pilots:
        stage_run = fits[p.data.tags["mlflow.parentRunId"]]
        for key in ("dvc.stage", "dvc.exp_name", "dvc.baseline_rev", "git.commit", "profile"):
            assert p.data.tags[key] == stage_run.data.tags[key], key


def test_secrets_never_written(pipeline):
    places = [pipeline / "mlflow.db", pipeline / "dvc.lock", pipeline / "repro.log",
              *(pipeline / "reports").rglob("*"), *(pipeline / "mlartifacts").rglob("*"),
              *(pipeline / "models").rglob("*.json")]
    for path in places:
        if path.is_file():
            blob = path.read_bytes()
            for name, secret in SECRETS.items():
                assert secret.encode() not in blob, f"{name} leaked into {path}"


# The real model at small token counts: minutes on two cores, every number from a real LM.
REAL_SMALL = ["profile=smollm2-135m", "extract.n_tokens=16384", "extract.shard_tokens=8192",
              "sae.d_sae=1152", "sae.n_tokens=32768", "sae.lr_warmup_steps=5",
              "sae.l0_warmup_steps=10", "sae.eval_tokens=1024", "scaling.n_tokens=4096",
              "scaling.d_sae_grid=[288,576,1152,2304]", "scaling.lr_grid=[3.0e-3,1.0e-2,3.0e-2]",
              "scaling.tokens_grid=[2048]", "scaling.batch_size=256", "scaling.seeds=1",
              "interpret.n_latents=4"]


@pytest.fixture(scope="module")
def real_pipeline(tmp_path_factory) -> Path:
    dst = _repo_copy(tmp_path_factory.mktemp("e2e_real") / "repo")
    sh(["dvc", "exp", "run", *(a for o in REAL_SMALL for a in ("-S", o))], dst, timeout=1800)
    return dst


def test_real_model_pipeline_measures_a_language_model(real_pipeline):
    base = json.loads((real_pipeline / "models/base.json").read_text())
    assert base["source"] == "gguf" and len(base["sha256"]) == 64
    assert base["config"]["num_hidden_layers"] == 30 and base["config"]["vocab_size"] == 49152
    act = json.loads((real_pipeline / "data/activations/manifest.json").read_text())
    assert act["layer"] == 15 and act["d"] == 576 and act["n_tokens"] == 16384
    m = json.loads((real_pipeline / "reports/train/metrics.json").read_text())
    # A pretrained LM: clean CE far below uniform guessing (ln 49152 = 10.8 nats), and
    # zero-ablating its middle MLP costs real loss (a random model moves by ~5e-4).
    assert m["lm_metrics_meaningful"] is True
    assert m["ce_clean"] < 0.6 * math.log(49152)
    assert m["ce_zero_ablation"] - m["ce_clean"] > 0.02
    lo, hi = m["delta_lm_loss_ci95"]
    assert lo <= m["delta_lm_loss"] <= hi
    assert 0 < m["fvu"] < 1 and m["l0"] > 0
    assert (real_pipeline / "reports/interpret/index.html").is_file()


def test_a_missing_api_key_stops_the_first_stage_in_seconds(tmp_path):
    # The case: `-S interpret.backend=openai` without a key used to train for
    # minutes before interpret said so. Now fetch_model, the first stage, refuses.
    dst = _repo_copy(tmp_path / "repo")
    env = {k: v for k, v in _env().items() if k != "OPENAI_API_KEY"}
    out = subprocess.run(["dvc", "exp", "run", "-S", "interpret.backend=openai"], cwd=dst,
                         env=env, capture_output=True, text=True, timeout=600)
    text = out.stdout + out.stderr
    assert out.returncode != 0, text[-3000:]
    assert "fetch_model failed: interpret needs an API key in the OPENAI_API_KEY" in text, text[-3000:]
    assert "Running stage 'fetch_oscar'" not in text
    assert not (dst / "models/base/config.json").exists()
