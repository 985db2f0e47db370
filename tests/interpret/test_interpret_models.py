"""Models as data: prices, reasoning effort, logprobs and shutdown dates from interpret.models;
the explanation language; latents whose explanation fails detection are listed."""
from __future__ import annotations

import dataclasses
import json
import logging
from datetime import date

import pytest
from conftest import COUNTER, labelling_responder, make_cfg
from fake_openai import FakeOpenAI

from saelab.core.config import InterpretCfg, LLMSpec, load_params
from saelab.core.errors import SaelabError
from saelab.interpret.cost import Prices, usage_usd
from saelab.interpret.models import explainer


def _run(samples, table, cfg, workdir):
    from saelab.interpret.pipeline import run_interpret

    return run_interpret(samples, table, cfg, seed=0, counter=COUNTER, out_dir=workdir / "r",
                         metrics_path=workdir / "m.json")


def test_default_is_a_current_model_that_reasons_at_effort_none(repo_root):
    cfg = load_params(repo_root / "params.yaml").interpret
    assert cfg == dataclasses.replace(InterpretCfg(), backend=cfg.backend)  # conf = code
    assert cfg.model == "gpt-6-luna" and cfg.reasoning_effort == "none"
    spec = cfg.models["gpt-6-luna"]
    assert (spec.input, spec.output, spec.batch_discount) == (0.10, 0.50, 0.5)
    assert cfg.models["gpt-4o"].shutdown == "2027-01-14"
    assert cfg.latent_selection == "random"


def test_old_model_warns_with_its_shutdown_date_and_a_past_one_stops(caplog):
    cfg = dataclasses.replace(InterpretCfg(), model="gpt-4o", backend="openai")
    with caplog.at_level(logging.WARNING):
        llm = explainer(cfg, today=date(2026, 11, 28))
    assert "2027-01-14" in caplog.text and "gpt-6-luna" in caplog.text
    assert llm.reasoning_effort is None and llm.logprobs
    with pytest.raises(SaelabError, match="shut down on 2027-01-14.*gpt-6-luna"):
        explainer(cfg, today=date(2027, 1, 14))


def test_unlisted_model_needs_a_row_unless_a_local_server_serves_it():
    cfg = dataclasses.replace(InterpretCfg(), model="gpt-7", backend="openai")
    with pytest.raises(SaelabError, match="not in interpret.models"):
        explainer(cfg)
    local = explainer(dataclasses.replace(cfg, base_url="http://127.0.0.1:9"))
    assert not local.listed and local.prices(batch=False).usd(10**6, 10**6) == 0.0
    assert not local.logprobs and "no AUC" in local.auc_note


def test_prices_come_from_the_table_with_batch_and_cache_discounts():
    cfg = dataclasses.replace(
        InterpretCfg(), models={"m": LLMSpec(input=1.0, cached_input=0.1, output=4.0,
                                             batch_discount=0.5)}, model="m")
    llm = explainer(cfg)
    assert llm.prices(batch=False).usd(10**6, 10**6) == pytest.approx(5.0)
    assert llm.prices(batch=True).usd(10**6, 10**6) == pytest.approx(2.5)
    reply = {"usage": {"prompt_tokens": 10**6, "completion_tokens": 0,
                       "prompt_tokens_details": {"cached_tokens": 5 * 10**5}}}
    assert usage_usd(reply, llm.prices(batch=False)) == pytest.approx(0.55)
    assert Prices(1.0, 4.0).usd(10**6, 0, cached_tokens=10**6) == pytest.approx(1.0)


def test_reasoning_model_requests_and_no_logprob_scores(workdir, samples, table):
    bodies: list[dict] = []
    respond = labelling_responder(logprobs=False)
    with FakeOpenAI(lambda body: bodies.append(body) or respond(body)) as srv:
        cfg = make_cfg(workdir, backend="openai", base_url=srv.base_url, model="gpt-6-luna",
                       explanation_language="es")
        m = _run(samples, table, cfg, workdir)
    explain = [b for b in bodies if "response_format" not in b]
    scoring = [b for b in bodies if "response_format" in b]
    assert explain and scoring
    for b in bodies:
        assert b["reasoning_effort"] == "none" and "max_tokens" not in b
        assert b["max_completion_tokens"] > 0
    assert all("logprobs" not in b for b in scoring)
    assert all("in Spanish" in b["messages"][0]["content"] for b in explain)
    planted = m["latents"]["7"]["detection"]
    assert planted["balanced_accuracy"] >= 0.9 and planted["auc"] is None
    assert "gpt-6-luna returns no token logprobs" in m["auc_note"]
    assert m["explanation_language"] == "es" and m["reasoning_effort"] == "none"
    page = (workdir / "r" / "index.html").read_text()
    assert "Spanish</b>" in page and "no AUC" in page
    # The estimate was priced from the table's gpt-6-luna row, not gpt-4o's.
    assert m["cost"]["estimated_usd"] == pytest.approx(
        (m["cost"]["estimated_input_tokens"] * 0.10
         + m["cost"]["estimated_output_tokens_max"] * 0.50) / 1e6)


def test_explanations_that_fail_detection_are_listed(workdir, samples, table):
    with FakeOpenAI(labelling_responder(explain_word="gato")) as srv:
        cfg = make_cfg(workdir, backend="openai", base_url=srv.base_url, min_detection=0.7)
        m = _run(samples, table, cfg, workdir)
    assert 7 in m["failed_detection"] and m["summary"]["n_failed_detection"] >= 1
    saved = json.loads((workdir / "m.json").read_text())
    assert saved["failed_detection"] == m["failed_detection"]
    page = (workdir / "r" / "index.html").read_text()
    assert "fail detection" in page and 'href="latent_000007.html">7</a>' in page
