"""bench/gpu.py, the one-call GPU suite, rehearsed on CPU so it cannot rot between GPU runs."""
import functools
import importlib.util
import json
import subprocess
import sys
import time

import pytest

from saelab.core import tracking
from saelab.scaling.budget import budget_cli, measured_rates
from saelab.cli import compose_params
from saelab.core.config import load_params, to_dict
from saelab.core.errors import SaelabError

from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

GPU_PY = REPO / "bench" / "gpu.py"
STEPS = ["extract", "exactness", "train", "stream", "stream_budget", "extract_ranks",
         "torchrun", "projection"]


@functools.cache
def _gpu_module():
    spec = importlib.util.spec_from_file_location("bench_gpu", GPU_PY)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """The README's rehearsal command, run once: (process, results.json, RESULTS.md)."""
    out = tmp_path_factory.mktemp("gpu")
    proc = subprocess.run([sys.executable, str(GPU_PY), "--dry-run", "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=600)
    results = json.loads((out / "results.json").read_text())
    return proc, results, (out / "RESULTS.md").read_text()


def test_dry_run_runs_every_step(dry_run):
    proc, results, md = dry_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert list(results["steps"]) == STEPS
    failed = {k: v.get("error") for k, v in results["steps"].items() if v["status"] != "ok"}
    assert not failed, failed
    assert results["machine"]["dry_run"] is True
    # Wall time is a bench figure, not a timed test: every step records its own seconds
    # (and the time boxes bound each one).
    assert all(v["seconds"] > 0 for v in results["steps"].values())
    assert md.startswith("# bench/gpu.py results: CPU dry run")
    for heading in ("## 1. Extraction", "## 2. Exactness", "## 3. SAE training",
                    "## 4. Streaming", "## 4b. Streaming at the budget's settings",
                    "## 4c. Extraction over several ranks", "## 5. torchrun smoke",
                    "## 6. Projected wall time"):
        assert heading in md


def test_dry_run_figures_are_measured(dry_run):
    steps = dry_run[1]["steps"]
    e = steps["extract"]["figures"]
    for key in ("tokenizer_tok_s", "producer_tok_s", "store_tok_s", "seed_tok_s"):
        assert e[key] > 0, key
    assert e["store_vs_seed"] == pytest.approx(e["store_tok_s"] / e["seed_tok_s"])
    # A GPU roofline share means nothing on a CPU: it is not reported there.
    assert e["producer_roofline_pct"] is None and e["roofline_tok_s"] is None

    # The store read back lines up with an independent fp32 forward of the same rows: only
    # bf16 noise separates them (a misaligned row or position would give errors near 1).
    x = steps["exactness"]["figures"]
    assert x["vectors"] > 0
    assert x["relative_error"] < 0.05 and x["min_cosine"] > 0.99
    assert x["relative_error"] >= x["bf16_rounding_floor"] > 0

    t = steps["train"]["figures"]
    for arch in ("jumprelu", "topk", "batchtopk", "plain_jumprelu"):
        assert t[arch]["tok_s"] > 0, arch
    assert t["jumprelu_vs_plain"] == pytest.approx(
        t["jumprelu"]["tok_s"] / t["plain_jumprelu"]["tok_s"])
    assert steps["stream"]["figures"]["tok_s"] > 0
    sb = steps["stream_budget"]["figures"]
    assert sb["tok_s"] > 0 and sb["lanes"] == 2
    assert sb["budget_hours"] == pytest.approx(sb["budget_tokens"] / sb["tok_s"] / 3600)
    assert sb["plan_gpu"] is None  # a CPU matches no planned GPU: no ratio is claimed
    # Two gloo ranks write the store that one process writes, byte for byte.
    xr = steps["extract_ranks"]["figures"]
    assert xr["ranks"] == 2 and xr["same_bytes"] is True
    assert [line.split(" in ")[0] for line in xr["per_rank"]] == [
        "stored 2048 tokens (rank 0 of 2)", "stored 2048 tokens (rank 1 of 2)"]


def test_dry_run_trains_the_stage_under_torchrun(dry_run):
    r = dry_run[1]["steps"]["torchrun"]["figures"]
    assert r["backend"] == "gloo" and r["world_size"] == 1  # nccl on a GPU
    assert {"cfg.json", "sae_weights.safetensors"} <= set(r["exported"])
    assert r["steps"] == 60 and 0 < r["fvu"] < 1
    assert r["tok_s"] > 0  # read off the stage's log: metrics.json holds no timings


def test_projection_uses_the_measured_rates(dry_run):
    steps = dry_run[1]["steps"]
    p = steps["projection"]["figures"]
    stream = steps["stream"]["figures"]["tok_s"]
    key = "streaming, model -> SAE in one process (measured)"
    assert p["measured_tokens_per_s"][key] == stream
    at_budget = "streaming at the budget's settings, production path (measured)"
    assert p["measured_tokens_per_s"][at_budget] == steps["stream_budget"]["figures"]["tok_s"]
    assert p["hours"][key] == pytest.approx(2.1e9 / stream / 3600)


def test_budget_shows_hours_at_gpu_rates(dry_run, tmp_path):
    results = json.loads(json.dumps(dry_run[1]))
    # A dry run is not a GPU record: budget says so and shows no measured row.
    path = tmp_path / "results.json"
    path.write_text(json.dumps(results))
    assert measured_rates(path)[0] == {}
    assert "from a CPU --dry-run" in budget_cli(REPO / "params.yaml", path)

    results["machine"].update(dry_run=False, gpu="NVIDIA H200")
    results["steps"]["projection"]["figures"]["measured_tokens_per_s"] = {"streaming": 3.5e5}
    path.write_text(json.dumps(results))
    # The budget is the current profile's: the 1B's 2.1e9 tokens.
    llama = compose_params(["profile=llama-3.2-1b"], root=REPO, output=tmp_path / "p.yaml")
    out = budget_cli(llama, path)
    assert "| NVIDIA H200: streaming | 350,000 | 1.7 |" in out  # 2.1e9 / 3.5e5 / 3600 h
    assert "measured rates:" in out

    path.write_text("{")
    with pytest.raises(SaelabError, match="not a results file of bench/gpu.py"):
        budget_cli(REPO / "params.yaml", path)
    assert "is absent" in budget_cli(REPO / "params.yaml", tmp_path / "none.json")


@pytest.mark.parametrize("profile", ["tiny", "llama-3.2-1b-random", "llama-3.2-1b"])
def test_profiles_compose_without_hydra_as_with_it(profile, tmp_path):
    """The GPU image has no Hydra: gpu.py lays a profile over conf/config.yaml itself."""
    hydra = load_params(compose_params([f"profile={profile}"], root=REPO,
                                       output=tmp_path / "params.yaml"))
    assert to_dict(_gpu_module().profile_params(profile)) == to_dict(hydra)


def test_time_box_interrupts_a_step():
    gpu = _gpu_module()
    t0 = time.perf_counter()
    with pytest.raises(gpu.StepTimeout, match="1 s time box"):
        with gpu.time_box(1):
            time.sleep(5)
    assert time.perf_counter() - t0 < 3


def test_refuses_without_a_gpu():
    proc = subprocess.run([sys.executable, str(GPU_PY), "--out", "/nonexistent"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("ERROR: no CUDA GPU is visible")


def test_tracking_off_and_missing_mlflow(monkeypatch, caplog):
    params = load_params(REPO / "params.yaml")
    monkeypatch.setenv("SAELAB_TRACKING", "off")
    with tracking.stage_run("train_sae", params) as run:
        assert run is None
        tracking.log_metrics({"x": 1.0})  # no-ops, no MLflow needed
        tracking.log_params({"a": 1})
    assert "not recorded in MLflow" in caplog.text

    monkeypatch.delenv("SAELAB_TRACKING")
    monkeypatch.setitem(sys.modules, "mlflow", None)  # `import mlflow` raises ImportError
    with pytest.raises(SaelabError, match="SAELAB_TRACKING=off"):
        with tracking.stage_run("train_sae", params):
            pass
