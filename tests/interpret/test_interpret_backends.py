"""Backends against the fake server with the real openai client: retries, batches, money."""
from __future__ import annotations

import json
import logging

import pytest
from conftest import COUNTER, make_cfg
from fake_openai import body_hash

from saelab.core.errors import SaelabError
from saelab.interpret import cost as cost_mod
from saelab.interpret.backends import BatchBackend, BatchState, SyncBackend, make_client
from saelab.interpret.cache import Request, ResponseCache
from saelab.interpret.cost import Budget, Prices, estimate
from saelab.interpret.pipeline import STATE_FILE, run_interpret


def _requests(n: int, base_url: str, tag: str = "q") -> list[Request]:
    return [Request.make({"model": "gpt-4o", "max_tokens": 5,
                          "messages": [{"role": "user", "content": f"{tag} {i}"}]}, base_url)
            for i in range(n)]


def test_sync_retries_429_and_500_and_never_pays_twice(server, workdir, samples, table):
    # Every request is refused twice (429, then 500) before it is answered.
    server.fail = lambda body, attempt: (429, 500)[attempt] if attempt < 2 else None
    cfg = make_cfg(workdir, backend="openai", base_url=server.base_url)
    first = run_interpret(samples, table, cfg, seed=0, counter=COUNTER,
                          out_dir=workdir / "r", metrics_path=workdir / "m.json")
    assert first["summary"]["n_explained"] == 2  # latents 5 and 7; 3 is skipped
    assert server.paid and max(server.paid.values()) == 1
    assert server.chat_calls == 3 * sum(server.paid.values())
    assert first["cost"]["requests_sent"] == sum(server.paid.values())
    calls = server.chat_calls
    again = run_interpret(samples, table, cfg, seed=0, counter=COUNTER,
                          out_dir=workdir / "r", metrics_path=workdir / "m.json")
    assert server.chat_calls == calls  # everything came from the cache
    assert again["cost"]["requests_sent"] == 0 and again["cost"]["spent_usd"] == 0
    assert again["latents"] == first["latents"]


def test_sync_gives_up_after_max_retries_and_retries_on_rerun(server, workdir):
    reqs = _requests(6, server.base_url)
    doomed = reqs[2].body
    server.fail = lambda body, attempt: 500 if body == doomed else None
    cache = ResponseCache(workdir / "c")
    client = make_client(server.base_url, 10)
    out = SyncBackend(client, cache, concurrency=3, max_retries=2, retry_base_s=0.001).send(reqs, "t")
    assert out.sent == 5 and list(out.failed) == [reqs[2].key]
    assert "500" in out.failed[reqs[2].key] and "3 attempts" in out.failed[reqs[2].key]
    assert cache.get(reqs[2].key) is None
    server.fail = lambda body, attempt: None
    todo = [r for r in reqs if cache.get(r.key) is None]
    out = SyncBackend(client, cache, concurrency=3, max_retries=2, retry_base_s=0.001).send(todo, "t")
    assert out.sent == 1 and max(server.paid.values()) == 1


def test_sync_concurrency_is_bounded(server, workdir):
    server.delay = lambda body, attempt: 0.05
    out = SyncBackend(make_client(server.base_url, 10), ResponseCache(workdir / "c"),
                      concurrency=2, max_retries=0, retry_base_s=0.001).send(
        _requests(8, server.base_url), "t")
    assert out.sent == 8 and server.max_in_flight == 2


def test_sync_retries_a_timed_out_request(server, workdir):
    reqs = _requests(2, server.base_url)
    slow = reqs[0].body
    # The first try of one request takes longer than the client waits.
    server.delay = lambda body, attempt: 1.0 if body == slow and attempt == 0 else 0.0
    out = SyncBackend(make_client(server.base_url, 0.3), ResponseCache(workdir / "c"),
                      concurrency=1, max_retries=2, retry_base_s=0.001).send(reqs, "t")
    assert out.sent == 2 and not out.failed
    assert server.attempts[body_hash(slow)] == 2


def test_a_refused_key_stops_at_once(server, workdir):
    server.fail = lambda body, attempt: 401
    backend = SyncBackend(make_client(server.base_url, 10), ResponseCache(workdir / "c"),
                          concurrency=1, max_retries=3, retry_base_s=0.001)
    with pytest.raises(SaelabError, match="OPENAI_API_KEY"):
        backend.send(_requests(3, server.base_url), "t")
    assert server.chat_calls <= 2  # no retries of a 401, no point in trying the rest


def test_missing_key_names_the_variable_and_the_none_backend(monkeypatch, workdir, samples, table):
    monkeypatch.delenv("OPENAI_API_KEY")
    cfg = make_cfg(workdir, backend="openai")
    with pytest.raises(SaelabError, match=r"OPENAI_API_KEY.*interpret\.backend=none"):
        run_interpret(samples, table, cfg, seed=0, counter=COUNTER, out_dir=workdir / "r",
                      metrics_path=workdir / "m.json")


def test_batch_expired_with_partial_results_resubmits_only_the_missing(server, workdir):
    reqs = _requests(10, server.base_url)
    server.expire_after = 4
    cache = ResponseCache(workdir / "c")
    state = BatchState(workdir / "state.json")
    backend = BatchBackend(make_client(server.base_url, 10), cache, state,
                           base_url=server.base_url, poll_s=0.001, max_rounds=3)
    out = backend.send(reqs, "t")
    assert out.sent == 10 and not out.failed
    first, second = server.batch_inputs.values()
    assert set(first) == {r.key for r in reqs}
    assert set(second) == set(first[4:])  # only the expired ones went again
    assert sum(server.paid.values()) == 10 and max(server.paid.values()) == 1
    assert all(cache.get(r.key) for r in reqs)
    assert state.load() == {}  # finished batches are forgotten


def test_batch_picks_up_an_in_flight_batch_after_a_crash(server, workdir, samples, table):
    cfg = make_cfg(workdir, backend="openai-batch", base_url=server.base_url)
    server.hold_from = 1  # batches stay in progress

    def crash(_seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_interpret(samples, table, cfg, seed=0, counter=COUNTER, sleep=crash,
                      out_dir=workdir / "r", metrics_path=workdir / "m.json")
    recorded = json.loads((workdir / STATE_FILE).read_text())["batches"]
    assert list(recorded) == list(server.batches)  # the in-flight batch, by id
    (batch_id,) = recorded
    server.hold_from = None
    server.held.clear()
    metrics = run_interpret(samples, table, cfg, seed=0, counter=COUNTER,
                            out_dir=workdir / "r", metrics_path=workdir / "m.json")
    # No second upload of the explainer requests: one batch for them, one for scoring.
    assert len(server.batches) == 2 and batch_id in server.batches
    assert metrics["summary"]["n_explained"] == 2
    assert max(server.paid.values()) == 1
    assert json.loads((workdir / STATE_FILE).read_text())["batches"] == {}


def test_batch_crash_while_scoring_picks_up_the_scoring_batch(server, workdir, samples, table):
    cfg = make_cfg(workdir, backend="openai-batch", base_url=server.base_url)
    server.hold_from = 2  # the explainer batch finishes, the scoring batch hangs

    def crash(_seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_interpret(samples, table, cfg, seed=0, counter=COUNTER, sleep=crash,
                      out_dir=workdir / "r", metrics_path=workdir / "m.json")
    assert len(server.batches) == 2
    server.hold_from = None
    server.held.clear()
    metrics = run_interpret(samples, table, cfg, seed=0, counter=COUNTER,
                            out_dir=workdir / "r", metrics_path=workdir / "m.json")
    assert len(server.batches) == 2 and not server.cancelled
    assert metrics["latents"]["7"]["detection"]["balanced_accuracy"] == 1.0
    assert max(server.paid.values()) == 1


def test_batch_no_longer_needed_is_cancelled(server, workdir, samples, table):
    cfg = make_cfg(workdir, backend="openai-batch", base_url=server.base_url)
    server.hold_from = 1

    def crash(_seconds):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_interpret(samples, table, cfg, seed=0, counter=COUNTER, sleep=crash,
                      out_dir=workdir / "r", metrics_path=workdir / "m.json")
    (stale,) = server.batches
    server.hold_from = None  # the stale batch stays held: still running at the rerun
    other = make_cfg(workdir, backend="openai-batch", base_url=server.base_url, max_words=12)
    run_interpret(samples, table, other, seed=0, counter=COUNTER,
                  out_dir=workdir / "r", metrics_path=workdir / "m.json")
    assert server.cancelled == [stale]


def test_batch_id_from_params_is_collected_into_the_cache(server, workdir):
    reqs = _requests(3, server.base_url)
    client = make_client(server.base_url, 10)
    data = "".join(r.batch_line() + "\n" for r in reqs).encode()
    f = client.files.create(file=("x.jsonl", data), purpose="batch")
    bid = client.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                completion_window="24h").id
    cache = ResponseCache(workdir / "c")
    backend = BatchBackend(client, cache, BatchState(workdir / "s.json"),
                           base_url=server.base_url, poll_s=0.001, max_rounds=1, batch_id=bid)
    out = backend.send(reqs[:1], "t")
    assert not out.failed and len(server.batches) == 1
    assert all(cache.get(r.key) for r in reqs)


def test_max_usd_stops_before_anything_is_sent(server, workdir, samples, table):
    cfg = make_cfg(workdir, backend="openai", base_url=server.base_url, max_usd=1e-6)
    with pytest.raises(SaelabError, match=r"interpret\.max_usd"):
        run_interpret(samples, table, cfg, seed=0, counter=COUNTER, out_dir=workdir / "r",
                      metrics_path=workdir / "m.json")
    assert server.chat_calls == 0
    assert (workdir / "r" / "requests.jsonl").read_text().count("\n") == 2


def test_estimate_prices_and_batch_discount():
    reqs = _requests(4, "")
    sync = estimate(reqs, COUNTER, Prices(2.5, 10.0))
    batch = estimate(reqs, COUNTER, Prices(2.5, 10.0, 0.5))
    per_request = 3 + 4 + (len("q 0") + 3) // 4
    assert sync.input_tokens == 4 * per_request and sync.output_tokens == 20
    assert sync.usd == pytest.approx((4 * per_request * 2.5 + 20 * 10.0) / 1e6)
    assert batch.usd == pytest.approx(sync.usd / 2)
    budget = Budget(sync.usd * 1.5, Prices(2.5, 10.0))
    budget.check(sync, "x")
    budget.pay("k", {"usage": {"prompt_tokens": 10**6, "completion_tokens": 0}})
    assert budget.spent == pytest.approx(2.5)
    with pytest.raises(SaelabError, match="already spent"):
        budget.check(sync, "x")


def test_token_counter_falls_back_to_a_labelled_estimate(caplog):
    # tiktoken is made to fail as offline by the autouse fixture in conftest.
    with caplog.at_level(logging.WARNING):
        counter = cost_mod.token_counter("gpt-4o")
    assert not counter.exact and "chars/4" in counter.method
    assert counter.count("abcdefgh") == 2
    assert "chars/4" in caplog.text


def test_batch_input_is_split_within_the_api_limits_and_each_part_resumed(server, workdir,
                                                                         monkeypatch):
    """More requests than one input file may hold go out as several batches, each recorded
    by id; a crash while they run picks every one of them up, and nothing is paid twice."""
    from saelab.interpret import backends

    monkeypatch.setattr(backends, "BATCH_MAX_REQUESTS", 3)
    reqs = _requests(7, server.base_url)
    cache, state = ResponseCache(workdir / "c"), BatchState(workdir / "state.json")
    server.hold_from = 1

    def crash(_seconds):
        raise KeyboardInterrupt

    backend = BatchBackend(make_client(server.base_url, 10), cache, state,
                           base_url=server.base_url, poll_s=0.001, max_rounds=3, sleep=crash)
    with pytest.raises(KeyboardInterrupt):
        backend.send(reqs, "t")
    assert [len(v) for v in server.batch_inputs.values()] == [3, 3, 1]
    assert set(state.load()) == set(server.batches)
    server.hold_from = None
    server.held.clear()
    backend = BatchBackend(make_client(server.base_url, 10), cache, state,
                           base_url=server.base_url, poll_s=0.001, max_rounds=3)
    out = backend.send(reqs, "t")
    assert out.sent == 7 and not out.failed and len(server.batches) == 3
    assert sum(server.paid.values()) == 7 and max(server.paid.values()) == 1
    assert state.load() == {}
