"""End to end over sampled windows: planted feature, malformed answers, the `none` backend."""
from __future__ import annotations

import json
import logging

import pytest
from conftest import COUNTER, WORD, labelling_responder, make_cfg
from fake_openai import FakeOpenAI

from saelab.interpret.prompts import label_probabilities, parse_explanation, parse_labels


def _run(samples, table, cfg, workdir):
    from saelab.interpret.pipeline import run_interpret

    return run_interpret(samples, table, cfg, seed=0, counter=COUNTER, out_dir=workdir / "r",
                         metrics_path=workdir / "m.json")


def test_planted_feature_right_explanation_scores_high(server, workdir, samples, table):
    cfg = make_cfg(workdir, backend="openai", base_url=server.base_url, n_completions=2)
    m = _run(samples, table, cfg, workdir)
    planted = m["latents"]["7"]
    assert planted["explanation"] == f'the word "{WORD}"'
    explained = json.loads((workdir / "r" / "explanations.json").read_text())
    assert [len(e["completions"]) for e in explained if not e["skipped"]] == [2, 2]
    assert planted["detection"]["balanced_accuracy"] >= 0.9
    assert planted["detection"]["auc"] >= 0.9
    assert planted["fuzzing"]["balanced_accuracy"] >= 0.9
    assert planted["detection"]["n"] > 10 and planted["detection"]["n_unanswered"] == 0
    assert m["latents"]["3"]["skipped"] and m["summary"]["n_skipped"] == 1
    saved = json.loads((workdir / "m.json").read_text())
    assert saved["latents"]["7"]["detection"] == planted["detection"]
    assert "detection_balanced_accuracy_mean" in saved["summary"]
    page = (workdir / "r" / "latent_000007.html").read_text()
    assert WORD in page and "\ufffd" not in page and "<svg" in page
    assert 'aria-label="activation histogram of latent 7"' in page


def test_planted_feature_wrong_explanation_scores_near_chance(workdir, samples, table):
    with FakeOpenAI(labelling_responder(explain_word="gato")) as srv:
        cfg = make_cfg(workdir, backend="openai", base_url=srv.base_url)
        m = _run(samples, table, cfg, workdir)
    planted = m["latents"]["7"]
    assert planted["explanation"] == 'the word "gato"'
    assert planted["detection"]["balanced_accuracy"] == pytest.approx(0.5, abs=0.1)


def test_malformed_answers_are_reported_not_fatal(workdir, samples, table):
    def garbage(body):
        if "response_format" in body:
            return "Sure! Here are my labels: yes, no, yes"
        return "I am not sure.\nIt could be many things."

    with FakeOpenAI(garbage) as srv:
        cfg = make_cfg(workdir, backend="openai", base_url=srv.base_url)
        m = _run(samples, table, cfg, workdir)
        assert m["summary"]["n_explained"] == 0 and m["summary"]["n_failed"] == 2
        assert "could be parsed" in m["latents"]["7"]["error"]

    def bad_labels(body):
        if "response_format" in body:
            return '{"example_1": "maybe"}'
        return "**Explanation:** the word mañana."

    with FakeOpenAI(bad_labels) as srv:
        cfg = make_cfg(workdir, backend="openai", base_url=srv.base_url,
                       cache_dir=str(workdir / "cache2"))
        m = _run(samples, table, cfg, workdir)
    det = m["latents"]["7"]["detection"]
    assert m["latents"]["7"]["explanation"] == "the word mañana"
    assert det["balanced_accuracy"] is None and det["n"] == 0 and det["n_unanswered"] > 0
    assert "latent_000007.html" in (workdir / "r" / "index.html").read_text()


def test_none_backend_writes_dashboards_and_request_file(workdir, samples, table, caplog,
                                                         monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = make_cfg(workdir, backend="none")
    with caplog.at_level(logging.INFO):
        m = _run(samples, table, cfg, workdir)
    assert "NO explanations were requested" in caplog.text
    lines = [json.loads(x) for x in (workdir / "r" / "requests.jsonl").read_text().splitlines()]
    assert len(lines) == 2  # latents 5 and 7; 3 is skipped
    for line in lines:
        assert line["method"] == "POST" and line["url"] == "/v1/chat/completions"
        assert len(line["custom_id"]) == 64 and line["body"]["model"] == "gpt-4o"
    assert any(f"<<{WORD}>>" in line["body"]["messages"][1]["content"] for line in lines)
    index = (workdir / "r" / "index.html").read_text()
    assert "No explanations were requested" in index and "chars/4" in index
    assert "<script" not in index and "http" not in index.replace("http-equiv", "")
    assert (workdir / "r" / "latent_000005.html").exists()
    assert m["cost"]["estimated_usd_batch"] == pytest.approx(m["cost"]["estimated_usd"] / 2)


def test_report_escapes_corpus_text(workdir, table, tokenizer):
    import numpy as np

    from saelab.interpret.report import example_html
    from saelab.interpret.sampling import Window

    ids = np.array(tokenizer.encode("<script>alert('x')</script> & mañana", add_special_tokens=False))
    w = Window(0, 0, ids, np.linspace(0, 1, len(ids)).astype(np.float32), "top")
    out = example_html(w, table, 1.0)
    assert "<script>" not in out and "&lt;script" in out and "mañana" in out


@pytest.mark.parametrize("reply, want", [
    ("Explanation: the word mañana", "the word mañana"),
    ("Let me think.\nThe marks are on dates.\nExplanation: this neuron fires on dates.", "dates"),
    ("**Explanation**: \"future time words\"", "future time words"),
    ("fires on the word 'mañana'", "the word 'mañana'"),
    ("Explanation: 'mañana' and 'tarde'", "'mañana' and 'tarde'"),
    ("one two three four five six seven eight nine ten eleven twelve", "one two three four five"),
    ("", None),
    ("Line one\nLine two without the label", None),
])
def test_parse_explanation(reply, want):
    assert parse_explanation(reply, max_words=5 if "twelve" in reply else 20) == want


def test_parse_labels_and_logprobs():
    assert parse_labels('{"example_1": true, "example_2": false}', 2) == [True, False]
    assert parse_labels('```json\n{"example_1": true}\n```', 1) == [True]
    assert parse_labels('{"example_1": true}', 2) is None
    assert parse_labels("not json", 1) is None
    lp = {"content": [{"token": '{"example_1":', "logprob": 0.0},
                      {"token": "true", "logprob": -0.1,
                       "top_logprobs": [{"token": "true", "logprob": -0.1},
                                        {"token": "false", "logprob": -2.4}]},
                      {"token": '","', "logprob": 0.0}, {"token": "example_2", "logprob": 0.0},
                      {"token": '":false', "logprob": -0.5, "top_logprobs": []}]}
    probs = label_probabilities(lp, 2)
    assert probs[0] == pytest.approx(0.909, abs=1e-3) and probs[1] == 0.0
    assert label_probabilities(lp, 3) is None and label_probabilities(None, 1) is None


def test_histogram_svg_draws_each_nonzero_bin_on_a_log_scale():
    import re
    from saelab.interpret.report import histogram_svg
    svg = histogram_svg([999, 0, 9, 1], [0.0, 0.5, 1.0, 1.5, 2.0], latent=3)
    heights = [float(h) for h in re.findall(r'<rect [^>]*height="([0-9.]+)"', svg)]
    assert len(heights) == 3  # the empty bin draws nothing
    # log10(c + 1): 3, 1 and ~0.301 of the tallest bar's 128 px
    assert heights == pytest.approx([128.0, 128.0 / 3, 128.0 * 0.30103 / 3], abs=0.1)
    assert ">999<" in svg and ">0<" in svg and ">2<" in svg
