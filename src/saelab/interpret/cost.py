"""Token and dollar estimates before anything is sent, and the spending cap.

Input tokens are counted with tiktoken's encoding for the model (o200k_base for gpt-4o).
tiktoken downloads that file on first use; offline, or when the download hangs, we fall
back to a labelled chars/4 estimate (tiktoken reads a pre-downloaded encoding from
TIKTOKEN_CACHE_DIR, which gives exact counts offline). Output tokens are the requests' `max_tokens`: an
upper bound, so the cap errs on the side of stopping.
"""
from __future__ import annotations

import functools
import logging
import threading
from dataclasses import dataclass
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


def usage_usd(response: dict[str, Any], prices: Prices) -> float:
    usage = response.get("usage") or {}
    details = usage.get("prompt_tokens_details") or {}
    return prices.usd(int(usage.get("prompt_tokens") or 0),
                      int(usage.get("completion_tokens") or 0),
                      int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0)


class Budget:
    """Dollars spent so far in this run against interpret.max_usd."""

    def __init__(self, max_usd: float, prices: Prices):
        self.max_usd, self.prices, self.spent = max_usd, prices, 0.0

    def check(self, planned: Estimate, what: str) -> None:
        """Stop before sending `planned` if it could take the run past the cap."""
        if self.spent + planned.usd > self.max_usd:
            raise SaelabError(
                f"{what} would cost up to ${planned.usd:.4f} ({planned.describe()}); with "
                f"${self.spent:.4f} already spent that exceeds interpret.max_usd = "
                f"${self.max_usd:.2f}. Raise interpret.max_usd, lower interpret.n_latents "
                "or the example counts, use interpret.backend=openai-batch for the batch "
                "discount, or interpret.backend=none to write the request file only")

    def add(self, response: dict[str, Any]) -> None:
        self.spent += usage_usd(response, self.prices)
