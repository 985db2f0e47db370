import json

import pytest
import yaml

from saelab.scaling.budget import (budget_cli, budget_markdown, compute_budget, round_sig,
                                   write_budget)
from saelab.core.config import BudgetCfg, parse_params


def test_seed_figures():
    """DESIGN §7, seed 002: each figure at the rounding the seed states it with."""
    b = compute_budget(BudgetCfg())
    assert round_sig(b["tokens_entropy_equiv"], 3) == 4.24e9
    assert b["tokens"] == 2.1e9
    assert round_sig(b["llm_flops"], 2) == 2.5e18
    assert round_sig(b["sae_flops"], 2) == 8.5e17
    rtx = next(g for g in b["gpus"] if g["name"] == "RTX 4090")
    assert round_sig(rtx["llm_hours_peak"], 2) == 4.2
    # The exact products behind the rounded figures.
    assert b["llm_flops"] == pytest.approx(1.2e9 * 2.1e9)
    assert b["sae_flops"] == pytest.approx(6 * 2 * 2048 * 16384 * 2.1e9)


def test_hours_at_utilisation_and_every_gpu():
    b = compute_budget(BudgetCfg(utilisation=0.5))
    assert [g["name"] for g in b["gpus"]] == ["RTX 4090", "A100", "H100"]
    for g in b["gpus"]:
        for part in ("llm", "sae", "total"):
            assert g[f"{part}_hours_at_utilisation"] == pytest.approx(2 * g[f"{part}_hours_peak"])
        assert g["total_hours_peak"] == pytest.approx(g["llm_hours_peak"] + g["sae_hours_peak"])


def test_measured_rates_give_wall_time_and_implied_utilisation():
    b = compute_budget(BudgetCfg(), {"H100": 250_000.0, "laptop": 1_000.0})
    h100, laptop = b["measured"]
    assert h100["hours"] == pytest.approx(2.1e9 / 250_000 / 3600)
    assert h100["utilisation"] == pytest.approx(b["total_flops"] / 2.1e9 * 250_000 / 989e12)
    assert "utilisation" not in laptop  # no peak known for it
    md = budget_markdown(b)
    assert "| H100 | 250,000 | 2.3 |" in md
    with pytest.raises(ValueError, match="must be > 0"):
        compute_budget(BudgetCfg(), {"H100": 0.0})


def test_markdown_table():
    md = budget_markdown(compute_budget(BudgetCfg()))
    assert "4.24e+09" in md and "**2.1e+09**" in md
    assert "**2.5e+18 FLOPs**" in md and "**8.5e+17 FLOPs**" in md
    row = next(line for line in md.splitlines() if line.startswith("| RTX 4090"))
    assert row.split(" | ")[2] == "4.2"  # LLM hours at peak
    assert "at 40%" in md


def test_cli_reads_any_params_file(tmp_path):
    path = tmp_path / "params.yaml"
    # The SAE width is the current profile's (sae.d_sae), as the model's.
    path.write_text(yaml.safe_dump({"budget": {"utilisation": 0.25}, "sae": {"d_sae": 32768}}))
    out = budget_cli(path)
    assert "at 25%" in out and "x 32768 x" in out


def test_write_budget(tmp_path):
    b = write_budget(parse_params({}), tmp_path / "b.json", tmp_path / "b.md")
    assert json.loads((tmp_path / "b.json").read_text())["tokens"] == b["tokens"] == 2.1e9
    assert (tmp_path / "b.md").read_text() == budget_markdown(b)
