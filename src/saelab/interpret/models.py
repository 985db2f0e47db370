"""Which explainer model a run uses, from the `interpret.models` table: its prices, what
its requests may carry (reasoning effort, logprobs) and whether it is still served.

Models are data: prices and shutdown dates change on the provider's pages, not in code.
A model missing from the table is accepted only behind `interpret.base_url` (a local or
self-hosted server), where it costs nothing and is assumed to return no logprobs unless
listed.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import date

from ..core.config import InterpretCfg, LLMSpec
from ..core.errors import SaelabError
from .cost import Prices

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Explainer:
    name: str
    spec: LLMSpec
    listed: bool  # in interpret.models (priced), or a local server's model
    reasoning_effort: str | None  # sent with every request; None for models that do not reason
    logprobs: bool  # requested from the scorers (the model returns them and the user wants them)

    def prices(self, batch: bool) -> Prices:
        return Prices(self.spec.input, self.spec.output, self.spec.batch_discount if batch else 0.0,
                      cached_in_per_mtok=self.spec.cached_input)

    @property
    def auc_note(self) -> str:
        """Why scores carry no AUC, or "" when they may."""
        if self.logprobs:
            return ""
        if not self.spec.logprobs:
            return f"{self.name} returns no token logprobs: scores are balanced accuracy only, no AUC"
        return "interpret.logprobs is false: scores are balanced accuracy only, no AUC"


def explainer(cfg: InterpretCfg, today: date | None = None) -> Explainer:
    """The configured model, checked against the table; warns on an announced shutdown and
    stops on a past one (an API call to a retired model fails only after the passes over
    the store)."""
    today = today or date.today()
    spec = cfg.models.get(cfg.model)
    listed = spec is not None
    if spec is None:
        if not cfg.base_url and cfg.backend != "none":
            raise SaelabError(
                f"interpret.model = {cfg.model!r} is not in interpret.models, so its prices "
                f"are unknown; choose one of {sorted(cfg.models)} or add a row for it "
                "(input, cached_input, output per 1M tokens, batch_discount, reasoning, "
                "logprobs, shutdown)")
        spec = LLMSpec(logprobs=False)
    if spec.shutdown:
        end = date.fromisoformat(spec.shutdown)
        current = sorted(n for n, s in cfg.models.items()
                         if not s.shutdown or date.fromisoformat(s.shutdown) > today)
        if end <= today and cfg.backend != "none":
            raise SaelabError(f"interpret.model = {cfg.model!r} was shut down on {spec.shutdown}; "
                              f"choose a current model ({', '.join(current)})")
        if end > today:
            log.warning("interpret.model %s is announced for shutdown on %s (%d days from "
                        "now); runs after that date will fail. Current models: %s",
                        cfg.model, spec.shutdown, (end - today).days, ", ".join(current))
    return Explainer(cfg.model, spec, listed,
                     cfg.reasoning_effort if spec.reasoning else None,
                     cfg.logprobs and spec.logprobs)
