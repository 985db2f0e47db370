"""Real-scale planning: `saelab plan`, `saelab budget` per profile, the epoch guard and the
progress lines of long runs."""
import dataclasses
import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from saelab.cli import compose_params, main
from saelab.core.config import load_params
from saelab.core.errors import SaelabError
from saelab.core.progress import Progress
from saelab.scaling.budget import budget_cli
from saelab.scaling.plan import make_plan, plan_text, processes
from saelab.sae.train import check_epochs, store_passes

# Not imported from conftest: tests/interpret puts its own conftest first on sys.path.
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def llama_params(tmp_path_factory):
    out = tmp_path_factory.mktemp("p") / "params.yaml"
    return compose_params(["profile=llama-3.2-1b"], root=REPO, output=out)


def _with(path, tmp_path, **sections):
    raw = yaml.safe_load(path.read_text())
    for name, values in sections.items():
        raw[name].update(values)
    out = tmp_path / "params.yaml"
    out.write_text(yaml.safe_dump(raw))
    return load_params(out)


@pytest.fixture
def roomy_disk(monkeypatch):
    """A machine with room for the 1B run (~46 GB): the plan's disk warning describes the
    machine it runs on, which these tests are not about (a shared CI disk may be fuller)."""
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=10**12))


@pytest.mark.parametrize("gpu", ["H100", "H200"])
def test_llama_plan_streams_the_budget_in_under_three_hours(llama_params, tmp_path, gpu,
                                                             roomy_disk):
    params = load_params(llama_params)
    assert (params.data.source, params.data.fineweb2_config) == ("fineweb2", "spa_Latn")
    p = make_plan(params, gpu=gpu, root=tmp_path)
    assert p["stream"] and p["train_tokens"] == 2.1e9 and p["passes"] is None
    train = next(s for s in p["stages"] if s["stage"] == "train_sae")
    # Forward to the hook (seed: 1.2e9 FLOP/token) + the SAE step (seed: 8.5e17 in all).
    assert train["flops"] == pytest.approx(2.1e9 * (1.2e9 + 12 * 2048 * 16384))
    assert train["hours_peak"] == pytest.approx(train["flops"] / 989e12 / 3600)
    assert p["total_hours_at_utilisation"] < 3.0
    # The corpus holds the budget (FineWeb-2), and the 2.1e9-token store is not made.
    assert p["corpus"]["holds_tokens"] >= p["corpus"]["needed_tokens"] > 2.1e9
    assert p["disk"]["store"] == pytest.approx(8_388_608 * 4096, rel=0.01)
    assert not [w for w in p["warnings"] if "disk" in w or "GPU memory" in w]
    # Pilots: the lr sweep of every width, then each further token count at one lr.
    pilots = next(s for s in p["stages"] if s["stage"] == "fit_scaling_laws")
    assert pilots["tokens"] == 4 * 2 * (5 * 4_194_304 + 1_048_576 + 6_291_456)
    assert "total | | | 0.96 h | 2.4 h |" in plan_text(p)


def test_plan_warns_before_a_run_that_cannot_work(llama_params, tmp_path, monkeypatch):
    # The store route: 250 passes over 8.4 M tokens, and no disk for a bigger store.
    params = _with(llama_params, tmp_path, sae={"stream": False})
    monkeypatch.setattr(shutil, "disk_usage", lambda _: SimpleNamespace(free=10**9))
    p = make_plan(params, root=tmp_path)
    assert p["passes"] == pytest.approx(store_passes(4096, int(2.1e9), 8_388_608))
    text = plan_text(p)
    assert "WARNING: train_sae would pass 250.3 times" in text
    assert "WARNING: the run needs about" in text and "1.0 GB are free" in text

    # 8 GPUs: each holds an eighth of the buffer and batch, and the corpus split per process.
    params = _with(llama_params, tmp_path, run={"launcher": "torchrun --nproc_per_node=8"},
                   sae={"shuffle_buffer": 64 * 2**20})
    p = make_plan(params, root=tmp_path, gpu="RTX 4090")
    assert (p["world"], p["per_node"]) == (8, 8)
    assert p["gpu_bytes"]["shuffle_buffer"] == 64 * 2**20 / 8 * 2048 * 2 * 2
    assert any(w.startswith("GPU memory") for w in p["warnings"])
    assert p["host"]["corpus_split_all_processes"] == 8 * p["host"]["corpus_split_per_process"]
    with pytest.raises(SaelabError, match="unknown GPU 'TPU'"):
        make_plan(params, gpu="TPU")


def test_plan_compares_its_rate_with_the_measured_one(llama_params, tmp_path):
    results = tmp_path / "results.json"
    results.write_text(json.dumps({
        "suite": "saelab bench/gpu.py", "machine": {"dry_run": False, "gpu": "NVIDIA H200"},
        "steps": {"projection": {"figures": {"measured_tokens_per_s": {"streaming": 2.5e5}}}}}))
    p = make_plan(load_params(llama_params), gpu="H200", results=results)
    (m,) = p["measured"]
    assert m["train_hours"] == pytest.approx(2.1e9 / 2.5e5 / 3600)
    assert m["predicted_over_measured"] == pytest.approx(p["predicted_train_tokens_per_s"] / 2.5e5)
    assert "predicted / measured 0.99" in plan_text(p)


def test_launcher_gives_the_process_count():
    assert processes("python") == (1, 1)
    assert processes("torchrun --nproc_per_node=8") == (8, 1)
    assert processes("torchrun --nnodes=2 --nproc-per-node 8 --rdzv-backend=c10d") == (8, 2)


def test_cli_plan_and_budget_follow_the_profile(llama_params, repo_root, capsys):
    assert main(["plan", "--params", str(repo_root / "params.yaml")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Plan for profile tiny") and "d_in 64, d_sae 512" in out
    assert "4.00 passes (sae.max_epochs 4)" in out
    # budget: the seed's figures for the 1B, the tiny model's own for tiny.
    big = budget_cli(llama_params)
    assert "**2.1e+09**" in big and "**2.5e+18 FLOPs**" in big and "**8.5e+17 FLOPs**" in big
    tiny = budget_cli(repo_root / "params.yaml")
    assert tiny.startswith("Profile tiny") and "6 x 2 x 64 x 512 x" in tiny


def test_epoch_guard_names_the_numbers_and_both_fixes():
    cfg = dataclasses.replace(load_params().sae, batch_size=4096, max_epochs=1.0)
    store = SimpleNamespace(n_tokens=8_388_608, d=2048, dtype="bfloat16", context_len=1024)
    with pytest.raises(SaelabError) as e:
        check_epochs(cfg, 2_100_000_000, "reports/budget.json", store)
    msg = str(e.value)
    for words in ("2100000000 tokens (reports/budget.json)", "250.3 times",
                  "8388608 stored", "sae.max_epochs = 1", "sae.stream = true",
                  "extract.n_tokens = 2100000000: a store of about 8.7 TB"):
        assert words in msg, words  # 4,096 B of vector + 16 B of ids, index, norm a token
    assert check_epochs(dataclasses.replace(cfg, max_epochs=4.0), 4 * 8_388_608, "x",
                        store) == 4.0


def test_progress_lines_off_a_terminal(caplog):
    now = [0.0]
    caplog.set_level(logging.INFO, logger="saelab.progress")
    bar = Progress("train_sae", 1000, rate_per=4096, interactive=False, clock=lambda: now[0])
    for _ in range(10):  # 10 steps in 30 s: neither a twentieth (50 steps) nor 60 s
        now[0] += 3.0
        bar.update(1, loss=0.5, L0=12.0)
    assert caplog.messages == []
    now[0] += 31.0
    bar.update(1, loss=0.25, L0=11.5)  # 61 s since the start: a line
    (line,) = caplog.messages
    assert line.startswith("train_sae: step 11/1000 (1.1%)")
    assert "739 tokens/s" in line and "loss 0.25" in line and "L0 11.5" in line
    assert "ETA 1:31:" in line  # 989 steps at 61 s / 11 steps
    for _ in range(50):
        bar.update(1)  # a twentieth of the run: a line, however fast
    assert len(caplog.messages) == 2
    silent = Progress("x", 10, interactive=False, enabled=False)
    silent.update(10)
    assert len(caplog.messages) == 2


def test_progress_of_an_unknown_total_logs_by_time(caplog):
    # fetch_oscar reads until the source or a token budget ends: no total, no percent.
    now = [0.0]
    caplog.set_level(logging.INFO, logger="saelab.progress")
    bar = Progress("corpus (fineweb2)", None, unit="doc", rate_unit="docs",
                   interactive=False, clock=lambda: now[0])
    for _ in range(1000):  # many units in 10 s: no line (no fraction of an unknown total)
        now[0] += 0.01
        bar.update(1)
    assert caplog.messages == []
    now[0] += 55.0
    bar.update(1, tokens_est="12,345")
    (line,) = caplog.messages
    assert line == "corpus (fineweb2): doc 1,001, 15 docs/s, tokens_est 12,345"


def test_readme_shows_the_plan_of_the_llama_profile(llama_params, tmp_path, roomy_disk):
    readme = (REPO / "README.md").read_text()
    block = readme.split("<!-- plan llama-3.2-1b -->\n```\n")[1].split("```\n<!-- /plan -->")[0]
    text = plan_text(make_plan(load_params(llama_params), gpu="H100",
                               results=tmp_path / "none.json"))
    # Disk, RAM and the results file describe the machine the plan ran on; the rest is fixed.
    machine = ("Disk:", "Host RAM", "  (")
    assert [x for x in block.splitlines() if not x.startswith(machine)] == \
        [x for x in text.splitlines() if not x.startswith(machine)]
