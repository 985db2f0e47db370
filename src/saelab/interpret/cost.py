"""Token and dollar estimates before anything is sent, and the spending cap.

Input tokens are counted with tiktoken's encoding for the model (o200k_base for gpt-4o).
tiktoken downloads that file on first use; offline, or when the download hangs, we fall
back to a labelled chars/4 estimate (tiktoken reads a pre-downloaded encoding from
TIKTOKEN_CACHE_DIR, which gives exact counts offline). Output tokens are the requests' `max_tokens`: an
upper bound, so the cap errs on the side of stopping. What is actually paid is the `usage`
each answer reports, booked in an on-disk ledger the moment it arrives.
"""
from __future__ import annotations

import functools
import json
import logging
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from ..core.errors import SaelabError
from .cache import Request

log = logging.getLogger(__name__)

# OpenAI's chat format adds a few tokens per message and to prime the reply.
_PER_MESSAGE = 4
_PER_REPLY = 3


@dataclass(frozen=True)
class TokenCounter:
    method: str  # how tokens are counted, shown in the log and the report
    count: Callable[[str], int]
    exact: bool


def _chars_over_4(text: str) -> int:
    return (len(text) + 3) // 4


@functools.lru_cache(maxsize=8)
def token_counter(model: str, timeout_s: float = 10.0) -> TokenCounter:
    """tiktoken's encoding for `model` if it can be had within `timeout_s`, else chars/4."""
    box: dict[str, Any] = {}

    def load():
        try:
            import tiktoken

            try:
                box["enc"] = tiktoken.encoding_for_model(model)
            except KeyError:  # a model tiktoken does not know (a local server's)
                box["enc"] = tiktoken.get_encoding("o200k_base")
        except Exception as e:  # noqa: BLE001 - any failure means "not available"
            box["err"] = e

    # tiktoken's download has no timeout; a daemon thread lets a blocked network not block us.
    t = threading.Thread(target=load, daemon=True)
    t.start()
    t.join(timeout_s)
    enc = box.get("enc")
    if enc is None:
        why = box.get("err") or f"no answer within {timeout_s:.0f} s"
        log.warning("tiktoken encoding for %s unavailable (%s); token counts are a chars/4 "
                    "estimate", model, str(why)[:120])
        return TokenCounter("chars/4 estimate (tiktoken encoding not available offline)",
                            _chars_over_4, exact=False)
    return TokenCounter(f"tiktoken {enc.name}", lambda s: len(enc.encode(s, disallowed_special=())),
                        exact=True)


@dataclass(frozen=True)
class Prices:
    in_per_mtok: float
    out_per_mtok: float
    discount: float = 0.0  # the Batch API's price cut, 0.5 = half price
    # Input tokens the provider served from its prompt cache (reported in `usage`).
    cached_in_per_mtok: float | None = None

    def usd(self, input_tokens: int, output_tokens: int, cached_tokens: int = 0) -> float:
        cached_price = self.in_per_mtok if self.cached_in_per_mtok is None else self.cached_in_per_mtok
        cached = min(cached_tokens, input_tokens)
        full = ((input_tokens - cached) * self.in_per_mtok + cached * cached_price
                + output_tokens * self.out_per_mtok) / 1e6
        return full * (1.0 - self.discount)


@dataclass(frozen=True)
class Estimate:
    n_requests: int
    input_tokens: int
    output_tokens: int  # upper bound: max_tokens x completions
    usd: float
    method: str

    def __add__(self, other: "Estimate") -> "Estimate":
        return Estimate(self.n_requests + other.n_requests,
                        self.input_tokens + other.input_tokens,
                        self.output_tokens + other.output_tokens, self.usd + other.usd,
                        self.method)

    def describe(self) -> str:
        return (f"{self.n_requests} requests, {self.input_tokens:,} input tokens "
                f"({self.method}), <= {self.output_tokens:,} output tokens, <= ${self.usd:.4f}")


def estimate(requests: Iterable[Request], counter: TokenCounter, prices: Prices) -> Estimate:
    n = tin = tout = 0
    for r in requests:
        n += 1
        tin += _PER_REPLY + sum(_PER_MESSAGE + counter.count(m["content"])
                                for m in r.body["messages"])
        limit = r.body.get("max_completion_tokens", r.body.get("max_tokens", 0))
        tout += int(limit) * int(r.body.get("n", 1))
    return Estimate(n, tin, tout, prices.usd(tin, tout), counter.method)


def usage_usd(response: Any, prices: Prices) -> float | None:
    """Dollars by the response's own `usage`, or None when it reports none."""
    usage = response.get("usage") if isinstance(response, dict) else None
    if not isinstance(usage, dict):
        return None
    try:
        details = usage.get("prompt_tokens_details")
        cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
        return prices.usd(int(usage.get("prompt_tokens") or 0),
                          int(usage.get("completion_tokens") or 0), cached)
    except (TypeError, ValueError):
        return None


class Ledger:
    """What every answer cost, per request key, appended to a JSONL file beside the response
    cache: spending survives reruns (and crashes), so interpret.max_usd caps the total paid
    for a set of requests over every run, not each run on its own."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._paid: dict[str, float] = defaultdict(float)
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            try:
                entry = json.loads(line)
                self._paid[str(entry["key"])] += float(entry["usd"])
            except (ValueError, KeyError, TypeError):
                continue  # a line torn by a killed writer

    def spent(self, keys: Iterable[str]) -> float:
        with self._lock:
            return sum(self._paid.get(k, 0.0) for k in set(keys))

    def record(self, key: str, usd: float) -> None:
        line = json.dumps({"key": key, "usd": usd}) + "\n"
        with self._lock:
            self._paid[key] += usd
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # One short append per answer: O_APPEND keeps lines whole across processes.
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(line)


class Budget:
    """Dollars against interpret.max_usd: what earlier runs paid for this run's requests
    (the ledger) plus what this run pays, booked from each answer's `usage` as it arrives.
    Each request reserves its upper-bound estimate before it is sent, so requests in
    flight together can never take the total past the cap by their estimates."""

    def __init__(self, max_usd: float, prices: Prices, ledger: Ledger | None = None,
                 keys: Iterable[str] = (), counter: TokenCounter | None = None):
        self.max_usd, self.prices, self.ledger, self.counter = max_usd, prices, ledger, counter
        self.prior = ledger.spent(keys) if ledger is not None else 0.0
        self.spent = 0.0  # this run
        self.reserved = 0.0
        self.refused = 0  # requests not sent because the cap was reached
        self._lock = threading.Lock()

    @property
    def total(self) -> float:
        return self.prior + self.spent

    def check(self, planned: Estimate, what: str) -> None:
        """Stop before sending `planned` if it could take the total past the cap."""
        if self.total + planned.usd > self.max_usd:
            raise SaelabError(
                f"{what} would cost up to ${planned.usd:.4f} ({planned.describe()}); with "
                f"${self.total:.4f} already spent on these requests (this and earlier runs) "
                f"that exceeds interpret.max_usd = ${self.max_usd:.2f}. Raise "
                "interpret.max_usd, lower interpret.n_latents or the example counts, use "
                "interpret.backend=openai-batch for the batch discount, or "
                "interpret.backend=none to write the request file only")

    def check_requests(self, requests: list[Request], what: str) -> None:
        if self.counter:
            self.check(estimate(requests, self.counter, self.prices), what)

    def estimate(self, request: Request) -> float:
        return estimate([request], self.counter, self.prices).usd if self.counter else 0.0

    def reserve(self, usd: float) -> bool:
        """Hold `usd` for a request about to be sent; False (and it is not sent) when that
        could pass the cap."""
        with self._lock:
            if self.total + self.reserved + usd > self.max_usd:
                self.refused += 1
                return False
            self.reserved += usd
            return True

    def release(self, usd: float) -> None:
        with self._lock:
            self.reserved -= usd

    def pay(self, key: str, response: Any, fallback_usd: float = 0.0) -> None:
        """Book an answer (well-formed or not: a 200 is paid for) by its `usage`, or by
        `fallback_usd` (the request's upper bound) when it reports none."""
        usd = usage_usd(response, self.prices)
        usd = fallback_usd if usd is None else usd
        with self._lock:
            self.spent += usd
        if self.ledger is not None:
            self.ledger.record(key, usd)

    def exhausted_error(self) -> SaelabError:
        where = self.ledger.path if self.ledger else "this run"
        return SaelabError(
            f"interpret.max_usd = ${self.max_usd:.2f} is reached: ${self.total:.4f} paid for "
            f"these requests over all runs (answers' usage, in {where}); "
            f"{self.refused} request(s) were not sent. The answers so far are cached; raise "
            "interpret.max_usd to finish")
