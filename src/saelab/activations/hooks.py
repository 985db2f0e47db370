"""Hook points inside a Llama decoder layer, and a truncated forward that stops at one.

A hook point names a tensor of `model.model.layers[L]`:

| hook         | tensor                                             | width             |
|--------------|----------------------------------------------------|-------------------|
| `mlp_out`    | output of `layers[L].mlp` (before the residual add) | hidden_size       |
| `mlp_act`    | input of `layers[L].mlp.down_proj`                 | intermediate_size |
| `mlp_in`     | output of `layers[L].post_attention_layernorm`     | hidden_size       |
| `resid_post` | output of `layers[L]` (the residual stream)        | hidden_size       |

`capture` raises from inside the hook once the tensor exists, so layers
after L, the final norm and the 128k-row LM head never run. The forward itself is the
model's own `model.model(...)`: masks, RoPE and attention are exactly those of a full
pass, which is why the captured tensor equals the full-forward one.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Iterator

import torch
from torch import nn

from ..core.errors import SaelabError

# hook -> (path of the module below the decoder layer, "input" or "output" of it)
HOOK_POINTS: dict[str, tuple[str, str]] = {
    "mlp_out": ("mlp", "output"),
    "mlp_act": ("mlp.down_proj", "input"),
    "mlp_in": ("post_attention_layernorm", "output"),
    "resid_post": ("", "output"),
}
# hook -> TransformerLens's name of the same tensor below `blocks.{L}.`: SAELens keys an
# SAE's cfg.json (`hook_name`) and a cached-activations dataset's column by it.
SAELENS_HOOKS: dict[str, str] = {"mlp_out": "hook_mlp_out", "resid_post": "hook_resid_post",
                                 "mlp_act": "mlp.hook_post", "mlp_in": "ln2.hook_normalized"}


def saelens_hook_name(layer: int, hook: str) -> str:
    """SAELens's (TransformerLens's) name of hook point `hook` at `layer`."""
    if hook not in SAELENS_HOOKS:
        raise SaelabError(f"unknown hook {hook!r}; available: {', '.join(SAELENS_HOOKS)}")
    return f"blocks.{layer}.{SAELENS_HOOKS[hook]}"


def base_model(model: nn.Module) -> nn.Module:
    """The decoder stack (`LlamaModel`) of a `LlamaForCausalLM`, or the model itself."""
    return getattr(model, "model", model)


def hook_module(model: nn.Module, layer: int, hook: str) -> tuple[nn.Module, str]:
    """The module whose input or output is `hook` at `layer`, and which of the two it is."""
    if hook not in HOOK_POINTS:
        raise SaelabError(f"unknown hook {hook!r}; available: {', '.join(HOOK_POINTS)} "
                          "(extract.hook)")
    layers = getattr(base_model(model), "layers", None)
    if layers is None:
        raise SaelabError(f"{type(model).__name__} has no decoder layers (model.model.layers); "
                          "only Llama-style causal LMs are supported")
    if not 0 <= layer < len(layers):
        raise SaelabError(f"layer {layer} does not exist: the model has {len(layers)} layers "
                          f"(0..{len(layers) - 1}); set extract.layer accordingly")
    path, side = HOOK_POINTS[hook]
    module, where = layers[layer], f"layers[{layer}]"
    for part in filter(None, path.split(".")):
        children = dict(module.named_children())
        if part not in children:
            raise SaelabError(f"hook {hook!r} needs {where}.{part}, but {where} has only: "
                              f"{', '.join(children) or 'no submodules'}")
        module, where = children[part], f"{where}.{part}"
    return module, side


def hook_dim(config, hook: str) -> int:
    """Width of the hooked tensor for a Llama config."""
    if hook not in HOOK_POINTS:
        raise SaelabError(f"unknown hook {hook!r}; available: {', '.join(HOOK_POINTS)}")
    return config.intermediate_size if hook == "mlp_act" else config.hidden_size


class _Stop(Exception):
    """Raised from the hook to end the forward pass at the hooked layer."""


@dataclass
class ActivationHook:
    """What `capture` yields: the last captured tensor and the truncated forward."""
    model: nn.Module
    value: torch.Tensor | None = None

    def run(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Forward `input_ids` [batch, seq] and return the hooked tensor [batch, seq, d]."""
        self.value = None
        try:
            base_model(self.model)(input_ids=input_ids, use_cache=False)
        except _Stop:
            pass
        if self.value is None:
            raise SaelabError("the hooked module did not run during the forward pass")
        return self.value


@contextlib.contextmanager
def capture(model: nn.Module, layer: int, hook: str) -> Iterator[ActivationHook]:
    """Hook `hook` of `layers[layer]` for the duration of the block; run forwards with
    `ActivationHook.run`, which ends each one at the hook (a plain `model(...)` call would
    see the internal stop exception)."""
    module, side = hook_module(model, layer, hook)
    state = ActivationHook(model)

    def record(tensor: torch.Tensor) -> None:
        state.value = tensor[0] if isinstance(tensor, tuple) else tensor
        raise _Stop

    if side == "input":
        handle = module.register_forward_pre_hook(lambda _m, args: record(args[0]))
    else:
        handle = module.register_forward_hook(lambda _m, _args, out: record(out))
    try:
        yield state
    finally:
        handle.remove()
