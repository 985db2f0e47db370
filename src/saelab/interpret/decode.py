"""Token windows to text without breaking characters.

Llama-3's byte-level BPE splits rarer characters ("ñ", "á", emoji) across tokens, so
decoding token by token prints U+FFFD. We instead join the raw bytes of the whole window,
decode them once, and give every token the character span its bytes fall in: a token that
holds half of "ñ" maps onto the whole "ñ". Highlights and colours then work on characters.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-ins byte-level BPE uses."""
    printable = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
                 + list(range(ord("®"), ord("ÿ") + 1)))
    stand_ins = printable[:]
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            stand_ins.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, stand_ins)}


def token_bytes_table(tokenizer) -> list[bytes]:
    """The raw bytes of every token id of a byte-level BPE tokenizer; special tokens are b"".

    Special tokens (BOS, EOS) carry no text: a window that crosses a document boundary
    simply joins the two texts.
    """
    decoder = _byte_decoder()
    size = len(tokenizer)
    special = set(tokenizer.all_special_ids)
    table: list[bytes] = []
    for i, piece in enumerate(tokenizer.convert_ids_to_tokens(list(range(size)))):
        if i in special or piece is None:
            table.append(b"")
            continue
        try:
            table.append(bytes(decoder[c] for c in piece))
        except KeyError:
            # Added tokens outside the byte alphabet (reserved specials) have no bytes.
            table.append(b"")
    return table


@dataclass(frozen=True)
class Rendered:
    """A decoded window: `spans[i]` is the [start, end) character range of token i."""

    text: str
    spans: np.ndarray  # int64 [n_tokens, 2]; start == end for tokens with no visible text


def render(token_ids, table: list[bytes]) -> Rendered:
    pieces = [table[int(t)] if int(t) < len(table) else b"" for t in token_ids]
    data = b"".join(pieces)
    # Characters are runs that start at a lead byte (anything but 10xxxxxx). Bytes before
    # the first lead byte belong to a character cut by the window's left edge: dropped.
    raw = np.frombuffer(data, dtype=np.uint8)
    lead = (raw & 0xC0) != 0x80
    char_of_byte = np.cumsum(lead) - 1  # -1 before the first lead byte
    first = int(np.argmax(lead)) if lead.any() else len(data)
    try:
        text = data[first:].decode("utf-8")  # the common case: one decode of the window
    except UnicodeDecodeError:
        text, char_of_byte = _decode_by_character(data, lead, char_of_byte)
    # Each token spans the characters its bytes fall in (bytes of dropped characters: -1).
    ends = np.cumsum([len(p) for p in pieces])
    spans = np.zeros((len(pieces), 2), dtype=np.int64)
    prev = 0
    for i, (e, n) in enumerate(zip(ends, (len(p) for p in pieces))):
        owned = char_of_byte[e - n:e]
        owned = owned[owned >= 0]
        spans[i] = (owned[0], owned[-1] + 1) if len(owned) else (prev, prev)
        prev = spans[i, 1]
    return Rendered(text, spans)


def _decode_by_character(data: bytes, lead: np.ndarray,
                         char_of_byte: np.ndarray) -> tuple[str, np.ndarray]:
    """Character by character: a character cut by the window's right edge is dropped, a
    genuinely invalid one inside the window becomes U+FFFD."""
    starts = np.flatnonzero(lead).tolist()
    chars: list[str] = []
    for k, s in enumerate(starts):
        e = starts[k + 1] if k + 1 < len(starts) else len(data)
        try:
            chars.append(data[s:e].decode("utf-8"))
        except UnicodeDecodeError:
            if e == len(data):
                char_of_byte = np.where(np.arange(len(data)) >= s, -1, char_of_byte)
                break
            chars.append("\ufffd")
    return "".join(chars), char_of_byte


def char_values(r: Rendered, token_values: np.ndarray) -> np.ndarray:
    """Per-character value: the largest value among the tokens that cover the character."""
    out = np.zeros(len(r.text), dtype=np.float32)
    for (s, e), v in zip(r.spans, token_values):
        if e > s:
            out[s:e] = np.maximum(out[s:e], v)
    return out


def highlight(r: Rendered, token_mask: np.ndarray, left: str = "<<", right: str = ">>") -> str:
    """The text with runs of marked characters wrapped in `left` ... `right`.

    A run's leading whitespace stays outside the markers (" <<mañana>>", not "<< mañana>>").
    """
    marked = char_values(r, np.asarray(token_mask, dtype=np.float32)) > 0
    out: list[str] = []
    i, n = 0, len(r.text)
    while i < n:
        if not marked[i]:
            out.append(r.text[i])
            i += 1
            continue
        j = i
        while j < n and marked[j]:
            j += 1
        run = r.text[i:j]
        core = run.lstrip()
        if core:
            out.append(run[:len(run) - len(core)] + left + core + right)
        else:
            out.append(run)
        i = j
    return "".join(out)


def activation_mask(acts: np.ndarray, frac: float) -> np.ndarray:
    """Tokens to mark in a window: those firing at >= `frac` x the window's peak."""
    acts = np.asarray(acts, dtype=np.float32)
    peak = float(acts.max()) if len(acts) else 0.0
    return (acts > 0) & (acts >= frac * peak)
