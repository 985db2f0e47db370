"""Detection and fuzzing: how well an explanation predicts where a latent fires.

Detection: the scorer sees unmarked windows (activation-quantile windows and random
silent ones, shuffled) and says which ones the latent fires on, given the explanation.
Fuzzing: the scorer sees activating windows, half marked on the tokens that really fire
and half marked on as many random silent tokens, and says which markings fit the
explanation. Both report balanced accuracy; when the server returns logprobs, also the
ROC AUC of P(true). None of these windows was shown to the explainer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from .cache import Request
from .decode import activation_mask, highlight, render
from .prompts import label_probabilities, parse_labels, score_body
from .sampling import LatentSamples

SCORERS = ("detection", "fuzzing")


@dataclass(frozen=True)
class Item:
    text: str
    label: bool  # activating (detection) or correctly marked (fuzzing)
    quantile: int  # the window's activation bin, -1 for random windows


@dataclass(frozen=True)
class ScorePrompt:
    latent: int
    scorer: str
    items: tuple[Item, ...]
    request: Request


def detection_items(s: LatentSamples, table: list[bytes]) -> list[Item]:
    return ([Item(render(w.tokens, table).text, True, w.quantile) for w in s.quantiles]
            + [Item(render(w.tokens, table).text, False, -1) for w in s.random])


def fuzzing_items(s: LatentSamples, table: list[bytes], frac: float,
                  rng: np.random.Generator) -> list[Item]:
    items = []
    for i, w in enumerate(s.quantiles):
        r = render(w.tokens, table)
        real = activation_mask(w.acts, frac)
        if i % 2 == 0:
            items.append(Item(highlight(r, real), True, w.quantile))
            continue
        visible = r.spans[:, 1] > r.spans[:, 0]
        silent = np.flatnonzero((w.acts == 0) & visible)
        if len(silent) == 0:
            continue
        fake = np.zeros(len(w.acts), dtype=bool)
        fake[rng.choice(silent, size=min(len(silent), max(1, int(real.sum()))),
                        replace=False)] = True
        items.append(Item(highlight(r, fake), False, w.quantile))
    return items


def build_prompts(s: LatentSamples, scorer: str, explanation: str, items: Sequence[Item], *,
                  model: str, per_prompt: int, logprobs: bool, base_url: str,
                  rng: np.random.Generator,
                  reasoning_effort: str | None = None) -> list[ScorePrompt]:
    """Shuffled items in prompts of `per_prompt` examples each."""
    order = rng.permutation(len(items))
    shuffled = [items[i] for i in order]
    prompts = []
    for k in range(0, len(shuffled), per_prompt):
        chunk = tuple(shuffled[k:k + per_prompt])
        body = score_body(model, scorer, explanation, [it.text for it in chunk],
                          logprobs=logprobs, reasoning_effort=reasoning_effort)
        prompts.append(ScorePrompt(s.latent, scorer, chunk, Request.make(body, base_url)))
    return prompts


def balanced_accuracy(labels: np.ndarray, preds: np.ndarray) -> float | None:
    pos, neg = labels, ~labels
    if not pos.any() or not neg.any():
        return None
    return float(0.5 * ((preds & pos).sum() / pos.sum() + (~preds & neg).sum() / neg.sum()))


def roc_auc(labels: np.ndarray, scores: np.ndarray) -> float | None:
    """Probability that a random positive scores above a random negative (ties count half)."""
    pos, neg = scores[labels], scores[~labels]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def _first_choice(response: dict[str, Any] | None) -> dict[str, Any]:
    choices = (response or {}).get("choices") or [{}]
    return choices[0] if isinstance(choices[0], dict) else {}


def score(prompts: Sequence[ScorePrompt],
          responses: dict[str, dict[str, Any] | None]) -> dict[str, Any]:
    """Scores of one latent under one scorer from its prompts' responses."""
    labels, preds, probs_labels, probs = [], [], [], []
    unanswered = 0
    by_quantile: dict[int, list[bool]] = {}
    for p in prompts:
        choice = _first_choice(responses.get(p.request.key))
        content = (choice.get("message") or {}).get("content")
        got = parse_labels(content, len(p.items))
        if got is None:
            unanswered += len(p.items)
            continue
        for it, pred in zip(p.items, got):
            labels.append(it.label)
            preds.append(pred)
            if it.label and it.quantile >= 0:
                by_quantile.setdefault(it.quantile, []).append(pred)
        pr = label_probabilities(choice.get("logprobs"), len(p.items))
        if pr is not None:
            probs_labels += [it.label for it in p.items]
            probs += pr
    y, yhat = np.array(labels, dtype=bool), np.array(preds, dtype=bool)
    out: dict[str, Any] = {
        "balanced_accuracy": balanced_accuracy(y, yhat),
        "auc": roc_auc(np.array(probs_labels, dtype=bool), np.array(probs, dtype=np.float64)),
        "n": len(labels),
        "n_unanswered": unanswered,
    }
    if by_quantile:
        out["recall_by_quantile"] = {str(q): float(np.mean(v)) for q, v in sorted(by_quantile.items())}
    return out
