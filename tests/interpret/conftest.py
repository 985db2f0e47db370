"""Shared fixtures: the real Llama-3.2 tokenizer, a planted-feature corpus, a fake server."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_openai import FakeOpenAI  # noqa: E402

from saelab.core.config import InterpretCfg  # noqa: E402
from saelab.interpret.cost import TokenCounter  # noqa: E402
from saelab.interpret.decode import token_bytes_table  # noqa: E402
from saelab.interpret.sampling import SampleSpec, sample_from_hits  # noqa: E402
from saelab.data.tokenizer import BOS_ID, load_llama3_tokenizer  # noqa: E402

CTX = 64
WORD = "mañana"
CORPUS_LATENT = 7  # the planted latent: fires exactly on " mañana"
SPEC = SampleSpec(window=16, n_top=8, n_explain=4, n_quantiles=3, n_per_quantile=2,
                  n_random=8, min_activations=5)
COUNTER = TokenCounter("chars/4 estimate (test)", lambda s: (len(s) + 3) // 4, exact=False)


@pytest.fixture(autouse=True)
def offline_tiktoken(monkeypatch):
    """tiktoken downloads its encodings on first use; tests must not try the network."""
    import tiktoken

    from saelab.interpret.cost import token_counter

    def offline(*args, **kwargs):
        raise ConnectionError("tests run offline")

    monkeypatch.setattr(tiktoken, "encoding_for_model", offline)
    monkeypatch.setattr(tiktoken, "get_encoding", offline)
    token_counter.cache_clear()
    yield
    token_counter.cache_clear()


@pytest.fixture(scope="session")
def tokenizer():
    return load_llama3_tokenizer()


@pytest.fixture(scope="session")
def table(tokenizer):
    return token_bytes_table(tokenizer)


def _sentences(rng: np.random.Generator) -> list[str]:
    who = ["El niño", "La señora", "Mi abuela", "El pescador", "La maestra", "Don Andrés"]
    did = ["compró pan", "escribió una carta", "cantó una canción", "leyó el periódico",
           "caminó por el río", "cerró la ventana"]
    where = ["en la plaza", "junto al puerto", "en la montaña", "cerca de la iglesia",
             "en el jardín", "al otro lado del camino"]
    out = []
    for k in range(160):
        a, b, c = (x[rng.integers(len(x))] for x in (who, did, where))
        if k % 4 == 0:
            out.append(f"{a} {did[k % len(did)]} {c} y dijo que volvería {WORD} temprano.")
        else:
            out.append(f"{a} {b} {c}, pero nadie lo vio aquel año.")
    return out


@pytest.fixture(scope="session")
def corpus(tokenizer):
    """Packed rows with BOS at each row start, the stored-token index, and three latents.

    Latent 7 fires exactly on the token " mañana"; latent 3 fires on 3 tokens (too few);
    latent 5 fires weakly at random on a tenth of the tokens.
    """
    rng = np.random.default_rng(0)
    ids: list[int] = []
    for s in _sentences(rng):
        ids += tokenizer.encode(" " + s, add_special_tokens=False)
    word_id = tokenizer.encode(" " + WORD, add_special_tokens=False)
    assert len(word_id) == 1, word_id
    body = CTX - 1
    n_rows = len(ids) // body
    rows = np.zeros((n_rows, CTX), dtype=np.uint32)
    rows[:, 0] = BOS_ID
    rows[:, 1:] = np.asarray(ids[:n_rows * body], dtype=np.uint32).reshape(n_rows, body)
    r, p = np.meshgrid(np.arange(n_rows), np.arange(1, CTX), indexing="ij")
    index = np.stack([r.ravel(), p.ravel()], 1).astype(np.int64)  # BOS not stored
    tokens = rows[index[:, 0], index[:, 1]]
    hit = np.flatnonzero(tokens == word_id[0])
    latents = {
        CORPUS_LATENT: (hit, (2.0 + rng.random(len(hit))).astype(np.float32)),
        3: (np.array([0, 1, 2]), np.ones(3, dtype=np.float32)),
        5: (np.flatnonzero(rng.random(len(tokens)) < 0.1),),
    }
    latents[5] = (latents[5][0], (0.1 + 0.2 * rng.random(len(latents[5][0]))).astype(np.float32))
    return {"rows": rows, "index": index, "latents": latents, "n_tokens": len(index),
            "word_id": word_id[0]}


@pytest.fixture
def samples(corpus):
    return [sample_from_hits(i, idx, vals, corpus["n_tokens"], corpus["index"], corpus["rows"],
                          SPEC, np.random.default_rng([0, i]))
            for i, (idx, vals) in sorted(corpus["latents"].items())]


def make_cfg(tmp_path: Path, **kw) -> InterpretCfg:
    base = dict(model="gpt-4o", cache_dir=str(tmp_path / "cache"), max_words=20,
                examples_per_prompt=4, concurrency=4, max_retries=3, retry_base_s=0.001,
                poll_s=0.001, timeout_s=10.0)
    base.update(kw)
    return dataclasses.replace(InterpretCfg(), **base)


# -- a server that "understands" highlighted words ----------------------------------------

_MARKED = re.compile(r"<<(.+?)>>")
_EXPL = re.compile(r"Explanation: this neuron fires on the word \"([^\"]+)\"")


def labelling_responder(explain_word: str | None = None, logprobs: bool = True):
    """Explains with the most often marked word (or `explain_word`); scores by that word.

    Detection: a text is activating when it contains the explained word. Fuzzing: a text
    is correctly marked when every marked span is the explained word.
    """

    def respond(body: dict):
        user = body["messages"][-1]["content"]
        examples = re.findall(r"^Example \d+: (.*)$", user, flags=re.M)
        if "response_format" not in body:
            marked = Counter(_MARKED.findall(user)).most_common(1)
            word = explain_word or (marked[0][0] if marked else "nothing")
            return f'Explanation: the word "{word}"'
        m = _EXPL.search(user)
        word = m.group(1) if m else "\x00"
        if body["messages"][0]["content"].count("marked at random"):  # fuzzing
            labels = [bool(_MARKED.findall(t)) and all(w == word for w in _MARKED.findall(t))
                      for t in examples]
        else:
            labels = [word in t for t in examples]
        content = json.dumps({f"example_{i + 1}": v for i, v in enumerate(labels)})
        if not logprobs:
            return content
        toks = [{"token": '{"example_1":', "logprob": 0.0, "top_logprobs": []}]
        for i, v in enumerate(labels):
            chosen, other = ("true", "false") if v else ("false", "true")
            toks.append({"token": chosen, "logprob": -0.05,
                         "top_logprobs": [{"token": chosen, "logprob": -0.05},
                                          {"token": other, "logprob": -3.0}]})
            toks.append({"token": f',"example_{i + 2}":' if i + 1 < len(labels) else "}",
                         "logprob": 0.0, "top_logprobs": []})
        return {"content": content, "logprobs": {"content": toks}}

    return respond


@pytest.fixture
def server():
    with FakeOpenAI(labelling_responder()) as srv:
        yield srv


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """cwd = tmp_path (the batch state file lives under ./.saelab), with a fake key."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    return tmp_path
