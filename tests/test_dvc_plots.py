"""`dvc plots show` as declared in dvc.yaml: one chart per quantity, power laws on log-log
axes, labelled, and a page that renders with no network (vega inlined, not from a CDN).
The page's charts are rendered to SVG by Node.js with the page's own scripts."""
import csv
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
CURVES = ["loss", "mse", "l0", "fvu", "lr", "lambda"]
POWER_LAWS = {"pilot_loss", "fitted_loss", "fitted_lr_star"}


def _write_csv(path: Path, header: list[str], rows: list[list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        csv.writer(f).writerows([header, *rows])


def _plots() -> list:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]


def test_one_training_chart_per_quantity():
    ys = [p[name]["y"]["reports/train/curves.csv"] for p in _plots() if isinstance(p, dict)
          for name in p if "reports/train/curves.csv" in p[name].get("y", {})]
    assert sorted(ys) == sorted(CURVES)  # each a single column, each once


def test_plots_page_renders_offline_with_log_axes(tmp_path):
    (tmp_path / ".dvc").mkdir()
    shutil.copytree(REPO / ".dvc" / "plots", tmp_path / ".dvc" / "plots")
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"plots": _plots()}))
    (tmp_path / ".dvc" / "config").write_text(  # this repo's config, without git
        (REPO / ".dvc" / "config").read_text().replace("[core]\n", "[core]\n    no_scm = true\n"))
    steps = range(20, 120, 20)
    _write_csv(tmp_path / "reports/train/curves.csv", ["step", *CURVES],
               [[s, 1 / s, 0.01 / s, 30 + s, 0.5 / s, 1e-3, 1e-4 * s] for s in steps])
    _write_csv(tmp_path / "reports/train/density.csv", ["latents", "log10_freq"],
               [[i, -1.0 - i / 10] for i in range(5)])
    _write_csv(tmp_path / "reports/scaling/pilots.csv", ["d_sae", "lr", "seed", "loss"],
               [[d, lr, 0, 1 / d ** 0.3 + lr] for d in (8, 16, 32) for lr in (1e-3, 1e-2)])
    _write_csv(tmp_path / "reports/scaling/loss_vs_size.csv", ["d_sae", "loss", "lo", "hi"],
               [[d, d ** -0.3, 0.9 * d ** -0.3, 1.1 * d ** -0.3] for d in (8, 16, 32, 64)])
    _write_csv(tmp_path / "reports/scaling/lr_star_vs_size.csv", ["d_sae", "lr", "lo", "hi"],
               [[d, 0.02 * d ** -0.1, 0.01, 0.03] for d in (8, 16, 32, 64)])
    for png in [p for p in _plots() if isinstance(p, str)]:
        (tmp_path / png).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / "docs" / "pareto-smollm2-135m.png", tmp_path / png)
    env = {**os.environ, "DVC_NO_ANALYTICS": "true",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(["dvc", "plots", "show", "-o", "page"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    html = (tmp_path / "page" / "index.html").read_text()
    # Nothing fetched: no script from anywhere but the page (images are local static/ files).
    assert not re.search(r"<script[^>]+src=", html) and "cdn.jsdelivr" not in html

    node = shutil.which("node")
    assert node, "Node.js (Debian's nodejs, on the project's machines) renders the page here"
    render = subprocess.run([node, str(REPO / "tests/js/render_plots.js"),
                             str(tmp_path / "page" / "index.html")],
                            capture_output=True, text=True, timeout=300)
    assert render.returncode == 0, render.stderr[-3000:]
    page = json.loads(render.stdout)
    assert page["embed"] == "function"  # vega-embed defined by the inlined scripts
    charts = page["plots"]
    declared = {name for p in _plots() if isinstance(p, dict) for name in p}
    assert declared <= set(charts), charts.keys()
    for name in declared:
        chart = charts[name]
        assert chart["marks"] > 0 and chart["title"], (name, chart)
        assert len(chart["axis_titles"]) == 2 and "y" not in chart["axis_titles"], (name, chart)
        log = {chart["scales"]["x"], chart["scales"]["y"]} == {"log"}
        assert log == (name in POWER_LAWS), (name, chart["scales"])
