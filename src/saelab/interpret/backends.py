"""Sending requests: synchronous with bounded concurrency, or through the Batch API.

Both write each response to the cache the moment it arrives and return what could not be
had. Neither re-sends a request whose response is cached, so a rerun pays only for what is
missing. Any OpenAI-compatible server works through `base_url` (vLLM, llama.cpp, Ollama).
"""
from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable


from ..core.atomic import read_json, write_text
from ..core.errors import SaelabError
from ..core.progress import Progress
from .cache import Request, ResponseCache, completion_problem
from .cost import Budget

log = logging.getLogger(__name__)

KEY_ENV = "OPENAI_API_KEY"
# Batch API input limits: 50,000 requests and 200 MB per file.
BATCH_MAX_REQUESTS = 50_000
BATCH_MAX_BYTES = 190 * 2**20
_TERMINAL = {"completed", "failed", "expired", "cancelled"}
# State-file name of a batch being created from an input file (its id not known yet).
PENDING = "creating:"


def api_key() -> str:
    """The key from the environment, or a SaelabError saying how to provide it or do without."""
    key = os.environ.get(KEY_ENV)
    if not key:
        raise SaelabError(
            f"interpret needs an API key in the {KEY_ENV} environment variable (for a local "
            f"OpenAI-compatible server at interpret.base_url, set it to any value); or set "
            "interpret.backend=none to write the dashboards and the ready-to-send request "
            "file without calling any API")
    return key


def check_base_url(base_url: str) -> None:
    """Refuse an endpoint the client would reject on every request (no scheme)."""
    if base_url and not base_url.startswith(("http://", "https://")):
        raise SaelabError(f"interpret.base_url = {base_url!r} is not an http:// or https:// "
                          "URL; write it in full, e.g. http://127.0.0.1:8000/v1, or leave it "
                          "empty for OpenAI")


def make_client(base_url: str, timeout_s: float):
    """An OpenAI client with its own retries off: we retry, so we can count and cap them."""
    from openai import OpenAI

    return OpenAI(api_key=api_key(), base_url=base_url or None, max_retries=0, timeout=timeout_s)


def _retryable(status: int | None) -> bool:
    return status is None or status in (408, 409, 429) or status >= 500


def _fatal(e: Exception) -> SaelabError | None:
    """Errors no retry can fix: bad key, no permission, no quota left."""
    import openai

    if isinstance(e, (openai.AuthenticationError, openai.PermissionDeniedError)):
        return SaelabError(f"the API refused the key in {KEY_ENV} ({e.status_code}: "
                           f"{e.message}); check the key and interpret.base_url")
    if isinstance(e, openai.RateLimitError) and getattr(e, "code", None) == "insufficient_quota":
        return SaelabError(f"the API account has no quota left ({e.message}); add credit or "
                           "use interpret.backend=none")
    return None


CAP_REACHED = "not sent: interpret.max_usd is reached"


@dataclass
class Outcome:
    sent: int = 0  # requests answered now (paid), not counting cached ones
    failed: dict[str, str] = field(default_factory=dict)  # key -> why


class SyncBackend:
    """Requests in parallel threads, each retried with exponential backoff and jitter."""

    def __init__(self, client, cache: ResponseCache, *, concurrency: int, max_retries: int,
                 retry_base_s: float, sleep: Callable[[float], None] = time.sleep,
                 budget: Budget | None = None):
        self.client, self.cache, self.budget = client, cache, budget
        self.concurrency, self.max_retries, self.retry_base_s = concurrency, max_retries, retry_base_s
        self.sleep = sleep

    def _delay(self, attempt: int, error: Exception) -> float:
        delay = min(60.0, self.retry_base_s * 2 ** attempt) * random.uniform(0.5, 1.5)
        response = getattr(error, "response", None)
        after = response.headers.get("retry-after") if response is not None else None
        try:
            return min(60.0, max(delay, float(after))) if after else delay
        except ValueError:
            return delay

    def _one(self, r: Request) -> str | None:
        """Send one request; None when its response is cached, else why it failed."""
        import openai

        why = "not sent"
        bound = self.budget.estimate(r) if self.budget else 0.0
        for attempt in range(self.max_retries + 1):
            if self.budget and not self.budget.reserve(bound):
                return CAP_REACHED
            try:
                raw = self.client.chat.completions.with_raw_response.create(**r.body)
            except openai.APIError as e:
                if self.budget:
                    self.budget.release(bound)
                fatal = _fatal(e)
                if fatal:
                    raise fatal from None
                status = getattr(e, "status_code", None)
                why = f"HTTP {status}: {e.message}" if status else f"{type(e).__name__}: {e}"
                if not _retryable(status):
                    return why
                if attempt < self.max_retries:
                    self.sleep(self._delay(attempt, e))
                continue
            try:
                body = json.loads(raw.text)
            except json.JSONDecodeError:
                body = None
            if self.budget:  # a 200 is paid for, whatever it holds
                self.budget.release(bound)
                self.budget.pay(r.key, body, bound)
            problem = "a body that is not JSON" if body is None else completion_problem(body)
            if problem is None:
                self.cache.put(r.key, body)
                return None
            why = f"the server answered 200 with {problem}"
            if attempt < self.max_retries:
                self.sleep(self._delay(attempt, RuntimeError(why)))
        return f"{why} (after {self.max_retries + 1} attempts)"

    def send(self, requests: list[Request], desc: str) -> Outcome:
        out = Outcome()
        if not requests:
            return out
        pool = ThreadPoolExecutor(max_workers=self.concurrency)
        try:
            futures = {pool.submit(self._one, r): r for r in requests}
            with Progress(desc, len(futures), unit="request", rate_unit="requests") as bar:
                for fut in as_completed(futures):
                    why = fut.result()
                    if why is None:
                        out.sent += 1
                    else:
                        out.failed[futures[fut].key] = why
                    bar.update(failed=len(out.failed))
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
        return out


class BatchState:
    """In-flight batches, on disk under .saelab/ so a crashed run finds them by id."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()

    def load(self) -> dict[str, dict[str, Any]]:
        data = read_json(self.path)
        if data is None:
            if self.path.exists():
                log.warning("ignoring unreadable batch state file %s", self.path)
            return {}
        return data.get("batches", {})

    def _save(self, batches: dict[str, dict[str, Any]]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        write_text(self.path, json.dumps({"batches": batches}, indent=1))

    def add(self, batch_id: str, entry: dict[str, Any]) -> None:
        with self.lock:
            batches = self.load()
            batches[batch_id] = entry
            self._save(batches)

    def remove(self, batch_id: str) -> None:
        with self.lock:
            batches = self.load()
            if batches.pop(batch_id, None) is not None:
                self._save(batches)


def _chunks(requests: list[Request]) -> Iterable[list[Request]]:
    chunk: list[Request] = []
    size = 0
    for r in requests:
        n = len(r.batch_line().encode("utf-8")) + 1
        if chunk and (len(chunk) == BATCH_MAX_REQUESTS or size + n > BATCH_MAX_BYTES):
            yield chunk
            chunk, size = [], 0
        chunk.append(r)
        size += n
    if chunk:
        yield chunk


class BatchBackend:
    """The Batch API lifecycle: upload JSONL, create, poll, download, join on custom_id.

    custom_id is the request's cache key, so every output line lands in the cache on its
    own, whichever run or batch produced it. Failed and expired requests are resubmitted
    in a new batch (at most `max_rounds` times). A batch recorded in the state file (or
    named by interpret.batch_id) is picked up instead of resubmitting its requests; one
    that holds no request the run needed is cancelled at its end (`cancel_stale`).
    """

    def __init__(self, client, cache: ResponseCache, state: BatchState, *, base_url: str,
                 poll_s: float, max_rounds: int, batch_id: str = "",
                 sleep: Callable[[float], None] = time.sleep, budget: Budget | None = None):
        self.client, self.cache, self.state, self.budget = client, cache, state, budget
        self.base_url, self.poll_s, self.max_rounds = base_url.rstrip("/"), poll_s, max_rounds
        self.batch_id, self.sleep = batch_id, sleep
        self._named_done = False  # interpret.batch_id is waited for once per run

    # -- one batch -------------------------------------------------------------------

    def _submit(self, requests: list[Request], desc: str) -> dict[str, set[str] | None]:
        import openai

        created: dict[str, set[str] | None] = {}
        for chunk in _chunks(requests):
            if self.budget:
                self.budget.check_requests(chunk, f"a batch of {len(chunk)} {desc} requests")
            data = ("\n".join(r.batch_line() for r in chunk) + "\n").encode("utf-8")
            f = self.client.files.create(file=("saelab-interpret.jsonl", data), purpose="batch")
            keys = [r.key for r in chunk]
            entry = {"base_url": self.base_url, "input_file_id": f.id,
                     "created_at": int(time.time()), "what": desc, "keys": keys}
            # Recorded before the batch exists: if creating it times out, the API may have
            # created it anyway, and the rerun finds it by its input file instead of paying
            # for the same requests again.
            pending = PENDING + f.id
            self.state.add(pending, entry)
            try:
                batch = self.client.batches.create(
                    input_file_id=f.id, endpoint="/v1/chat/completions",
                    completion_window="24h",
                    metadata={"source": "saelab interpret", "what": desc[:500]})
            except (openai.APIConnectionError, openai.InternalServerError) as e:
                batch = self._batch_of_file(f.id)
                if batch is None:
                    raise SaelabError(
                        f"creating the batch for input file {f.id} failed ({e}); the API may "
                        "still create it, so it is recorded: rerun, and the rerun takes that "
                        "batch if it exists instead of submitting the requests again") from None
                log.warning("creating a batch timed out, but the API made it: %s", batch.id)
            self.state.add(batch.id, entry)
            self.state.remove(pending)
            log.info("submitted batch %s (%d requests, %s); a crashed run picks it up by id",
                     batch.id, len(chunk), desc)
            created[batch.id] = set(keys)
        return created

    def _lines(self, file_id: str | None) -> list[dict[str, Any]]:
        import openai

        if not file_id:
            return []
        try:
            text = self.client.files.content(file_id).text
        except openai.NotFoundError:
            # Batch files expire (30 days by default); their requests are sent again.
            log.warning("batch file %s is gone; its requests will be resubmitted", file_id)
            return []
        out = []
        for line in text.splitlines():
            if line.strip():
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    log.warning("skipping a malformed line in batch file %s", file_id)
        return out

    def _batch_of_file(self, file_id: str):
        """The batch made from input file `file_id`, if the API has one."""
        for batch in self.client.batches.list(limit=100):
            if batch.input_file_id == file_id:
                return batch
        return None

    def _collect(self, batch, outcome: Outcome, permanent: set[str]) -> None:
        """Cache a finished batch's answers; note its failures; forget the batch."""
        if batch.status == "failed" and not batch.output_file_id:
            errors = "; ".join(f"{e.code}: {e.message}" for e in (batch.errors.data or [])
                               ) if batch.errors else "no reason given"
            self.state.remove(batch.id)
            raise SaelabError(f"batch {batch.id} was rejected by the API ({errors}); the "
                              "requests are in reports/interpret/requests.jsonl")
        for line in self._lines(batch.output_file_id) + self._lines(batch.error_file_id):
            key = line.get("custom_id")
            if not key:
                continue
            response = line.get("response") or {}
            status = response.get("status_code")
            body = response.get("body")
            if status == 200:
                if self.budget:
                    self.budget.pay(key, body)
                problem = completion_problem(body)
                if problem is None:
                    self.cache.put(key, body)
                    outcome.sent += 1
                    outcome.failed.pop(key, None)
                else:  # resubmitted in the next round, like an expired request
                    outcome.failed[key] = f"200 with {problem}"
                continue
            error = line.get("error") or (body if isinstance(body, dict) else {}).get("error") or {}
            if not isinstance(error, dict):
                error = {"message": str(error)}
            outcome.failed[key] = f"{status or error.get('code', 'error')}: {error.get('message', '')}"
            if status is not None and not _retryable(status):
                permanent.add(key)
        self.state.remove(batch.id)

    def _wait(self, active: dict[str, set[str] | None], outcome: Outcome,
              permanent: set[str], desc: str) -> None:
        total = sum(len(k) for k in active.values() if k) or None
        bar = Progress(f"{desc} (batch)", total, unit="request", rate_unit="requests",
                       every_s=max(60.0, self.poll_s))
        try:
            while active:
                done = 0
                for bid in list(active):
                    batch = self.client.batches.retrieve(bid)
                    counts = batch.request_counts
                    done += (counts.completed + counts.failed) if counts else 0
                    if batch.status in _TERMINAL:
                        log.info("batch %s %s (%s)", bid, batch.status,
                                 f"{counts.completed} done, {counts.failed} failed" if counts else "")
                        self._collect(batch, outcome, permanent)
                        del active[bid]
                bar.update((done if total is None else min(done, total)) - bar.n)
                if active:
                    self.sleep(self.poll_s)
        finally:
            bar.close()

    # -- the lifecycle ---------------------------------------------------------------

    def _recorded(self) -> dict[str, dict[str, Any]]:
        return {bid: e for bid, e in self.state.load().items()
                if e.get("base_url", "") == self.base_url}

    def _adopt(self, needed: set[str], outcome: Outcome,
               permanent: set[str]) -> dict[str, set[str] | None]:
        """Batches left by an earlier run: collect the finished ones, wait for the in-flight
        ones that hold needed requests; leave the others to `cancel_stale`."""
        import openai

        recorded = self._recorded()
        for name in [n for n in recorded if n.startswith(PENDING)]:
            entry = recorded.pop(name)
            batch = self._batch_of_file(entry["input_file_id"])
            self.state.remove(name)
            if batch is None:
                log.info("the batch an earlier run was creating from %s was never made",
                         entry["input_file_id"])
                continue
            log.info("found batch %s, whose creation timed out in an earlier run", batch.id)
            self.state.add(batch.id, entry)
            recorded[batch.id] = entry
        if self.batch_id and not self._named_done and self.batch_id not in recorded:
            recorded[self.batch_id] = {"keys": None}  # named by the user: wait for it whole
        self._named_done = True
        active: dict[str, set[str] | None] = {}
        for bid, entry in recorded.items():
            keys = set(entry["keys"]) if entry.get("keys") is not None else None
            try:
                batch = self.client.batches.retrieve(bid)
            except openai.NotFoundError:
                if bid == self.batch_id:
                    raise SaelabError(f"interpret.batch_id = {bid} is not known to the API at "
                                      "this base_url with this key; check or clear it") from None
                log.warning("forgetting batch %s: the API does not know it", bid)
                self.state.remove(bid)
                continue
            if batch.status in _TERMINAL:
                log.info("collecting batch %s (%s) left by an earlier run", bid, batch.status)
                self._collect(batch, outcome, permanent)
            elif keys is None or keys & needed:
                log.info("picking up in-flight batch %s (%s) instead of resubmitting", bid,
                         batch.status)
                active[bid] = keys
        return active

    def cancel_stale(self) -> None:
        """At the end of a run: batches still in flight hold no request this run needed
        (it waited for all that did), e.g. after a crash and a change of params. Cancel them
        to stop paying; their finished part is collected by the next run."""
        for bid in self._recorded():
            if bid == self.batch_id or bid.startswith(PENDING):
                continue
            batch = self.client.batches.retrieve(bid)
            if batch.status not in _TERMINAL and batch.status != "cancelling":
                log.warning("cancelling batch %s: none of its requests is needed with the "
                            "current params", bid)
                self.client.batches.cancel(bid)

    def send(self, requests: list[Request], desc: str) -> Outcome:
        outcome = Outcome()
        permanent: set[str] = set()
        by_key = {r.key: r for r in requests}
        active = self._adopt(set(by_key), outcome, permanent)
        rounds = 0
        while True:
            if active:
                self._wait(active, outcome, permanent, desc)
            missing = [r for k, r in by_key.items()
                       if k not in permanent and self.cache.get(k) is None]
            if not missing:
                break
            if rounds > self.max_rounds:
                for r in missing:
                    outcome.failed.setdefault(r.key, "no answer from the batch")
                    outcome.failed[r.key] += f" (after {rounds} batches)"
                break
            if rounds:
                log.info("resubmitting %d failed or expired requests", len(missing))
            active = self._submit(missing, desc)
            rounds += 1
        for k in list(outcome.failed):
            if k not in by_key or self.cache.get(k) is not None:
                del outcome.failed[k]
        return outcome


def request_file_lines(requests: Iterable[Request]) -> str:
    """A Batch API input file (one JSON request per line)."""
    return "".join(r.batch_line() + "\n" for r in requests)

