"""SAE quality: reconstruction on held-out activations and the LM loss with the SAE spliced in."""
from __future__ import annotations

import contextlib
import itertools
import math
from typing import Collection, Iterable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..core.errors import SaelabError
from ..activations.hooks import hook_module
from .autoencoder import SAE


def reconstruction_metrics(sae: SAE, batches: Iterator[torch.Tensor], n_batches: int) -> dict:
    """MSE (per element), FVU, L0 and firing densities over `n_batches` batches.

    The batches must be in the space the SAE takes (normalised for a training SAE, raw for
    an exported one). FVU = sum ||x - x_hat||^2 / sum ||x - mean(x)||^2 over all tokens.
    """
    return reconstruction_stats(sae, batches, n_batches)[0]


@torch.no_grad()
def reconstruction_stats(sae: SAE, batches: Iterator[torch.Tensor],
                         n_batches: int) -> tuple[dict, torch.Tensor]:
    """reconstruction_metrics, and each latent's firing frequency (float64, on the CPU)."""
    was_training = sae.training
    sae.eval()
    dev = sae.W_enc.device
    n = 0
    err = sq = l0 = 0.0
    s = torch.zeros(sae.d_in, dtype=torch.float64, device=dev)
    counts = torch.zeros(sae.d_sae, dtype=torch.float64, device=dev)
    for x in itertools.islice(batches, n_batches):
        x = x.to(dev, torch.float32)
        x_hat, f = sae(x)
        err += float((x_hat - x).double().pow(2).sum())
        sq += float(x.double().pow(2).sum())
        s += x.double().sum(0)
        fired = f > 0
        l0 += float(fired.sum())
        counts += fired.sum(0).double()
        n += x.shape[0]
    sae.train(was_training)
    if n == 0:
        raise SaelabError("no evaluation activations; raise sae.eval_tokens or check the store")
    total_ss = sq - float(s.pow(2).sum()) / n
    density = counts / n
    return {
        "mse": err / (n * sae.d_in),
        "fvu": err / total_ss if total_ss > 0 else math.nan,
        "l0": l0 / n,
        "frac_active_gt_1pct": float((density > 0.01).double().mean()),
        "frac_active_gt_10pct": float((density > 0.1).double().mean()),
        "frac_never_fired": float((density == 0).double().mean()),
        "eval_tokens": n,
    }, density.cpu()


@contextlib.contextmanager
def _splice(model: nn.Module, layer: int, hook: str, replace):
    """Replace the hooked activation h with replace(h) for the duration of the block."""
    module, side = hook_module(model, layer, hook)

    def out_hook(_m, _inp, out):
        if isinstance(out, tuple):
            return (replace(out[0]), *out[1:])
        return replace(out)

    def in_hook(_m, args):
        return (replace(args[0]), *args[1:])

    handle = (module.register_forward_pre_hook(in_hook) if side == "input"
              else module.register_forward_hook(out_hook))
    try:
        yield
    finally:
        handle.remove()


# Clean CE above this fraction of ln(vocab): the model is no better than uniform guessing.
RANDOM_MODEL_CE_FRACTION = 0.9


@torch.no_grad()
def lm_metrics(model: nn.Module, sae: SAE, rows: Iterable[torch.Tensor], *, layer: int,
               hook: str, scale: float, device: torch.device | str,
               special_ids: Collection[int]) -> dict:
    """CE clean, with the SAE spliced in, and zero-ablated; delta LM loss, CE recovered, KL.

    `rows` are token-id tensors [n, context] (BOS at each row start). `scale` is the C the
    SAE expects its input multiplied by (1.0 for an exported SAE, whose scale is folded).
    Special tokens (`special_ids`: the tokenizer's BOS and EOS, which rows are built with)
    are kept clean (the SAE never saw them) and masked from the loss, both as inputs and as
    targets.
    """
    model.eval()
    sae.eval()
    keep_clean: torch.Tensor | None = None

    def through_sae(h):
        x = h.float() * scale
        x_hat = sae(x)[0] / scale
        return torch.where(keep_clean.unsqueeze(-1), h, x_hat.to(h.dtype))

    def zero(h):
        return torch.where(keep_clean.unsqueeze(-1), h, torch.zeros_like(h))

    per_row: list[list[float]] = []  # clean, sae, zero, kl sums and tokens, per row
    specials = torch.tensor(sorted(special_ids), device=device)
    for ids in rows:
        ids = torch.as_tensor(ids, device=device).long()
        if ids.dim() == 1:
            ids = ids.unsqueeze(0)
        special = torch.isin(ids, specials)
        keep_clean = special
        mask = ~(special[:, :-1] | special[:, 1:])  # neither the input nor the target special
        if not mask.any():
            continue

        def logp(ctx=contextlib.nullcontext()):
            with ctx:
                return F.log_softmax(model(input_ids=ids).logits[:, :-1].float(), dim=-1)

        lp_clean = logp()
        lp_sae = logp(_splice(model, layer, hook, through_sae))
        lp_zero = logp(_splice(model, layer, hook, zero))
        nll = {name: -lp.gather(-1, ids[:, 1:, None]).squeeze(-1)
               for name, lp in (("clean", lp_clean), ("sae", lp_sae), ("zero", lp_zero))}
        kl = F.kl_div(lp_sae, lp_clean, log_target=True, reduction="none").sum(-1)
        m = mask.to(kl.dtype)
        per_row += torch.stack([(nll["clean"] * m).sum(1), (nll["sae"] * m).sum(1),
                                (nll["zero"] * m).sum(1), (kl * m).sum(1),
                                m.sum(1)], dim=1).double().tolist()
    if not per_row:
        raise SaelabError("no held-out tokens to evaluate the LM loss on; "
                          "check the corpus's held-out split")
    sums = np.asarray(per_row)
    clean, sae_ce, zero_ce, kl_sum, n_tok = sums.sum(0)
    denom = zero_ce - clean
    out = {
        "ce_clean": clean / n_tok,
        "ce_sae": sae_ce / n_tok,
        "ce_zero_ablation": zero_ce / n_tok,
        "delta_lm_loss": (sae_ce - clean) / n_tok,
        "ce_loss_recovered": (zero_ce - sae_ce) / denom if denom != 0 else math.nan,
        "kl_div": kl_sum / n_tok,
        "lm_eval_tokens": int(n_tok),
        "lm_eval_rows": len(sums),
        **_bootstrap(sums),
    }
    # A random-weight model predicts next tokens about uniformly: its clean CE sits near
    # ln(vocab) and ablating a layer barely moves it, so these ratios measure noise.
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    meaningful = not (vocab and out["ce_clean"] > RANDOM_MODEL_CE_FRACTION * math.log(vocab))
    out["lm_metrics_meaningful"] = meaningful
    if not meaningful:
        out["lm_metrics_note"] = (
            f"clean CE {out['ce_clean']:.2f} nats is near ln(vocab) = {math.log(vocab):.2f} "
            "(a random-weight model): delta LM loss, CE loss recovered and KL say nothing "
            "about a language model here")
    return out


def _bootstrap(sums: np.ndarray, n_resamples: int = 1000, seed: int = 0) -> dict:
    """95% intervals of delta LM loss and CE recovered over held-out rows (resampled with
    replacement), so a reader sees whether two SAEs' figures differ beyond row noise."""
    if len(sums) < 2:
        return {}
    rng = np.random.default_rng(seed)
    t = sums[rng.integers(0, len(sums), size=(n_resamples, len(sums)))].sum(1)
    clean, sae_ce, zero_ce, _, n_tok = t.T
    delta = (sae_ce - clean) / n_tok
    with np.errstate(divide="ignore", invalid="ignore"):
        recovered = (zero_ce - sae_ce) / (zero_ce - clean)
    recovered = recovered[np.isfinite(recovered)]

    def ci(v: np.ndarray) -> list[float] | None:
        return [float(q) for q in np.percentile(v, [2.5, 97.5])] if len(v) else None
    return {"delta_lm_loss_ci95": ci(delta), "ce_loss_recovered_ci95": ci(recovered)}
