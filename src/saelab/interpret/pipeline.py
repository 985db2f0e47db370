"""The interpret stage's work, from sampled windows to scores, report and metrics.

It takes the windows already sampled (no store, no SAE), so tests can drive it with
planted features. Order of events: build every explainer request and write the request
file; estimate the cost of what is not cached and stop if it could pass the cap; send
(or, with backend `none`, stop there); parse explanations; build, estimate, send and
parse the scoring requests; write the report and the metrics.
"""
from __future__ import annotations

import json
import logging
import statistics
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..core import paths
from ..core.atomic import sweep_dead_writers, write_text
from ..core.config import InterpretCfg
from ..core.errors import SaelabError
from ..core.tracking import log_artifact, log_metrics, repo_root
from .backends import (CAP_REACHED, BatchBackend, BatchState, SyncBackend, make_client,
                       request_file_lines)
from .cache import Request, ResponseCache
from .cost import Budget, Estimate, Ledger, Prices, TokenCounter, estimate, token_counter
from .models import Explainer, explainer
from .decode import activation_mask, highlight, render
from .prompts import explain_body, parse_explanation
from .report import write_report
from .results import LatentResult
from .sampling import LatentSamples
from .scoring import SCORERS, ScorePrompt, build_prompts, detection_items, fuzzing_items, score

log = logging.getLogger(__name__)

# In-flight batches of this workspace (not the shared cache's root: parallel queued
# experiments would otherwise take each other's batches for stale ones and cancel them).
STATE_FILE = paths.STATE_DIR / "interpret" / "batches.json"
LEDGER = "ledger.jsonl"  # beside the cached answers it paid for


def _explain_request(s: LatentSamples, table: list[bytes], cfg: InterpretCfg,
                     llm: Explainer) -> Request:
    texts = [highlight(render(w.tokens, table), activation_mask(w.acts, cfg.highlight_frac))
             for w in s.explain]
    body = explain_body(cfg.model, texts, max_words=cfg.max_words,
                        chain_of_thought=cfg.chain_of_thought, n_completions=cfg.n_completions,
                        temperature=cfg.temperature, language=cfg.explanation_language,
                        reasoning_effort=llm.reasoning_effort)
    return Request.make(body, cfg.base_url)


def _score_prompts(r: LatentResult, explanation: str, table: list[bytes], cfg: InterpretCfg,
                   llm: Explainer, seed: int) -> list[ScorePrompt]:
    """Deterministic in (seed, latent, scorer), so a rerun builds the same, cached requests."""
    prompts = []
    for k, scorer in enumerate(cfg.scorers):
        rng = np.random.default_rng([seed, r.latent, k])
        if scorer == "detection":
            items = detection_items(r.samples, table)
        else:
            items = fuzzing_items(r.samples, table, cfg.highlight_frac, rng)
        prompts += build_prompts(r.samples, scorer, explanation, items, model=cfg.model,
                                 per_prompt=cfg.examples_per_prompt, logprobs=llm.logprobs,
                                 base_url=cfg.base_url, rng=rng,
                                 reasoning_effort=llm.reasoning_effort)
    return prompts


def _parse(r: LatentResult, response: dict[str, Any] | None, max_words: int) -> None:
    if response is None:
        return
    texts = [(c.get("message") or {}).get("content") for c in response.get("choices") or []
             if isinstance(c, dict)]
    r.completions = [parse_explanation(t, max_words) for t in texts]
    r.explanation = next((e for e in r.completions if e), None)
    if r.explanation is None:
        r.error = "no explanation could be parsed from the reply: " + repr((texts or [""])[0])[:200]


def _cache_dir(configured: str) -> Path:
    """A relative cache_dir is under the user's repository root, so the temp-dir copies
    that `dvc exp run --queue` executes in share the cache (and never pay twice)."""
    path = Path(configured)
    return path if path.is_absolute() else repo_root() / path


def _uncached(requests: list[Request], cache: ResponseCache) -> list[Request]:
    seen: set[str] = set()
    out = []
    for r in requests:
        if r.key not in seen and cache.get(r.key) is None:
            seen.add(r.key)
            out.append(r)
    return out


def failed_detection(results: list[LatentResult], min_detection: float) -> list[int]:
    """Latents whose explanation does not pick out their held-out windows (detection
    balanced accuracy below `min_detection`): a label that does not transfer."""
    return [r.latent for r in results
            if (r.scores.get("detection") or {}).get("balanced_accuracy") is not None
            and r.scores["detection"]["balanced_accuracy"] < min_detection]


def _summary(results: list[LatentResult], cfg: InterpretCfg) -> dict[str, Any]:
    scorers = cfg.scorers
    out: dict[str, Any] = {
        "n_latents": len(results),
        "n_skipped": sum(bool(r.samples.skipped) for r in results),
        "n_explained": sum(r.explanation is not None for r in results),
        "n_failed": sum(bool(r.error) for r in results),
        "n_failed_detection": len(failed_detection(results, cfg.min_detection)),
    }
    for scorer in scorers:
        for metric in ("balanced_accuracy", "auc"):
            vals = [r.scores[scorer][metric] for r in results
                    if scorer in r.scores and r.scores[scorer][metric] is not None]
            if vals:
                out[f"{scorer}_{metric}_mean"] = float(np.mean(vals))
                out[f"{scorer}_{metric}_median"] = float(statistics.median(vals))
    return out


def _latent_metrics(r: LatentResult) -> dict[str, Any]:
    s = r.samples
    return {"density": s.density, "n_fired": s.n_fired, "max_act": s.max_act,
            "skipped": s.skipped or None, "explanation": r.explanation,
            "error": r.error or None, **r.scores}


class _Sender:
    """Sends through the configured backend and books what the new answers cost."""

    def __init__(self, cfg: InterpretCfg, cache: ResponseCache, budget: Budget,
                 counter: TokenCounter, sleep: Callable[[float], None]):
        client = make_client(cfg.base_url, cfg.timeout_s)
        self.cache, self.budget, self.counter = cache, budget, counter
        self.sent = 0
        if cfg.backend == "openai-batch":
            self.backend = BatchBackend(client, cache, BatchState(STATE_FILE),
                                        base_url=cfg.base_url, poll_s=cfg.poll_s,
                                        max_rounds=cfg.max_retries, batch_id=cfg.batch_id,
                                        sleep=sleep, budget=budget)
        else:
            self.backend = SyncBackend(client, cache, concurrency=cfg.concurrency,
                                       max_retries=cfg.max_retries,
                                       retry_base_s=cfg.retry_base_s, sleep=sleep,
                                       budget=budget)
        self.base_url = cfg.base_url

    def send(self, todo: list[Request], what: str) -> None:
        self.budget.check(estimate(todo, self.counter, self.budget.prices), what)
        outcome = self.backend.send(todo, what)
        self.sent += outcome.sent
        if any(why == CAP_REACHED for why in outcome.failed.values()):
            raise self.budget.exhausted_error()
        if outcome.failed:
            first = next(iter(outcome.failed.values()))
            if not outcome.sent and len(outcome.failed) == len(todo):
                # Exit non-zero, so DVC does not record the stage as done with no answers.
                raise SaelabError(
                    f"all {len(todo)} {what} requests failed (e.g. {first}); check that the "
                    f"server at interpret.base_url = {self.base_url or 'OpenAI'!r} is up and "
                    "answers chat completions, then rerun (paid answers are cached)")
            log.warning("%d %s requests got no answer (e.g. %s); rerun to retry them",
                        len(outcome.failed), what, first)


def _plan(live: list[LatentResult], explain: dict[int, Request], table: list[bytes],
          cfg: InterpretCfg, llm: Explainer, seed: int, cache: ResponseCache,
          counter: TokenCounter, prices: Prices):
    """Cost of what is not cached: the explanations and the scoring they lead to (with a
    stand-in explanation of max_words words where the real one is not known yet)."""
    stand_in = " ".join(["palabra"] * cfg.max_words)
    scoring: list[Request] = []
    for r in live:
        probe = LatentResult(r.samples)
        _parse(probe, cache.get(explain[r.latent].key), cfg.max_words)
        scoring += [p.request for p in
                    _score_prompts(r, probe.explanation or stand_in, table, cfg, llm, seed)]
    keys = {r.key for r in explain.values()} | {r.key for r in scoring}
    return (estimate(_uncached(list(explain.values()), cache), counter, prices)
            + estimate(_uncached(scoring, cache), counter, prices)), keys


def estimate_all(samples: list[LatentSamples], table: list[bytes], cfg: InterpretCfg, *,
                 seed: int, counter: TokenCounter, llm: Explainer, batch: bool) -> Estimate:
    """What explaining and scoring every sampled latent would cost with nothing cached
    (the figure the stage prints before it sends anything)."""
    live = [LatentResult(s) for s in samples if not s.skipped]
    explain = {r.latent: _explain_request(r.samples, table, cfg, llm) for r in live}
    return _plan(live, explain, table, cfg, llm, seed, _NothingCached(), counter,
                 llm.prices(batch=batch))[0]


class _NothingCached:
    def get(self, key: str) -> None:
        return None


def _explain_and_score(live: list[LatentResult], explain: dict[int, Request],
                       table: list[bytes], cfg: InterpretCfg, llm: Explainer, seed: int,
                       sender: _Sender, cache: ResponseCache) -> list[Request]:
    """Fill in explanations and scores; returns the scoring requests."""
    sender.send(_uncached(list(explain.values()), cache), "explanations")
    for r in live:
        _parse(r, cache.get(explain[r.latent].key), cfg.max_words)
        if r.explanation is None and not r.error:
            r.error = "no answer from the API"
    prompts = {r.latent: _score_prompts(r, r.explanation, table, cfg, llm, seed)
               for r in live if r.explanation}
    requests = [p.request for ps in prompts.values() for p in ps]
    sender.send(_uncached(requests, cache), "scoring")
    if isinstance(sender.backend, BatchBackend):
        sender.backend.cancel_stale()
    for r in live:
        if r.latent in prompts:
            responses = {p.request.key: cache.get(p.request.key) for p in prompts[r.latent]}
            for scorer in cfg.scorers:
                r.scores[scorer] = score([p for p in prompts[r.latent] if p.scorer == scorer],
                                         responses)
    return requests


def _write_outputs(results: list[LatentResult], table: list[bytes], cfg: InterpretCfg,
                   llm: Explainer, cost: dict[str, Any], out_dir: Path,
                   metrics_path: Path) -> dict[str, Any]:
    summary = _summary(results, cfg)
    metrics = {"backend": cfg.backend, "model": cfg.model,
               "reasoning_effort": llm.reasoning_effort,
               "explanation_language": cfg.explanation_language,
               "auc_note": llm.auc_note or None,
               "failed_detection": failed_detection(results, cfg.min_detection),
               "summary": summary, "cost": cost,
               "latents": {str(r.latent): _latent_metrics(r) for r in results}}
    write_text(out_dir / "explanations.json", json.dumps(
        [{"latent": r.latent, "explanation": r.explanation, "completions": r.completions,
          "error": r.error or None, "skipped": r.samples.skipped or None, "scores": r.scores}
         for r in results], indent=1, ensure_ascii=False))
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    write_text(metrics_path, json.dumps(metrics, indent=1, ensure_ascii=False))
    write_report(out_dir, results, table, cfg, summary, cost, llm,
                 failed_detection(results, cfg.min_detection))
    # Not under "interpret.": the params are (interpret.n_latents is one of each).
    log_metrics({"interpret_summary": summary, "cost": cost})
    for r in results:  # per-latent scores as MLflow series over the latent id
        log_metrics({f"latent.{scorer}": sc for scorer, sc in r.scores.items()}, step=r.latent)
    log_artifact(out_dir)
    log_artifact(metrics_path)
    return metrics


def run_interpret(samples: list[LatentSamples], table: list[bytes], cfg: InterpretCfg, *,
                  seed: int, out_dir: Path = paths.INTERPRET_DIR,
                  metrics_path: Path = paths.INTERPRET_METRICS,
                  counter: TokenCounter | None = None, llm: Explainer | None = None,
                  sleep: Callable[[float], None] = time.sleep) -> dict[str, Any]:
    """Explain and score the sampled latents; write the report and the metrics."""
    unknown = [s for s in cfg.scorers if s not in SCORERS]
    if unknown:
        raise SaelabError(f"interpret.scorers has unknown scorer(s) {unknown}; "
                          f"choose from {list(SCORERS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # A run killed mid-write leaves its temp files (requests.jsonl, a page, the metrics) behind.
    sweep_dead_writers(out_dir)
    sweep_dead_writers(Path(metrics_path).parent, f".{Path(metrics_path).name}.*.tmp")
    llm = llm or explainer(cfg)
    if llm.auc_note:
        log.info("%s", llm.auc_note)
    cache = ResponseCache(_cache_dir(cfg.cache_dir))
    counter = counter or token_counter(cfg.model)
    prices = llm.prices(batch=cfg.backend == "openai-batch")
    results = [LatentResult(s) for s in samples]
    live = [r for r in results if not r.samples.skipped]
    for r in results:
        if r.samples.skipped:
            log.info("latent %d skipped: %s", r.latent, r.samples.skipped)

    explain = {r.latent: _explain_request(r.samples, table, cfg, llm) for r in live}
    request_file = out_dir / "requests.jsonl"
    write_text(request_file, request_file_lines(explain.values()))
    plan, plan_keys = _plan(live, explain, table, cfg, llm, seed, cache, counter, prices)
    cost: dict[str, Any] = {
        "token_count_method": plan.method, "token_count_exact": counter.exact,
        "estimated_input_tokens": plan.input_tokens,
        "estimated_output_tokens_max": plan.output_tokens,
        "estimated_usd": plan.usd, "batch_discount_applied": prices.discount,
        "model_priced": llm.listed,
        "max_usd": cfg.max_usd, "requests_planned": plan.n_requests,
    }
    if cfg.backend == "none":
        batch_usd = llm.prices(batch=True).usd(plan.input_tokens, plan.output_tokens)
        cost["estimated_usd_batch"] = batch_usd
        log.info("backend none: NO explanations were requested. %d ready-to-send explainer "
                 "requests are in %s (Batch API format). Estimated cost of explaining and "
                 "scoring: <= $%.4f synchronous, <= $%.4f with the Batch API (%s). Set "
                 "interpret.backend=openai or openai-batch and OPENAI_API_KEY to run them.",
                 len(explain), request_file, plan.usd, batch_usd, plan.describe())
    else:
        log.info("interpret plan: %s", plan.describe())
        # The ledger covers this run's request set: what earlier runs paid for the same
        # requests counts against the cap, what other request sets paid does not.
        budget = Budget(cfg.max_usd, prices, Ledger(cache.dir / LEDGER), plan_keys, counter)
        budget.check(plan, "this run")
        sender = _Sender(cfg, cache, budget, counter, sleep)
        scoring = _explain_and_score(live, explain, table, cfg, llm, seed, sender, cache)
        write_text(request_file, request_file_lines(list(explain.values()) + scoring))
        cost.update(spent_usd=budget.spent, spent_usd_total=budget.total,
                    requests_sent=sender.sent)
    return _write_outputs(results, table, cfg, llm, cost, out_dir, Path(metrics_path))
