"""Load: interpret 500 latents against the test OpenAI server while it answers 10% of the
attempts with 429 and 2% with 500. Every latent is explained and scored, and no request is
paid twice (counted server-side)."""
from __future__ import annotations

import dataclasses
import json
import random
import threading
from collections import Counter

import numpy as np

from saelab.core.config import InterpretCfg
from saelab.interpret import pipeline
from saelab.interpret.cost import TokenCounter
from saelab.interpret.sampling import SampleSpec, sample_from_hits

from .conftest import CountingServer, labelling_responder

N_LATENTS, VOCAB, CTX, ROWS = 500, 3000, 48, 300
SPEC = SampleSpec(window=8, n_top=6, n_explain=3, n_quantiles=2, n_per_quantile=1,
                  n_random=3, min_activations=5)


def synthetic_samples() -> tuple[list, list[bytes]]:
    """Windows of N_LATENTS latents over random token rows; latent i fires on a few tokens."""
    rng = np.random.default_rng(0)
    rows = rng.integers(1, VOCAB, size=(ROWS, CTX)).astype(np.uint32)
    rows[:, 0] = 0  # the BOS column, not stored
    r, p = np.meshgrid(np.arange(ROWS), np.arange(1, CTX), indexing="ij")
    index = np.stack([r.ravel(), p.ravel()], 1).astype(np.int64)
    n_tokens = len(index)
    table = [b""] + [f" w{i}".encode() for i in range(1, VOCAB)]
    samples = []
    for latent in range(N_LATENTS):
        fired = np.sort(rng.choice(n_tokens, size=30, replace=False))
        values = (0.5 + rng.random(30)).astype(np.float32)
        samples.append(sample_from_hits(latent, fired, values, n_tokens, index, rows, SPEC,
                                     np.random.default_rng([0, latent])))
    return samples, table


class Flaky:
    """10% of attempts get 429, 2% get 500, decided by (request, attempt): reproducible."""

    def __init__(self):
        self.injected: Counter[int] = Counter()
        self.lock = threading.Lock()

    def __call__(self, body: dict, attempt: int) -> int | None:
        u = random.Random(json.dumps(body, sort_keys=True) + f"#{attempt}").random()
        status = 429 if u < 0.10 else 500 if u < 0.12 else None
        if status:
            with self.lock:
                self.injected[status] += 1
        return status


def test_500_latents_with_429s_and_500s(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-load-test")
    # The HTML report (a matplotlib histogram per latent, ~0.1 s each) is not what is
    # under load here; it would be 9/10 of the test's time.
    monkeypatch.setattr(pipeline, "write_report", lambda *args, **kwargs: None)
    samples, table = synthetic_samples()
    assert not any(s.skipped for s in samples)
    flaky = Flaky()
    with CountingServer(labelling_responder()) as server:
        server.inject = flaky
        cfg = dataclasses.replace(
            InterpretCfg(), backend="openai", base_url=server.base_url,
            cache_dir=str(tmp_path / "cache"), scorers=("detection",), examples_per_prompt=8,
            concurrency=16, max_retries=6, retry_base_s=0.0, timeout_s=30.0, max_usd=100.0)
        m = pipeline.run_interpret(
            samples, table, cfg, seed=0, out_dir=tmp_path / "r",
            metrics_path=tmp_path / "m.json", sleep=lambda s: None,
            counter=TokenCounter("chars/4 (test)", lambda s: (len(s) + 3) // 4, exact=False))

    assert m["summary"]["n_explained"] == N_LATENTS and m["summary"]["n_failed"] == 0
    assert all(v["detection"]["n_unanswered"] == 0 for v in m["latents"].values())
    requests = (tmp_path / "r" / "requests.jsonl").read_text().splitlines()
    assert len(requests) > N_LATENTS
    # Every request answered exactly once; every failed attempt was retried, none re-paid.
    assert len(server.paid) == len(requests) and set(server.paid.values()) == {1}
    assert m["cost"]["requests_sent"] == len(requests)
    assert server.chat_calls == len(requests) + sum(flaky.injected.values())
    calls = server.chat_calls
    assert 0.07 < flaky.injected[429] / calls < 0.13 and 0.005 < flaky.injected[500] / calls < 0.04
