"""DVC metrics files hold numbers only: each stage's numeric view of its full report."""
import json
from pathlib import Path

import yaml

from saelab.core import metrics, paths

REPO = Path(__file__).resolve().parents[1]


def test_numeric_view_keeps_named_numbers_and_flags_only():
    report = {
        "fvu": 0.25, "steps": 256, "lm_metrics_meaningful": False,
        "lm_metrics_note": "a random model", "lr_source": None, "nan": float("nan"),
        "delta_lm_loss_ci95": [-1e-5, 2e-5],                         # a list: one column per item
        "latents": {"17": {"density": 0.1}, "315": {"density": 0.3}},  # id-keyed rows
        "holdout": {"rel_gap": 0.02, "d_sae": 64, "law": "a*x^b", "new_error": 1.5,
                    "coef": {"a": 2.0}},
        "summary": {"note": "only strings"},
    }
    assert metrics.numeric_view(report) == {
        "fvu": 0.25, "steps": 256, "lm_metrics_meaningful": False,
        "holdout": {"rel_gap": 0.02, "d_sae": 64, "new_error": 1.5, "coef": {"a": 2.0}},
    }


def test_write_views_writes_each_stage_report_view(tmp_path):
    (tmp_path / paths.FIT_JSON).parent.mkdir(parents=True)
    (tmp_path / paths.FIT_JSON).write_text(json.dumps({"recommended": {"lr": 0.01, "note": "x"}}))
    (tmp_path / paths.BUDGET_JSON).write_text(json.dumps({"tokens": 2.1e9, "gpus": [{"a": 1}]}))
    written = metrics.write_views("fit_scaling_laws", tmp_path)
    assert [p.relative_to(tmp_path) for p in written] == [v for _, v in
                                                         metrics.VIEWS["fit_scaling_laws"]]
    assert json.loads(written[0].read_text()) == {"recommended": {"lr": 0.01}}
    assert json.loads(written[1].read_text()) == {"tokens": 2.1e9}
    assert metrics.write_views("train_sae", tmp_path) == []  # no report: nothing written


def test_dvc_yaml_declares_the_views_as_metrics_and_the_reports_as_outs():
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]

    def names(entries):
        return {next(iter(e)) if isinstance(e, dict) else e for e in entries or []}

    for stage, pairs in metrics.VIEWS.items():
        assert names(stages[stage].get("metrics")) == {str(v) for _, v in pairs}, stage
        assert {str(full) for full, _ in pairs} <= names(stages[stage]["outs"]), stage
    declared = {m for s in stages.values() for m in names(s.get("metrics"))}
    assert declared == {str(v) for pairs in metrics.VIEWS.values() for _, v in pairs}
