"""Explainer and scorer prompts, as chat-completions request bodies, and their parsers.

The explainer prompt keeps the seed's shape: each example with its activating tokens
wrapped in << >>, an answer of at most `max_words` words completing "this neuron fires
on", optionally after some reasoning. Scorers answer through a strict JSON schema, one
boolean per example, so the answer is machine-checkable and its logprobs give a
probability per example.
"""
from __future__ import annotations

import json
import math
import re
from typing import Any, Sequence

# Completion budgets: one short line, or some reasoning and then the line.
EXPLAIN_MAX_TOKENS = 100
EXPLAIN_COT_MAX_TOKENS = 600
# Per example `"example_12":false,` is about 8 tokens; the rest is the braces.
SCORE_TOKENS_PER_EXAMPLE = 10
SCORE_MAX_TOKENS_BASE = 10

EXPLAIN_SYSTEM = """\
We are studying neurons in a neural network that reads Spanish web text. Each neuron \
looks for one particular thing in a short text. Look at the examples below, in which the \
tokens the neuron fires on are marked as <<token>>, and say what the neuron looks for.
- Describe the pattern; do not just list the marked words unless one word is the pattern.
- Consider the marked tokens first, then the context just before them.
- Your explanation completes the sentence "this neuron fires on" and has at most \
{max_words} words.
- {language}
{answer_format}"""

# The texts are Spanish either way; only the explanation's language changes.
LANGUAGES = {
    "en": "Write the explanation in English.",
    "es": "Write the explanation in Spanish (en español).",
}

ANSWER_DIRECT = 'Reply with exactly one line: "Explanation: <your explanation>".'
ANSWER_COT = ('First think step by step about what the marked tokens have in common. Then '
              'end your reply with one line: "Explanation: <your explanation>".')

DETECTION_SYSTEM = """\
We are studying neurons in a neural network that reads Spanish web text. A neuron's \
behaviour is described by an explanation of what it fires on. You will see the \
explanation and several short texts. For each text, decide whether the neuron fires on \
any token of it, judging only by the explanation. Some texts activate it, some do not."""

FUZZING_SYSTEM = """\
We are studying neurons in a neural network that reads Spanish web text. A neuron's \
behaviour is described by an explanation of what it fires on. You will see the \
explanation and several short texts with some tokens marked as <<token>>. For each \
text, decide whether the marked tokens are exactly what the explanation says the neuron \
fires on (true) or were marked at random (false)."""


def _example_lines(texts: Sequence[str]) -> str:
    # One example per line keeps the numbering unambiguous; newlines inside are shown as \n.
    return "\n".join(f"Example {i + 1}: {t.strip().replace(chr(10), chr(92) + 'n')}"
                     for i, t in enumerate(texts))


def _limit(body: dict[str, Any], max_tokens: int, reasoning_effort: str | None) -> dict[str, Any]:
    """Completion budget, and the effort for models that reason: those take
    `max_completion_tokens` (OpenAI rejects `max_tokens` for them)."""
    if reasoning_effort is None:
        body["max_tokens"] = max_tokens
    else:
        body["reasoning_effort"] = reasoning_effort
        body["max_completion_tokens"] = max_tokens
    return body


def explain_body(model: str, highlighted: Sequence[str], *, max_words: int,
                 chain_of_thought: bool, n_completions: int, temperature: float,
                 language: str = "en", reasoning_effort: str | None = None) -> dict[str, Any]:
    system = EXPLAIN_SYSTEM.format(max_words=max_words, language=LANGUAGES[language],
                                   answer_format=ANSWER_COT if chain_of_thought else ANSWER_DIRECT)
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": _example_lines(highlighted)}],
        "temperature": temperature,
    }
    if n_completions > 1:
        body["n"] = n_completions
    return _limit(body, EXPLAIN_COT_MAX_TOKENS if chain_of_thought else EXPLAIN_MAX_TOKENS,
                  reasoning_effort)


_LABEL = re.compile(r"^[\s>*_#`-]*explanation[\s*_`]*:[\s*_`]*(.*)$", re.IGNORECASE)
_LEAD = re.compile(r"^(?:th(?:is|e) neuron )?(?:fires|activates) on[:\s]+", re.IGNORECASE)


_PAIRS = {'"': '"', "'": "'", "“": "”", "«": "»", "`": "`"}


def _unwrap(text: str) -> str:
    """Without markdown emphasis and quotes that wrap the whole text."""
    text = text.strip().strip("*_").strip()
    while (len(text) >= 2 and _PAIRS.get(text[0]) == text[-1]
           and text[0] not in text[1:-1] and text[-1] not in text[1:-1]):
        text = text[1:-1].strip()
    return text


def parse_explanation(text: str | None, max_words: int) -> str | None:
    """The explanation in a reply, or None when the reply holds none.

    Takes the last "Explanation:" line (markdown emphasis and quotes tolerated); without
    one, a reply of a single line is taken as the explanation itself. Strips a repeated
    "this neuron fires on", wrapping quotes and the final full stop; cuts to `max_words`.
    """
    if not text:
        return None
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    found = None
    for ln in lines:
        m = _LABEL.match(ln)
        if m:
            found = m.group(1)
    if found is None:
        if len(lines) != 1:
            return None
        found = lines[0]
    found = _unwrap(_LEAD.sub("", _unwrap(found))).rstrip(".").strip()
    words = found.split()
    if not words:
        return None
    return " ".join(words[:max_words])


def _schema(n: int) -> dict[str, Any]:
    keys = [f"example_{i + 1}" for i in range(n)]
    return {"type": "json_schema", "json_schema": {
        "name": "labels", "strict": True,
        "schema": {"type": "object", "properties": {k: {"type": "boolean"} for k in keys},
                   "required": keys, "additionalProperties": False}}}


def score_body(model: str, scorer: str, explanation: str, texts: Sequence[str], *,
               logprobs: bool, reasoning_effort: str | None = None) -> dict[str, Any]:
    system = DETECTION_SYSTEM if scorer == "detection" else FUZZING_SYSTEM
    user = (f"Explanation: this neuron fires on {explanation}\n\n{_example_lines(texts)}\n\n"
            f"Answer with a JSON object giving true or false for example_1 .. "
            f"example_{len(texts)}.")
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "system", "content": system},
                     {"role": "user", "content": user}],
        "temperature": 0.0,
        "response_format": _schema(len(texts)),
    }
    _limit(body, SCORE_MAX_TOKENS_BASE + SCORE_TOKENS_PER_EXAMPLE * len(texts), reasoning_effort)
    if logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = 5
    return body


def parse_labels(content: str | None, n: int) -> list[bool] | None:
    """The n booleans of a scorer reply, or None if it is not the JSON asked for."""
    if not content:
        return None
    text = content.strip()
    if text.startswith("```"):  # some servers wrap JSON in a code fence despite the schema
        text = text.strip("`").removeprefix("json").strip()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict):
        return None
    out = []
    for i in range(n):
        v = obj.get(f"example_{i + 1}")
        if not isinstance(v, bool):
            return None
        out.append(v)
    return out


def _bool_word(token: str) -> str:
    return token.strip(" \t\n\"'{}[],:").lower()


def label_probabilities(logprobs: dict[str, Any] | None, n: int) -> list[float] | None:
    """P(true) for each of the n booleans, from the reply's token logprobs.

    The booleans are the tokens that read "true" or "false" once JSON punctuation is
    stripped, in order; each one's probability is renormalised over the true/false
    alternatives among its top logprobs. None when logprobs are missing or do not line up.
    """
    content = (logprobs or {}).get("content")
    if not content:
        return None
    probs = []
    for tok in content:
        word = _bool_word(tok.get("token", ""))
        if word not in ("true", "false"):
            continue
        mass = {"true": 0.0, "false": 0.0}
        alts = tok.get("top_logprobs") or [{"token": tok["token"], "logprob": tok["logprob"]}]
        for alt in alts:
            w = _bool_word(alt.get("token", ""))
            if w in mass:
                mass[w] += math.exp(alt["logprob"])
        if mass[word] == 0.0:  # the chosen token missing from its own top list
            mass[word] = math.exp(tok["logprob"])
        probs.append(mass["true"] / (mass["true"] + mass["false"]))
    return probs if len(probs) == n else None
