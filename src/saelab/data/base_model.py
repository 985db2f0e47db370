"""Stage `fetch_model`: put the base Llama in models/base/ and describe it in models/base.json.

Five sources, one on-disk format: `tiny` (seeded random weights, tiny size) and `random`
(the exact Llama-3.2-1B architecture, random weights) are built here and saved with
`save_pretrained`; `hub` downloads meta-llama/Llama-3.2-1B at a pinned revision; `gguf`
dequantises a GGUF file once and `local` links a model folder from disk (both in
`model_sources`). All are read back by the same `load_model` (one `from_pretrained` call).
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

from ..core import atomic, paths
from ..core.config import ModelCfg, Params
from ..core.errors import SaelabError
from ..core.hub_access import hub_errors, model_token
from . import model_sources
from .tokenizer import BOS_ID, EOS_ID, load_llama3_tokenizer

log = logging.getLogger(__name__)

# Llama-3.x constants that params do not vary.
RMS_NORM_EPS = 1.0e-5
LLAMA3_ROPE_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
# What a usable checkpoint needs; the Hub repo also holds `original/` (Meta's .pth format).
HUB_FILES = ["*.safetensors", "*.json", "tokenizer*"]
HUB_SKIP = ["original/*"]
SUMMARY_KEYS = ("hidden_size", "num_hidden_layers", "intermediate_size", "num_attention_heads",
                "num_key_value_heads", "vocab_size")


def build_model_config(cfg: ModelCfg) -> LlamaConfig:
    """The Llama config described by `cfg` (shape fields as in Llama-3.2-1B's config.json)."""
    # `rope_scaling` + `rope_theta` are the keys of Meta's config.json; transformers 5
    # folds them into `rope_parameters`, 4.x reads them as is.
    return LlamaConfig(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=dict(LLAMA3_ROPE_SCALING) if cfg.rope_scaling == "llama3" else None,
        rms_norm_eps=RMS_NORM_EPS,
        tie_word_embeddings=cfg.tie_word_embeddings,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def check_layer(n: int, layer: int, name: str) -> None:
    """Refuse a model of `n` decoder layers that lacks the layer the extractor hooks."""
    if layer >= n:
        raise SaelabError(f"extract.layer = {layer} but model {name} has {n} layers "
                          f"(0..{n - 1}); lower extract.layer or pick another model")


def _fresh_dir(out_dir: Path) -> None:
    # DVC deletes a stage's outs before running it; do the same when called directly so
    # files from another source (a Hub checkpoint, then a tiny one) never mix.
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def _build_random(params: Params, out_dir: Path) -> str:
    cfg = params.model
    config = build_model_config(cfg)
    # The 1B model is saved in bf16 (2.5 GB instead of 5 GB); its dtype on load is the
    # stage's choice, so this only rounds the random init.
    dtype = torch.float32 if cfg.source == "tiny" else torch.bfloat16
    torch.manual_seed(cfg.init_seed)
    model = LlamaForCausalLM._from_config(config, dtype=dtype)
    log.info("built %s: random weights, seed %d, %s", cfg.name, cfg.init_seed, dtype)
    model.save_pretrained(out_dir)
    load_llama3_tokenizer().save_pretrained(out_dir)
    return f"random-seed-{cfg.init_seed}"


def _download(cfg: ModelCfg, token: str, out_dir: Path) -> str:
    """Fetch the pinned Hub snapshot into the HF cache (resumable, shared) and copy it here."""
    import huggingface_hub

    with hub_errors(cfg.hf_repo, "model.hf_repo / model.revision"):
        sha = huggingface_hub.HfApi().model_info(cfg.hf_repo, revision=cfg.revision,
                                                  token=token).sha
        snapshot = Path(huggingface_hub.snapshot_download(
            cfg.hf_repo, revision=sha, token=token,
            allow_patterns=HUB_FILES, ignore_patterns=HUB_SKIP))
    for src in sorted(p for p in snapshot.rglob("*") if p.is_file()):
        # The cache holds symlinks to blobs: link the blob itself.
        model_sources.link_or_copy(src.resolve(), out_dir / src.relative_to(snapshot))
    log.info("downloaded %s at %s (requested %s)", cfg.hf_repo, sha, cfg.revision)
    return sha


def _check_against_params(config: LlamaConfig, cfg: ModelCfg, name: str) -> None:
    # Later stages size things from params (d_in, budget FLOPs): they must describe the
    # checkpoint actually used.
    wrong = [f"{k}: checkpoint {getattr(config, k)}, params {getattr(cfg, k)}"
             for k in SUMMARY_KEYS if getattr(config, k) != getattr(cfg, k)]
    if wrong:
        raise SaelabError(f"{name} does not match the model.* params ("
                          + "; ".join(wrong) + "); fix them in conf/profile/ and regenerate "
                          "params.yaml")


def count_params(config: LlamaConfig) -> int:
    """Parameters of the model `config` describes (tied embeddings counted once), from the
    config alone: the same for safetensors and .bin checkpoints, nothing loaded."""
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    return sum(p.numel() for p in model.parameters())


def _checked_gguf(cfg: ModelCfg, layer: int) -> model_sources.GGUFInfo:
    gguf = model_sources.read_gguf(model_sources.gguf_path(cfg))
    check_layer(gguf.n_layers, layer, gguf.path.as_posix())  # before a minute of conversion
    return gguf


def _checked_local(cfg: ModelCfg, layer: int, out_dir: Path) -> Path:
    folder = model_sources.check_local(cfg)
    if folder.resolve() == out_dir.resolve():
        raise SaelabError(f"model.local_path is {out_dir} itself, which fetch_model empties "
                          "first; point it at the folder the model came from")
    check_layer(LlamaConfig.from_pretrained(folder).num_hidden_layers, layer, folder.as_posix())
    return folder


def _fill(params: Params, out_dir: Path, token: str | None,
          gguf: model_sources.GGUFInfo | None, local: Path | None,
          ) -> tuple[str, str | None, dict]:
    """Write the checkpoint into `out_dir`: (revision, where it came from unless built here,
    base.json keys beyond the shared ones)."""
    cfg = params.model
    if token:
        return _download(cfg, token, out_dir), cfg.hf_repo, {}
    if gguf:
        sha = atomic.sha256_file(gguf.path)
        log.info("dequantising %s (%s) into %s", gguf.path, gguf.file_type, out_dir)
        model_sources.convert_gguf(gguf.path, out_dir)
        origin = gguf.path.as_posix()
        return sha, origin, {"source_path": origin, "sha256": sha, "quantization": {
            "file_type": gguf.file_type, "tensor_types": gguf.tensor_types}}
    if local:
        return model_sources.copy_local(local, out_dir), local.as_posix(), {
            "source_path": local.as_posix()}
    return _build_random(params, out_dir), None, {}


def fetch_model(params: Params, out_dir: Path = paths.MODEL_DIR,
                json_path: Path = paths.MODEL_JSON) -> dict:
    """Produce models/base/ for `params.model.source`, write models/base.json, return its dict."""
    cfg, layer = params.model, params.extract.layer
    out_dir, json_path = Path(out_dir), Path(json_path)
    # Checked before anything touches the disk or the network: a bad input keeps the model
    # already in out_dir.
    token = model_token(cfg)
    gguf = _checked_gguf(cfg, layer) if cfg.source == "gguf" else None
    local = _checked_local(cfg, layer, out_dir) if cfg.source == "local" else None
    tokenizer = _saved_tokenizer(local) if local else None
    _fresh_dir(out_dir)
    revision, origin, extra = _fill(params, out_dir, token, gguf, local)
    config = LlamaConfig.from_pretrained(out_dir)
    check_layer(config.num_hidden_layers, layer, cfg.name)
    if origin:
        _check_against_params(config, cfg, origin)
    tokenizer = tokenizer or _saved_tokenizer(out_dir)
    info = {
        "name": cfg.name,
        "source": cfg.source,
        "hf_repo": cfg.hf_repo if cfg.source == "hub" else None,
        "requested_revision": cfg.revision if cfg.source == "hub" else None,
        "revision": revision,
        "path": out_dir.as_posix(),
        "dtype": str(config.dtype).removeprefix("torch.") if config.dtype else None,
        "config": {k: getattr(config, k) for k in SUMMARY_KEYS},
        "n_params": count_params(config),
        # The model's own specials: rows start with its BOS, documents end with its EOS.
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        **extra,
    }
    json_path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(json_path, json.dumps(info, indent=2) + "\n")
    return info


def _saved_tokenizer(model_dir: Path) -> PreTrainedTokenizerBase:
    """The tokenizer in `model_dir`, which must have the BOS and EOS every row is built with."""
    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise SaelabError(f"no tokenizer transformers can load in {model_dir} ({first}); put "
                          "the model's tokenizer files (tokenizer.json, tokenizer_config.json) "
                          "beside its weights") from None
    if tokenizer.bos_token_id is None or tokenizer.eos_token_id is None:
        raise SaelabError(f"the tokenizer in {model_dir} has no BOS or EOS token (bos "
                          f"{tokenizer.bos_token}, eos {tokenizer.eos_token}); rows start with "
                          "BOS and documents end with EOS: set both in tokenizer_config.json")
    return tokenizer


REFETCH = "restore it (`dvc checkout models/base`) or fetch it again (`dvc repro -f fetch_model`)"


def check_model_dir(model_dir: Path) -> None:
    """Before a stage loads the model: config.json parses, weights are there, and every
    safetensors file is whole (its header's tensors cover exactly the file's bytes)."""
    from safetensors import SafetensorError, safe_open

    config = model_dir / "config.json"
    if not config.is_file():
        raise SaelabError(f"no model in {model_dir}; run `dvc repro fetch_model` first")
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise SaelabError(f"{config} is damaged (not valid JSON: {e}); {REFETCH}") from None
    weights = sorted(model_dir.glob("*.safetensors")) + sorted(model_dir.glob("*.bin"))
    if not weights:
        raise SaelabError(f"{model_dir} has a config.json but no weights (*.safetensors or "
                          f"*.bin); {REFETCH}")
    for w in weights:
        if w.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(w), framework="pt"):
                pass
        except (SafetensorError, OSError) as e:
            raise SaelabError(f"{w} is damaged or truncated ({e}); {REFETCH}") from None


def load_model(model_dir: Path = paths.MODEL_DIR, *, device: torch.device | str,
               dtype: torch.dtype, attn_implementation: str = "sdpa",
               ) -> tuple[LlamaForCausalLM, PreTrainedTokenizerBase]:
    """The frozen base model (eval mode, no grads) and its tokenizer, for every source."""
    model_dir = Path(model_dir)
    check_model_dir(model_dir)
    try:
        model = LlamaForCausalLM.from_pretrained(model_dir, dtype=dtype,
                                                 attn_implementation=attn_implementation)
    except (OSError, ValueError, RuntimeError) as e:  # what the checks above cannot see
        raise SaelabError(f"the model in {model_dir} cannot be loaded ({str(e)[:300]}); "
                          f"{REFETCH}") from None
    model.to(device).eval().requires_grad_(False)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    return model, tokenizer


def _run(params: Params) -> None:
    from ..core.tracking import log_artifact, log_metrics, set_tags

    info = fetch_model(params, paths.MODEL_DIR, paths.MODEL_JSON)
    log.info("%s: %s, %.3g parameters, revision %s", info["name"], info["config"],
             info["n_params"], info["revision"])
    # The loaded model's config, as numbers; not under "model.", the params' names (the tiny
    # profile's model.hidden_size is a param too).
    log_metrics({"base_model": {**info["config"], "n_params": info["n_params"]}})
    set_tags({"model.revision": info["revision"], "model.source": info["source"]})
    log_artifact(paths.MODEL_JSON)


def main() -> None:
    from ..core.stage import run_stage

    run_stage("fetch_model", _run)
