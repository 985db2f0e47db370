"""`saelab pareto` on a toy store: every (architecture, target, seed) trained once, 95%
intervals over seeds, the plot, and a rerun that trains nothing."""
import csv
import math

import pytest
import torch
import yaml

from saelab import cli
from saelab.sae import pareto
from test_train import _tiny_store

SAE = {"d_sae": 32, "lr": 1.0e-2, "batch_size": 64, "lr_warmup_steps": 2,
       "l0_warmup_steps": 10, "eval_tokens": 128, "log_every": 10}


@pytest.fixture
def repo(tmp_path, monkeypatch):
    _tiny_store(tmp_path / "data/activations")
    # One thread: tiny matmuls only lose to thread hand-offs on a busy machine.
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sae": SAE,
                                                          "run": {"num_threads": 1}}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAELAB_TRACKING", "off")
    threads = torch.get_num_threads()
    yield tmp_path
    torch.set_num_threads(threads)


def test_pareto_trains_the_grid_and_plots_intervals(repo, monkeypatch, capsys):
    argv = ["pareto", "--targets", "3,6", "--seeds", "2", "--archs", "jumprelu,topk",
            "--tokens", str(64 * 15)]
    assert cli.main(argv) == 0
    out = repo / "reports/pareto"
    points = list(csv.DictReader((out / "points.csv").open()))
    assert sorted((p["architecture"], float(p["target_l0"]), int(p["seed"])) for p in points) \
        == sorted((a, t, s) for a in ("jumprelu", "topk") for t in (3.0, 6.0) for s in (0, 1))
    summary = list(csv.DictReader((out / "summary.csv").open()))
    assert len(summary) == 4
    for r in summary:
        ps = [float(p["fvu"]) for p in points
              if (p["architecture"], p["target_l0"]) == (r["architecture"], r["target_l0"])]
        m, lo, hi = pareto.interval(ps)
        assert float(r["fvu"]) == pytest.approx(sum(ps) / 2) == pytest.approx(m)
        assert float(r["fvu_lo"]) == pytest.approx(lo) and float(r["fvu_hi"]) == pytest.approx(hi)
        assert lo < m < hi or ps[0] == ps[1]
        assert math.isnan(float(r["delta_lm_loss"]))  # no model here: no LM metrics
    assert (out / "pareto.png").stat().st_size > 0
    assert len(list((out / "density").glob("*.png"))) == 8
    first = (out / "points.csv").read_bytes()

    # A rerun finds every point cached: it trains nothing and writes the same bytes.
    monkeypatch.setattr("saelab.sae.train.train", lambda *a, **k: pytest.fail("retrained"))
    assert cli.main(argv) == 0
    assert (out / "points.csv").read_bytes() == first
    assert "jumprelu  target      3" in capsys.readouterr().out


def test_interval_is_the_student_t_one():
    m, lo, hi = pareto.interval([1.0, 2.0, 3.0])
    assert m == 2.0 and hi - m == pytest.approx(4.302653 * 1.0 / math.sqrt(3), rel=1e-5)
    assert math.isnan(pareto.interval([1.0])[1])


def test_pareto_refuses_a_missing_store(tmp_path, monkeypatch, caplog):
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"sae": SAE}))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SAELAB_TRACKING", "off")
    with pytest.raises(SystemExit) as e:
        cli.main(["pareto", "--seeds", "1"])
    assert e.value.code == 2
    assert "no activation store" in caplog.text and "dvc repro extract_mlp8" in caplog.text
