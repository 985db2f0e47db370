"""Sparse autoencoders: JumpReLU (Gemma Scope), TopK and BatchTopK, and SAELens-layout export.

Weights follow SAELens's layout so export is a plain copy: W_enc [d_in, d_sae],
W_dec [d_sae, d_in] (row i is latent i's decoder atom), b_enc [d_sae], b_dec [d_in].

    z = (x - b_dec) W_enc + b_enc          pre-activation
    f = JumpReLU_theta(z) = z H(z - theta)  | TopK(z) | BatchTopK(z)
    x_hat = f W_dec + b_dec

The trainer sees activations scaled by one dataset scalar C (E||C x||^2 = 1);
`export_sae` folds C into the biases and thresholds so the exported SAE takes raw x.
"""
from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..core import atomic
from ..core.atomic import atomic_path, sha256_file
from ..core.config import SAECfg
from ..core.errors import SaelabError
from ..core.integrity import seal

WEIGHTS_FILE = "sae_weights.safetensors"
CFG_FILE = "cfg.json"
# sha256 and size of the two files above, for `saelab verify` (SAELens ignores it).
MANIFEST_FILE = "manifest.json"
# SAELens's config format version our cfg.json follows (>= 6.0 skips its legacy key renaming).
SAELENS_FORMAT_VERSION = "6.54.12"


# --- straight-through estimators (Gemma Scope, arXiv 2408.05147 §3.1; rectangle kernel) ---

def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """z H(z - theta). d/dz = H(z - theta); d/dtheta = -(theta/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return z * (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        # theta is fp32 (z may be bf16 under autocast): the kernel is evaluated in fp32.
        zt, gt = z.to(theta.dtype), g.to(theta.dtype)
        dz = g * (z > theta).to(g.dtype)
        dtheta = -(theta / eps) * (_rectangle((zt - theta) / eps) * gt).sum(0)
        return dz, dtheta, None


class _Step(torch.autograd.Function):
    """H(z - theta) for the L0 count. No gradient to z (so the L0 term trains only theta);
    d/dtheta = -(1/eps) K((z - theta)/eps)."""

    @staticmethod
    def forward(ctx, z, theta, eps):
        ctx.save_for_backward(z, theta)
        ctx.eps = eps
        return (z > theta).to(z.dtype)

    @staticmethod
    def backward(ctx, g):
        z, theta = ctx.saved_tensors
        eps = ctx.eps
        zt, gt = z.to(theta.dtype), g.to(theta.dtype)
        dtheta = -(1.0 / eps) * (_rectangle((zt - theta) / eps) * gt).sum(0)
        return None, dtheta, None


class _JumpReLUWithL0(torch.autograd.Function):
    """Training fusion of the two above: z H(z - theta), its per-row count (L0) and, not
    differentiable, its per-latent count over the batch (firing statistics).

    Its gradients are exactly those of `jumprelu` and of `step(...).sum(-1)` added, but the
    [batch, d_sae] mask and kernel are built once each and reused in place: every fresh
    tensor of that size costs a memory pass (and, on CPU, page faults), so there are few.
    """

    @staticmethod
    def forward(ctx, z, theta, eps):
        mask = (z > theta).to(z.dtype)
        ctx.save_for_backward(z, theta, mask)
        ctx.eps = eps
        counts = mask.sum(0, dtype=theta.dtype)
        ctx.mark_non_differentiable(counts)
        return z * mask, mask.sum(-1, dtype=theta.dtype), counts

    @staticmethod
    def backward(ctx, g_f, g_l0, _g_counts):
        z, theta, mask = ctx.saved_tensors
        eps = ctx.eps
        # Rectangle kernel K((z - theta)/eps) as 0/1 floats, built in place.
        kernel = (z.to(theta.dtype) - theta).abs_().lt_(0.5 * eps)
        # dL/dtheta = -(1/eps) [theta sum_b K g_f + sum_b K g_l0]
        from_l0 = g_l0.to(theta.dtype) @ kernel if g_l0 is not None else 0.0
        dtheta = (theta * kernel.mul_(g_f).sum(0) + from_l0) / -eps
        return g_f * mask, dtheta, None


def jumprelu_with_l0(z: torch.Tensor, theta: torch.Tensor, eps: float):
    """(f, L0 per row, firing count per latent) with Gemma Scope's straight-through
    gradients, in one pass."""
    return _JumpReLUWithL0.apply(z, theta, eps)


def jumprelu(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return _JumpReLU.apply(z, theta, eps)


def step(z: torch.Tensor, theta: torch.Tensor, eps: float) -> torch.Tensor:
    return _Step.apply(z, theta, eps)


# --- the model -------------------------------------------------------------------------

class SAE(nn.Module):
    def __init__(self, d_in: int, d_sae: int, cfg: SAECfg):
        super().__init__()
        self.d_in, self.d_sae, self.cfg = d_in, d_sae, cfg
        self.arch = cfg.architecture
        if self.arch != "jumprelu" and cfg.k > d_sae:
            raise SaelabError(f"sae.k = {cfg.k} exceeds d_sae = {d_sae}; lower sae.k")
        # He-uniform in the math layout [d_in, d_sae] (fan_in = d_sae), then unit-norm atoms;
        # the encoder starts as the decoder's transpose (scaled, see SAECfg), biases at zero.
        W = torch.empty(d_in, d_sae)
        nn.init.kaiming_uniform_(W, a=0.0, mode="fan_in", nonlinearity="relu")
        W_dec = W.t().contiguous()
        W_dec /= W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        self.unit_decoder = cfg.unit_decoder
        # TopK/BatchTopK with free norms (SAELens's rescale_acts_by_decoder_norm): they pick
        # and decode with the unit atoms W_dec / |W_dec|, scaling each pre-activation by its
        # atom's norm, so the model is still a unit-atom SAE; the stored norms only set how
        # far an Adam step turns each atom (~lr / norm).
        self.rescale = not self.unit_decoder and self.arch != "jumprelu"
        unit_topk = self.arch != "jumprelu" and self.unit_decoder
        enc_scale = 1.0 if unit_topk else cfg.encoder_init_scale
        self.W_enc = nn.Parameter(W_dec.t() * enc_scale)
        # Free atoms start at norm encoder_init_scale, so W_enc = W_dec^T (SAELens).
        self.W_dec = nn.Parameter(W_dec if self.unit_decoder else W_dec * enc_scale)
        self.b_enc = nn.Parameter(torch.zeros(d_sae))
        self.b_dec = nn.Parameter(torch.zeros(d_in))
        if self.arch == "jumprelu":
            init = torch.full((d_sae,), float(cfg.threshold_init))
            if cfg.theta_param == "log":
                self.log_threshold = nn.Parameter(init.log())
            else:
                self.raw_threshold = nn.Parameter(init)
        elif self.arch == "batchtopk":
            # Inference threshold, estimated during training (EMA of the smallest kept
            # activation per batch); BatchTopK exports as JumpReLU with it.
            self.register_buffer("batch_threshold", torch.zeros((), dtype=torch.float64))

    # -- pieces -------------------------------------------------------------------------
    @property
    def threshold(self) -> torch.Tensor:
        """theta in fp32 (trained as log theta or raw theta)."""
        if self.arch == "jumprelu":
            if self.cfg.theta_param == "log":
                return self.log_threshold.exp()
            return self.raw_threshold
        if self.arch == "batchtopk":
            return self.batch_threshold.float().expand(self.d_sae)
        raise AttributeError("a TopK SAE has no threshold")

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        # (x - b_dec) W_enc + b_enc, written x W_enc + (b_enc - b_dec W_enc) so that no
        # gradient flows into the [batch, d_in] input: that saves backward a whole matmul
        # (b_dec's gradient through the encoder becomes a vector-matrix product).
        W_enc, b_enc = self.encoder()
        bias = b_enc - self.b_dec @ W_enc
        z = torch.addmm(bias, x.reshape(-1, self.d_in), W_enc)
        return z.view(*x.shape[:-1], self.d_sae)

    def encoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(W_enc, b_enc) as the model applies them: with the rescale, each latent's column
        times its atom's norm (scaling the small weights, not the [batch, d_sae] output)."""
        if not self.rescale:
            return self.W_enc, self.b_enc
        norms = self.W_dec.norm(dim=1)
        return self.W_enc * norms, self.b_enc * norms

    def atoms(self) -> torch.Tensor:
        """The decoder atoms the model reconstructs with: W_dec, or W_dec / |W_dec| when
        TopK/BatchTopK rescale by the decoder norms."""
        if self.rescale:
            return self.W_dec / self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return self.W_dec

    def unit_form(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(W_enc, b_enc, W_dec) of the same function without the rescale: the norms
        folded into the encoder (SAELens's fold_W_dec_norm), for export."""
        return *self.encoder(), self.atoms()

    def activate(self, z: torch.Tensor) -> torch.Tensor:
        if self.arch == "jumprelu":
            return jumprelu(z, self.threshold, self.cfg.bandwidth)
        if self.arch == "topk":
            vals, idx = z.topk(self.cfg.k, dim=-1, sorted=False)
            return torch.zeros_like(z).scatter_(-1, idx, vals.relu())
        if self.training:
            return _batch_topk(z, self.cfg.k)
        return z * (z > self.batch_threshold.to(z.dtype)).to(z.dtype)

    # -- public API -----------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_acts(x))

    def decode(self, f: torch.Tensor) -> torch.Tensor:
        x_hat = torch.addmm(self.b_dec, f.reshape(-1, self.d_sae), self.atoms())
        return x_hat.view(*f.shape[:-1], self.d_in)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.encode(x)
        return self.decode(f), f

    @torch.no_grad()
    def remove_parallel_grad(self) -> None:
        """Project out the component of each atom's gradient parallel to the atom.

        With unit-norm atoms the parallel part only changes the norm, which the
        renormalisation after the step would undo; Adam would still count it.
        """
        g = self.W_dec.grad
        if g is None:
            return
        W = self.W_dec.to(g.dtype)
        g.sub_((g * W).sum(dim=1, keepdim=True) * W)

    @torch.no_grad()
    def normalise_decoder(self) -> None:
        self.W_dec.div_(self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))

    @torch.no_grad()
    def update_batch_threshold(self, f: torch.Tensor, rate: float = 0.01) -> None:
        """BatchTopK: EMA of the smallest activation batch top-k kept (no host sync)."""
        m = torch.where(f > 0, f, float("inf")).min().double()
        t = self.batch_threshold
        new = torch.where(t == 0, m, (1 - rate) * t + rate * m)
        t.copy_(torch.where(torch.isfinite(m), new, t))


def _batch_topk(z: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k * batch largest (relu'd) pre-activations of the whole batch."""
    flat = z.relu().flatten()
    vals, idx = flat.topk(k * z.shape[0], sorted=False)
    return torch.zeros_like(flat).scatter_(0, idx, vals).view_as(z)


class _SparseDecodeCPU(torch.autograd.Function):
    """sum_j vals[b, j] W[idx[b, j]] (k chosen atoms per row) with sparse-kernel gradients.

    embedding_bag's own backward sorts and segments every (row, atom) pair and is ~3x
    slower on CPU than these two sparse kernels: dvals is g W^T sampled at the chosen
    pairs (SDDMM, sampled_addmm); dW is F^T g with F the sparse [batch, d_sae] code.
    """

    @staticmethod
    def forward(ctx, idx, vals, W):
        ctx.save_for_backward(idx, vals, W)
        return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")

    @staticmethod
    def backward(ctx, g):
        idx, vals, W = ctx.saved_tensors
        (n, k), d_sae = idx.shape, W.shape[0]
        g = g.contiguous()
        dvals = dW = None
        with warnings.catch_warnings():  # "sparse CSR support is in beta": used as tested
            warnings.simplefilter("ignore", UserWarning)
            if ctx.needs_input_grad[1]:
                crow = torch.arange(0, n * k + 1, k, device=idx.device)
                pattern = torch.sparse_csr_tensor(crow, idx.flatten(), vals.detach().flatten(),
                                                  size=(n, d_sae))
                dvals = torch.sparse.sampled_addmm(pattern, g, W.t(), beta=0.0).values()
                dvals = dvals.view(n, k)
            if ctx.needs_input_grad[2]:
                rows = torch.arange(n, device=idx.device).repeat_interleave(k)
                code_t = torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]),
                                                 vals.detach().flatten(), (d_sae, n))
                dW = torch.sparse.mm(code_t, g)
        return None, dvals, dW


def sparse_decode(idx: torch.Tensor, vals: torch.Tensor, W: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] W[idx[b, j]] without b_dec; indices unique within each row.

    Costs batch * k * d_in, not a dense [batch, d_sae] matmul. CUDA keeps embedding_bag's
    own backward (its atomics-free sort is what the GPU is good at).
    """
    if W.device.type == "cpu":
        return _SparseDecodeCPU.apply(idx, vals, W)
    return F.embedding_bag(idx, W, per_sample_weights=vals, mode="sum")


def topk_decode(sae: SAE, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """TopK forward for training: (x_hat, indices, values) without a dense [batch, d_sae] f."""
    vals, idx = z.topk(sae.cfg.k, dim=-1, sorted=False)
    vals = vals.relu().to(sae.W_dec.dtype)
    return sparse_decode(idx, vals, sae.atoms()) + sae.b_dec, idx, vals


def auxk_decode(sae: SAE, z: torch.Tensor, dead: torch.Tensor, k_aux: int) -> torch.Tensor:
    """Decode (without b_dec) the top-k_aux pre-activations of dead latents (Gao et al. AuxK).

    k_aux must not exceed the number of dead latents.
    """
    masked = z.masked_fill(~dead, float("-inf"))
    vals, idx = masked.topk(k_aux, dim=-1, sorted=False)
    return sparse_decode(idx, vals.relu(), sae.atoms().to(z.dtype))


# --- export / load (SAELens layout) ----------------------------------------------------

def export_sae(sae: SAE, out_dir: Path, *, scale: float, meta: dict[str, Any]) -> Path:
    """Write cfg.json + sae_weights.safetensors in SAELens's layout, taking raw activations.

    The normalisation scalar C is folded in: b_enc/C, theta/C, b_dec/C (W unchanged), so
    x_hat'(x) = x_hat(C x) / C and f'(x) = f(C x) / C; hence normalize_activations "none".
    BatchTopK exports as JumpReLU with its estimated threshold (as SAELens does).
    `meta` fills SAELens's metadata (model_name, hook_name, ...) and our own fields.
    """
    if not (scale > 0 and math.isfinite(scale)):
        raise SaelabError(f"normalisation scale must be a positive number, got {scale}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    c = float(scale)
    with torch.no_grad():
        W_enc, b_enc, W_dec = sae.unit_form()
        tensors = {
            "W_enc": W_enc.detach().float().cpu(),
            "W_dec": W_dec.detach().float().cpu(),
            "b_enc": b_enc.detach().float().cpu() / c,
            "b_dec": sae.b_dec.detach().float().cpu() / c,
        }
        if sae.arch != "topk":
            tensors["threshold"] = sae.threshold.detach().float().cpu() / c
    tensors = {k: v.contiguous() for k, v in tensors.items()}
    architecture = "topk" if sae.arch == "topk" else "jumprelu"
    cfg: dict[str, Any] = {
        "architecture": architecture,
        "d_in": sae.d_in,
        "d_sae": sae.d_sae,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {
            "sae_lens_version": SAELENS_FORMAT_VERSION,
            "sae_lens_training_version": SAELENS_FORMAT_VERSION,
            "hook_name": "blocks.8.hook_mlp_out",
            "hook_head_index": None,
            "prepend_bos": True,
            **meta,
            "saelab_architecture": sae.arch,
            "saelab_scale_folded": c,
        },
    }
    if architecture == "topk":
        cfg["k"] = sae.cfg.k
        cfg["rescale_acts_by_decoder_norm"] = False
    with atomic_path(out_dir / WEIGHTS_FILE) as tmp:
        save_file(tensors, str(tmp))
        tmp.chmod(0o644)  # safetensors creates 0600; the export is meant to be shared
    atomic.write_text(out_dir / CFG_FILE, json.dumps(cfg, indent=2) + "\n")
    files = {n: {"sha256": sha256_file(out_dir / n), "bytes": (out_dir / n).stat().st_size}
             for n in (WEIGHTS_FILE, CFG_FILE)}
    atomic.write_text(out_dir / MANIFEST_FILE, json.dumps(
        seal({"format": "saelab-sae/1", "files": files}), indent=1) + "\n")
    return out_dir


def load_sae(path: Path, device: str | torch.device = "cpu") -> SAE:
    """Load an exported SAE (it takes raw activations: the scale is folded in)."""
    from .export_check import sae_problems

    path = Path(path)
    if not (path / CFG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise SaelabError(f"{path} holds no exported SAE ({CFG_FILE} + {WEIGHTS_FILE}); "
                          "run the train_sae stage first")
    if problems := sae_problems(path):
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise SaelabError(f"the SAE in {path} is damaged: {problems[0]}{more}; run `saelab "
                          "verify` to list every problem, then restore it (`dvc checkout "
                          f"{path}`) or export it again (`dvc repro -f train_sae`)")
    cfg = json.loads((path / CFG_FILE).read_text(encoding="utf-8"))
    arch = cfg["architecture"]
    # Exports are in unit form (norms folded into the encoder): load them as such.
    sae_cfg = dataclasses.replace(SAECfg(), architecture=arch, d_sae=cfg["d_sae"],
                                  theta_param="raw", decoder_norm="unit",
                                  k=int(cfg.get("k", SAECfg.k)))
    sae = SAE(cfg["d_in"], cfg["d_sae"], sae_cfg)
    weights = load_file(str(path / WEIGHTS_FILE))
    state = {k: weights[k] for k in ("W_enc", "W_dec", "b_enc", "b_dec")}
    if arch == "jumprelu":
        state["raw_threshold"] = weights["threshold"]
    sae.load_state_dict({k: v.float() for k, v in state.items()})
    return sae.to(device).eval()
