"""SAE training (Gemma Scope's recipe, DESIGN §6) and the `train_sae` stage.

Data: the activation store (shuffled across shards) or, with sae.stream, activations
straight from the model through an in-memory shuffle buffer. Checkpoints (atomic, with a
config fingerprint) make the stage resume by itself; a NaN/Inf guard stops it cleanly.

One step: loss = ||x - x_hat||^2 + lambda * sparsity (+ AuxK for TopK/BatchTopK), backward,
decoder-gradient projection, gradient-norm clip, Adam, decoder renormalisation (the two
decoder steps only for unit-norm atoms: sae.decoder_norm "free" skips them).
fp32 master weights; bf16 autocast for the matmuls on CUDA only; theta stays fp32; no
GradScaler. Under torchrun each rank takes batch_size / world_size rows of every global
batch and DistributedDataParallel averages the gradients.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Union

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..core import atomic
from . import checkpoint
from ..core.config import SAECfg
from ..core.errors import SaelabError
from ..activations.hooks import saelens_hook_name
from .evals import reconstruction_stats
from .autoencoder import SAE, auxk_decode, jumprelu_with_l0, topk_decode
from .schedules import l0_factor, lr_factor
from .sparsity import CALIBRATION_TOKENS, L0Controller, calibrate, l0_miss, l0_target, \
    needs_calibration

log = logging.getLogger(__name__)

# A source of local batches: an iterator, or a function of the first batch index to read
# (lets a resumed run seek instead of reading and discarding what it already trained on).
Batches = Union[Iterator[torch.Tensor], Callable[[int], Iterator[torch.Tensor]]]
THETA_QUANTILES = (0.1, 0.5, 0.9)
# Fields that do not change the trajectory: a checkpoint stays valid when they change.
_NOT_IN_FINGERPRINT = ("checkpoint_every", "eval_tokens")


@dataclass
class TrainResult:
    sae: SAE
    metrics: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    # Each latent's firing frequency on the evaluation batches (None without them).
    density: torch.Tensor | None = None


class _Objective(nn.Module):
    """The training loss as a module, so DistributedDataParallel can wrap it."""

    def __init__(self, sae: SAE):
        super().__init__()
        self.sae = sae

    def forward(self, x: torch.Tensor, lam: float, dead: torch.Tensor | None, n_dead: int):
        sae, cfg = self.sae, self.sae.cfg
        z = sae.pre_acts(x)
        f = None
        if sae.arch == "topk":
            x_hat, idx, vals = topk_decode(sae, z)
            counts = torch.bincount(idx.flatten(), weights=(vals > 0).flatten().float(),
                                    minlength=sae.d_sae)
        else:
            if sae.arch == "jumprelu":
                # L0 through the step function's STE: its gradient reaches theta only.
                f, l0_each, counts = jumprelu_with_l0(z, sae.threshold, cfg.bandwidth)
            else:
                f = sae.activate(z)
                counts = (f > 0).sum(0, dtype=torch.float32)
            x_hat = sae.decode(f)
        resid = x - x_hat.float()
        recon = resid.pow(2).sum(-1).mean()
        loss = recon
        if sae.arch == "jumprelu":
            if cfg.sparsity != "quadratic_l0":  # l0, and target_l0 with a controlled lam
                loss = loss + lam * l0_each.mean()
            else:
                loss = loss + lam * (2.0 / cfg.target_l0) * (l0_each - cfg.target_l0).pow(2).mean()
        elif n_dead > 0:
            # AuxK (Gao et al. 2024): dead latents reconstruct the residual; normalised by
            # the batch's variance, scaled down while fewer latents are dead than aux_k.
            e_hat = auxk_decode(sae, z, dead, min(cfg.aux_k, n_dead)).float()
            aux = (e_hat - resid.detach()).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
            loss = loss + cfg.aux_coeff * min(n_dead / cfg.aux_k, 1.0) * aux
        # Firing counts per latent (their sum / batch is L0); f only where the caller needs it.
        return loss, recon.detach(), counts, f.detach() if sae.arch == "batchtopk" else None


def _dist() -> tuple[int, int]:
    from ..core.runtime import rank_world

    return rank_world()


def _fingerprint(cfg: SAECfg, **extra) -> str:
    spec = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _NOT_IN_FINGERPRINT}
    return checkpoint.fingerprint({**spec, **extra})


def train(cfg: SAECfg, batches: Batches, *, d_in: int, n_tokens: int, lr: float,
          device: torch.device | str, seed: int, checkpoint_dir: Path | None = None,
          log_fn: Callable[[int, dict], None] | None = None,
          eval_batches: Iterator[torch.Tensor] | None = None,
          eval_n_batches: int | None = None, data_fingerprint: str = "") -> TrainResult:
    """Train an SAE on already-normalised activations; see the module docstring.

    `batches` yields this rank's [batch_size / world_size, d_in] slice of each global batch.
    Steps = n_tokens // batch_size. With `checkpoint_dir`, state is saved every
    `cfg.checkpoint_every` steps and a matching checkpoint found there is resumed.
    `eval_batches` (held-out, same space) give the final reconstruction metrics; without
    them the last logging window of training does.
    """
    device = torch.device(device)
    rank, world = _dist()
    if cfg.batch_size % world:
        raise SaelabError(f"sae.batch_size = {cfg.batch_size} is not divisible by the "
                          f"{world} processes; pick a multiple of {world}")
    local_bs = cfg.batch_size // world
    total_steps = n_tokens // cfg.batch_size
    if total_steps < 1:
        raise SaelabError(f"{n_tokens} tokens make no step of sae.batch_size = "
                          f"{cfg.batch_size}; raise sae.n_tokens or lower sae.batch_size")
    if not (lr > 0 and math.isfinite(lr)):
        raise SaelabError(f"learning rate must be a positive number, got {lr}")

    torch.manual_seed(seed)
    sae = SAE(d_in, cfg.d_sae, cfg).to(device)
    objective: nn.Module = _Objective(sae)
    if dist.is_available() and dist.is_initialized():
        objective = nn.parallel.DistributedDataParallel(
            objective, device_ids=[device.index] if device.type == "cuda" else None)
    opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=cfg.adam_betas,
                           eps=cfg.adam_eps)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16,
                              enabled=cfg.autocast_bf16 and device.type == "cuda")

    st = _fresh_state(cfg.d_sae, device)
    fp = _fingerprint(cfg, d_in=d_in, n_tokens=n_tokens, lr=lr, seed=seed, world=world,
                      data=data_fingerprint)
    ckpt = _find_checkpoint(checkpoint_dir, fp, rank, world)
    if ckpt is not None:
        sae.load_state_dict(ckpt["sae"])
        opt.load_state_dict(ckpt["optimizer"])
        for k, v in ckpt["state"].items():
            st[k] = v.to(device) if isinstance(v, torch.Tensor) else v
        checkpoint.set_rng_state(ckpt["rng"])
        log.info("resumed from step %d of %d (%s)", st["step"], total_steps, checkpoint_dir)

    start = st["step"]
    if callable(batches):
        data = batches(start)
    else:
        data = itertools.islice(batches, start, None)
    params = [p for p in sae.parameters()]
    use_aux = cfg.architecture != "jumprelu" and cfg.aux_k > 0
    lam = 0.0
    controller = L0Controller(cfg) if cfg.architecture == "jumprelu" and \
        cfg.sparsity == "target_l0" else None
    gnorm = torch.zeros((), device=device)
    # The last training batches, for `calibrate` after the last step.
    n_cal = math.ceil(CALIBRATION_TOKENS / local_bs) if needs_calibration(cfg) else 0
    recent: collections.deque[torch.Tensor] = collections.deque(maxlen=min(n_cal, total_steps))

    from ..core.progress import Progress

    # A bar on a terminal; elsewhere (nohup, SLURM, dvc queue) a log line a minute.
    bar = Progress("train_sae", total_steps, initial=start, rate_per=cfg.batch_size,
                   enabled=rank == 0)
    t0 = time.perf_counter()
    steps_run = 0
    for s in range(start, total_steps):
        try:
            x = next(data)
        except StopIteration:
            raise SaelabError(f"the activation source ran out at step {s} of {total_steps}; "
                              "it must supply n_tokens // batch_size batches") from None
        if x.shape != (local_bs, d_in):
            raise SaelabError(f"batch of shape {tuple(x.shape)}; expected ({local_bs}, {d_in})")
        x = x.to(device, torch.float32, non_blocking=True)
        if recent.maxlen and s >= total_steps - recent.maxlen:
            recent.append(x.clone())  # a copy: a source may reuse its buffers
        for g in opt.param_groups:
            g["lr"] = lr * lr_factor(s, total_steps, cfg)
        lam = controller.lam(st["l0_control"]) if controller else \
            cfg.l0_coeff * l0_factor(s, cfg)

        with autocast:
            loss, recon, fired, f = objective(x, lam, st["dead"], st["n_dead"] if use_aux else 0)
        gnorm = _apply_gradients(sae, opt, loss, params, f, gnorm, world)
        if controller:
            controller.update(st["l0_control"], s, *_global_l0_mse(fired, recon, len(x), world))
        with torch.no_grad():
            _record_step(st, s, x, loss, recon, fired, gnorm)
        st["step"] = s + 1
        st["tokens_seen"] += cfg.batch_size
        steps_run += 1
        last = s + 1 == total_steps
        if (s + 1) % cfg.log_every == 0 or last:
            _check_finite(st, total_steps, checkpoint_dir)
            row = _close_window(st, cfg, step=s + 1, d_in=d_in, world=world,
                                lr=opt.param_groups[0]["lr"], lam=lam, gnorm=gnorm)
            if log_fn is not None and rank == 0:
                log_fn(s + 1, row)
            bar.update(1, loss=row["loss"], L0=row["l0"])
        else:
            bar.update(1)
        if checkpoint_dir is not None and ((s + 1) % cfg.checkpoint_every == 0 or last):
            _check_finite(st, total_steps, checkpoint_dir)
            if rank == 0:
                _save_checkpoint(checkpoint_dir, fp, sae, opt, st)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - t0
    bar.close()
    _check_finite(st, total_steps, checkpoint_dir)

    sae.eval()
    factor = None
    if recent.maxlen:
        if len(recent) < recent.maxlen and callable(batches):
            # Resumed inside the last steps: read their batches again (same data, same order).
            again = itertools.islice(batches(total_steps - recent.maxlen), recent.maxlen)
            recent = collections.deque(x.to(device, torch.float32) for x in again)
        factor = calibrate(sae, list(recent), world)
    metrics, density = _final_metrics(
        sae, st, total_steps=total_steps, steps_run=steps_run, elapsed=elapsed,
        eval_batches=eval_batches, n_eval=eval_n_batches or max(1, cfg.eval_tokens // local_bs),
        lambda_at_floor=bool(controller and controller.at_floor(st["l0_control"])))
    if factor is not None and cfg.architecture == "jumprelu":
        metrics["threshold_factor"] = factor
    return TrainResult(sae=sae, metrics=metrics, history=list(st["history"]), density=density)


# --- the pieces of a training run ------------------------------------------------------

def _fresh_state(d_sae: int, device: torch.device) -> dict[str, Any]:
    """The running state besides the SAE and optimiser, all of it checkpointed so a resumed
    run is bit-identical: step, dead-latent clocks, the open logging window (loss, recon,
    L0, variance, steps), the first non-finite step, history rows."""
    return {
        "step": 0,
        "since_fired": torch.zeros(d_sae, dtype=torch.float64, device=device),
        "dead": torch.zeros(d_sae, dtype=torch.bool, device=device),
        "n_dead": 0,
        "win_counts": torch.zeros(d_sae, dtype=torch.float64, device=device),
        "win": torch.zeros(5, dtype=torch.float64, device=device),  # loss recon l0 var steps
        "first_bad": torch.full((), -1, dtype=torch.long, device=device),
        "history": [],
        "tokens_seen": 0,
        "l0_control": L0Controller.fresh_state(device),
    }


def _global_l0_mse(fired: torch.Tensor, recon: torch.Tensor, n_rows: int,
                   world: int) -> torch.Tensor:
    """The step's L0 and MSE over all ranks (every rank's controller must see the same)."""
    both = torch.stack([fired.sum().double() / n_rows, recon.double()])
    if world > 1:
        dist.all_reduce(both)
        both /= world
    return both[0], both[1]


def _find_checkpoint(checkpoint_dir: Path | None, fp: str, rank: int,
                     world: int) -> dict[str, Any] | None:
    """Rank 0's matching checkpoint, handed to every rank."""
    ckpt = checkpoint.load(checkpoint_dir, fp) if rank == 0 else None
    if world > 1:
        box = [ckpt]
        dist.broadcast_object_list(box, src=0)
        ckpt = box[0]
    return ckpt


def _save_checkpoint(checkpoint_dir: Path, fp: str, sae: SAE, opt: torch.optim.Optimizer,
                     st: dict[str, Any]) -> None:
    checkpoint.save(checkpoint_dir, {
        "fingerprint": fp, "sae": sae.state_dict(), "optimizer": opt.state_dict(),
        "state": {k: (v.cpu() if isinstance(v, torch.Tensor) else v) for k, v in st.items()},
        "rng": checkpoint.rng_state(),
    })


def _check_finite(st: dict[str, Any], total_steps: int, checkpoint_dir: Path | None) -> None:
    bad = int(st["first_bad"])
    if bad >= 0:
        where = f"; the last good checkpoint is in {checkpoint_dir}" if checkpoint_dir else ""
        raise SaelabError(
            f"the loss or gradient became NaN/Inf at step {bad + 1} of {total_steps}"
            f"{where}. Lower the learning rate (sae.lr) or keep sae.clip_grad_norm on, "
            f"and check the activations for Inf/NaN")


def _apply_gradients(sae: SAE, opt: torch.optim.Optimizer, loss: torch.Tensor,
                     params: list[nn.Parameter], f: torch.Tensor | None, gnorm: torch.Tensor,
                     world: int) -> torch.Tensor:
    """Backward, decoder-gradient projection, clip, Adam, then the constraints that follow a
    step (unit atoms, theta >= 0, BatchTopK's threshold); returns the gradient norm."""
    cfg = sae.cfg
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if sae.unit_decoder:
        sae.remove_parallel_grad()
    if cfg.clip_grad_norm > 0:
        gnorm = nn.utils.clip_grad_norm_(params, cfg.clip_grad_norm)
    opt.step()
    with torch.no_grad():
        if sae.unit_decoder:
            sae.normalise_decoder()
        if cfg.architecture == "jumprelu" and cfg.theta_param == "raw":
            # Keep theta >= 0 by projection (a clamp in the graph would kill its gradient).
            sae.raw_threshold.clamp_(min=0.0)
        if cfg.architecture == "batchtopk":
            sae.update_batch_threshold(f)
            if world > 1:
                dist.all_reduce(sae.batch_threshold)
                sae.batch_threshold /= world
    return gnorm


def _record_step(st: dict[str, Any], s: int, x: torch.Tensor, loss: torch.Tensor,
                 recon: torch.Tensor, fired: torch.Tensor, gnorm: torch.Tensor) -> None:
    """Add step `s` to the logging window, on the device (no sync), and remember the first
    step whose loss or gradient was not finite."""
    ok = torch.isfinite(loss) & torch.isfinite(gnorm)
    st["first_bad"] = torch.where(ok | (st["first_bad"] >= 0), st["first_bad"],
                                  torch.full_like(st["first_bad"], s))
    st["win_counts"] += fired
    st["win"] += torch.stack([loss.detach().double(), recon.double(),
                              fired.sum().double() / len(x),
                              (x - x.mean(0)).pow(2).sum(-1).mean().double(),
                              torch.ones((), dtype=torch.float64, device=x.device)])


def _close_window(st: dict[str, Any], cfg: SAECfg, *, step: int, d_in: int, world: int,
                  lr: float, lam: float, gnorm: torch.Tensor) -> dict[str, float]:
    """End of a logging window: global firing stats, dead mask, the history row."""
    if world > 1:
        dist.all_reduce(st["win_counts"])
        dist.all_reduce(st["win"])
        st["win"] /= world
    w = st["win"].tolist()
    n_steps = max(w[4], 1.0)
    tokens = n_steps * cfg.batch_size
    fired = st["win_counts"] > 0
    st["since_fired"] = torch.where(fired, 0.0, st["since_fired"] + tokens)
    st["dead"] = st["since_fired"] >= cfg.dead_tokens
    st["n_dead"] = int(st["dead"].sum())
    # Dead: silent for sae.dead_tokens; a run shorter than twice that uses the last half
    # of its tokens, else a latent that fired once early would never count as dead.
    dead_window = min(cfg.dead_tokens, max(st["tokens_seen"] // 2, 1))
    density = st["win_counts"] / tokens
    row = {
        "step": step, "tokens": st["tokens_seen"],
        "loss": w[0] / n_steps, "mse": w[1] / n_steps / d_in, "l0": w[2] / n_steps,
        "fvu": w[1] / w[3] if w[3] > 0 else math.nan,
        "lr": lr, "lambda": float(lam),
        "grad_norm": float(gnorm),
        "dead_fraction": float((st["since_fired"] >= dead_window).double().mean()),
        "frac_active_gt_1pct": float((density > 0.01).double().mean()),
        "frac_active_gt_10pct": float((density > 0.1).double().mean()),
    }
    st["history"].append(row)
    st["win_counts"].zero_()
    st["win"].zero_()
    return row


def _final_metrics(sae: SAE, st: dict[str, Any], *, total_steps: int, steps_run: int,
                   elapsed: float, eval_batches: Iterator[torch.Tensor] | None,
                   n_eval: int, lambda_at_floor: bool = False,
                   ) -> tuple[dict[str, Any], torch.Tensor | None]:
    """Throughput and the last window's figures; reconstruction (and the firing density per
    latent) on `eval_batches` if given; threshold quantiles for the architectures that have
    thresholds; the L0 target and its miss."""
    cfg = sae.cfg
    last_row = st["history"][-1] if st["history"] else {}
    metrics: dict[str, Any] = {
        "steps": total_steps, "tokens": total_steps * cfg.batch_size,
        "tokens_per_s": steps_run * cfg.batch_size / elapsed if steps_run and elapsed > 0
        else math.nan,
        "final_loss": last_row.get("loss", math.nan),
        "dead_fraction": last_row.get("dead_fraction", math.nan),
    }
    density = None
    if eval_batches is not None:
        recon, density = reconstruction_stats(sae, eval_batches, n_eval)
        metrics.update(recon)
    else:
        metrics.update({k: last_row.get(k, math.nan) for k in
                        ("mse", "fvu", "l0", "frac_active_gt_1pct", "frac_active_gt_10pct")})
    metrics.update(l0_miss(metrics["l0"], l0_target(cfg), last_row.get("lambda")
                           if cfg.architecture == "jumprelu" else None, lambda_at_floor))
    if cfg.architecture != "topk":
        theta = sae.threshold.detach().float().cpu()
        for q in THETA_QUANTILES:
            metrics[f"theta_q{int(q * 100)}"] = float(theta.quantile(q))
    return metrics, density


# --- streaming: activations straight from the model, shuffled in memory ----------------

def shuffled_batches(chunks: Iterator[torch.Tensor], *, capacity: int, batch_size: int,
                     seed: int | tuple[int, ...], scale: float) -> Iterator[torch.Tensor]:
    """Float32 batches of `scale * x` from a stream of [n, d] chunks, shuffled in memory.

    Fill a buffer of `capacity` vectors, emit it as random batches (fill c is permuted by
    rng([seed, c]) and each batch's ids are sorted, as the store does), keep the remainder
    and refill. When the buffer holds the whole stream this is exactly the store's epoch-0
    order, so the same activations train the same SAE either way. Nothing touches the disk.
    """
    chunks = iter(chunks)
    leftover: torch.Tensor | None = None
    for fill in itertools.count():
        parts = [] if leftover is None else [leftover]
        n = 0 if leftover is None else len(leftover)
        while n < capacity:
            chunk = next(chunks, None)
            if chunk is None:
                break
            parts.append(chunk)
            n += len(chunk)
        if n < batch_size:
            return
        data = torch.cat(parts)
        del parts
        perm = torch.from_numpy(np.random.default_rng([*np.ravel(seed), fill]).permutation(n))
        n_full = n // batch_size
        for j in range(n_full):
            ids = perm[j * batch_size:(j + 1) * batch_size].sort().values.to(data.device)
            yield data.index_select(0, ids).float().mul_(scale)
        leftover = data.index_select(0, perm[n_full * batch_size:].to(data.device))


# --- the train_sae stage ---------------------------------------------------------------

CURVES_CSV = "curves.csv"
DENSITY_PNG = "density.png"  # and density.csv beside it
CURVE_COLUMNS = ("step", "loss", "mse", "l0", "fvu", "lr", "lambda")


def resolve_lr(cfg: SAECfg, fit_json: Path) -> tuple[float, str]:
    """sae.lr if set, else fit_scaling_laws's recommendation; and where it came from."""
    if cfg.lr is not None:
        return cfg.lr, "params.sae.lr"
    rec = (atomic.read_json(fit_json) or {}).get("recommended") or {}
    lr = rec.get("lr")
    if lr is None or not (isinstance(lr, (int, float)) and lr > 0 and math.isfinite(lr)):
        raise SaelabError(f"sae.lr is null and {fit_json} has no usable recommended.lr; run "
                          "`dvc repro fit_scaling_laws` or set sae.lr in conf/config.yaml")
    return float(lr), f"{fit_json} ({rec.get('lr_source', 'fit')})"


def resolve_tokens(cfg: SAECfg, budget_json: Path) -> tuple[int, str]:
    """sae.n_tokens if set, else the compute budget's token count; and where it came from."""
    if cfg.n_tokens is not None:
        return cfg.n_tokens, "params.sae.n_tokens"
    tokens = (atomic.read_json(budget_json) or {}).get("tokens")
    if not isinstance(tokens, (int, float)) or tokens < 1:
        raise SaelabError(f"sae.n_tokens is null and {budget_json} has no token budget; run "
                          "`dvc repro fit_scaling_laws` or set sae.n_tokens")
    return int(tokens), str(budget_json)


def store_passes(batch_size: int, n_tokens: int, store_tokens: int) -> float:
    """Passes over a store of `store_tokens` vectors that training on `n_tokens` makes
    (`ActivationStore.iter_batches` drops each epoch's remainder)."""
    per_epoch = store_tokens // batch_size
    return (n_tokens // batch_size) / per_epoch if per_epoch else math.inf


def check_epochs(cfg: SAECfg, n_tokens: int, tokens_source: str, store) -> float:
    """The passes a store-fed run makes; stops before training above sae.max_epochs."""
    from ..activations.store import estimate_bytes

    passes = store_passes(cfg.batch_size, n_tokens, store.n_tokens)
    if passes > cfg.max_epochs:
        need = estimate_bytes(n_tokens, store.d, store.dtype, store.context_len)
        size = f"{need / 1e12:.1f} TB" if need >= 1e12 else f"{need / 1e9:.2f} GB"
        raise SaelabError(
            f"training on {n_tokens} tokens ({tokens_source}) would pass {passes:.1f} times "
            f"over the {store.n_tokens} stored activations, more than sae.max_epochs = "
            f"{cfg.max_epochs:g}. Train on fresh tokens streamed from the model "
            f"(sae.stream = true, over a corpus holding {n_tokens} tokens), or extract more "
            f"(extract.n_tokens = {n_tokens}: a store of about {size})")
    return passes


def _run(params) -> None:
    import shutil

    from ..core import paths
    from ..core.runtime import compute_dtype, init_distributed, resolve_device, seed_everything
    from ..activations.store import ActivationStore
    from ..core.tracking import log_metrics, log_params, set_tags

    cfg, seed = params.sae, params.run.seed
    device = resolve_device(params)
    rank, world = init_distributed(device)
    seed_everything(seed)
    lr, lr_source = resolve_lr(cfg, paths.FIT_JSON)
    n_tokens, tokens_source = resolve_tokens(cfg, paths.BUDGET_JSON)
    store = ActivationStore(paths.ACTIVATIONS_DIR) if (
        not cfg.stream or (paths.ACTIVATIONS_DIR / "manifest.json").is_file()) else None
    if store is not None:
        store.check(full=True)  # hashing is < 2% of training at any profile (store.py)
    # Each streamed vector trains once; a store may be passed over up to sae.max_epochs.
    epochs = 1.0 if cfg.stream else check_epochs(cfg, n_tokens, tokens_source, store)

    have_model = (paths.MODEL_DIR / "config.json").is_file()
    model = tokenizer = None
    if have_model:
        from ..data.base_model import load_model

        model, tokenizer = load_model(paths.MODEL_DIR, device=device,
                                      dtype=compute_dtype(params, device),
                                      attn_implementation=params.extract.attn_implementation)
    elif cfg.stream:
        raise SaelabError(f"sae.stream is true but there is no model in {paths.MODEL_DIR}; "
                          "run `dvc repro fetch_model`")

    if cfg.stream:
        d_in, scale, data_fp, make_batches = _stream_source(params, model, tokenizer, store,
                                                            device, rank, world)
        source = "stream"
    else:
        d_in, scale, data_fp = store.d, store.scale, store.manifest["fingerprint"]

        def make_batches(start: int) -> Iterator[torch.Tensor]:
            from ..activations.extract import prefetch

            # Gathering from the memmap (and pinning, for async copies to the GPU) runs in
            # a background thread while the device trains on the previous batch.
            it = store.iter_batches(cfg.batch_size, seed=seed, start_batch=start, rank=rank,
                                    world_size=world)
            return prefetch((b.pin_memory() for b in it) if device.type == "cuda" else it)
        source = "store"

    # Held-out metrics are rank 0's to report: the other processes skip building them.
    heldout_rows = _heldout_rows(params, tokenizer) if have_model and rank == 0 else []
    eval_batches = _eval_batches(params, model, tokenizer, store, heldout_rows, scale, device) \
        if rank == 0 else None
    if rank == 0:
        # The values used, under the keys of the params they resolve (a null sae.lr logs
        # the fitted lr): the compare view's axes are numbers. The metric `train.lr` is the
        # schedule, so no param takes that name.
        log_params({"sae.lr": lr, "sae.n_tokens": n_tokens, "sae.adam_beta1": cfg.adam_betas[0],
                    "train.d_in": d_in, "train.world_size": world,
                    "train.data_source": source, "train.epochs": epochs})
        set_tags({"train.lr_source": lr_source, "train.n_tokens_source": tokens_source})
    log.info("training %s SAE d_in=%d d_sae=%d on %d tokens (%s) with lr %.3g (%s), %d "
             "process(es), data from the %s (%.2f passes)", cfg.architecture, d_in, cfg.d_sae,
             n_tokens, tokens_source, lr, lr_source, world, source, epochs)

    ckpt_dir = paths.CHECKPOINT_DIR / "train_sae"
    result = train(cfg, make_batches, d_in=d_in, n_tokens=n_tokens, lr=lr, device=device,
                   seed=seed, checkpoint_dir=ckpt_dir,
                   log_fn=lambda step, row: log_metrics({"train": row}, step=step),
                   eval_batches=eval_batches, data_fingerprint=data_fp)
    try:
        if rank == 0:
            result.metrics["epochs"] = epochs
            _report(params, result, lr=lr, lr_source=lr_source, n_tokens=n_tokens,
                    tokens_source=tokens_source, source=source, scale=scale, d_in=d_in,
                    world=world, model=model, tokenizer=tokenizer, heldout_rows=heldout_rows,
                    device=device)
            # Complete and exported: a later run with the same params starts clean.
            shutil.rmtree(ckpt_dir, ignore_errors=True)
    finally:
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _report(params, result: TrainResult, *, lr, lr_source, n_tokens, tokens_source, source,
            scale, d_in, world, model, tokenizer, heldout_rows, device) -> None:
    """Rank 0: LM metrics, export, metrics.json, curves.csv, MLflow."""
    import json
    import shutil

    from ..core import paths
    from ..core.plots import write_csv
    from .autoencoder import export_sae
    from .density import write_density
    from ..core.tracking import log_artifact, log_metrics, set_tags

    cfg, ex, seed = params.sae, params.extract, params.run.seed
    info = atomic.read_json(paths.MODEL_JSON) or {}
    hook_name = saelens_hook_name(ex.layer, ex.hook)
    metrics = dict(result.metrics)
    if model is not None and heldout_rows:
        from .evals import lm_metrics
        metrics.update(lm_metrics(model, result.sae, _row_batches(heldout_rows, 8),
                                  layer=ex.layer, hook=ex.hook, scale=scale, device=device,
                                  special_ids=(tokenizer.bos_token_id, tokenizer.eos_token_id)))
        set_tags({"lm_metrics_meaningful": metrics["lm_metrics_meaningful"]})
        if not metrics["lm_metrics_meaningful"]:
            log.warning("LM metrics are not meaningful here: %s", metrics["lm_metrics_note"])
    if paths.SAE_DIR.exists():
        shutil.rmtree(paths.SAE_DIR)
    export_sae(result.sae, paths.SAE_DIR, scale=scale, meta={
        "model_name": info.get("name", params.model.name),
        "model_revision": info.get("revision"), "hook_name": hook_name,
        "layer": ex.layer, "hook": ex.hook, "context_size": ex.context_len,
        "dataset_path": str(paths.CORPUS_DIR), "normalisation_scale": scale,
        "lr": lr, "lr_source": lr_source, "n_tokens": n_tokens, "n_tokens_source": tokens_source,
        "training_tokens": metrics["tokens"], "seed": seed, "data_source": source,
        "sae_config": dataclasses.asdict(cfg)})
    # Throughput goes to MLflow and the log only: metrics.json is tracked by DVC and must be
    # byte-identical on rerun.
    report = {**{k: v for k, v in metrics.items() if k != "tokens_per_s"}, "lr": lr,
              "n_tokens": n_tokens, "d_in": d_in, "d_sae": cfg.d_sae,
              "architecture": cfg.architecture, "world_size": world,
              "sources": {"lr": lr_source, "n_tokens": tokens_source, "data": source,
                          "eval": "heldout documents" if model is not None and heldout_rows
                          else "store sample"}}
    paths.TRAIN_METRICS.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(paths.TRAIN_METRICS, json.dumps(report, indent=2) + "\n")
    write_csv(paths.TRAIN_DIR / CURVES_CSV, result.history, list(CURVE_COLUMNS))
    density_files = [] if result.density is None else write_density(
        result.density, metrics["eval_tokens"], paths.TRAIN_DIR / DENSITY_PNG,
        f"{cfg.architecture} d_sae={cfg.d_sae}: feature density ({report['sources']['eval']})")
    log_metrics({"final": metrics})
    for p in (paths.TRAIN_METRICS, paths.TRAIN_DIR / CURVES_CSV, *density_files):
        log_artifact(p, "train")
    log_artifact(paths.SAE_DIR, "sae")
    log.info("SAE exported to %s: FVU %.4f, L0 %.2f, dead %.3f, %.0f tokens/s", paths.SAE_DIR,
             metrics["fvu"], metrics["l0"], metrics["dead_fraction"], metrics["tokens_per_s"])


def _heldout_rows(params, tokenizer) -> list[np.ndarray]:
    """Held-out token rows at the training context (BOS first), about sae.eval_tokens tokens."""
    from ..core import paths
    from ..data.corpus import iter_documents
    from ..activations.extract import token_rows

    if not (paths.CORPUS_DIR / "manifest.json").is_file() or params.sae.eval_tokens == 0:
        return []
    # File order, not the seeded one: the evaluation set stays the same whatever run.seed.
    texts = (text for _, text in iter_documents(paths.CORPUS_DIR, split="heldout"))
    n_rows = -(-params.sae.eval_tokens // params.extract.context_len)
    return list(itertools.islice(token_rows(tokenizer, texts, params.extract.context_len), n_rows))


def _row_batches(rows: list[np.ndarray], n: int) -> Iterator[torch.Tensor]:
    for i in range(0, len(rows), n):
        yield torch.from_numpy(np.stack(rows[i:i + n]).astype(np.int64))


def _eval_batches(params, model, tokenizer, store, rows, scale: float, device,
                  ) -> Iterator[torch.Tensor] | None:
    """Normalised held-out activations: from held-out documents through the model, or, with
    no model or held-out text, a sample of the store (tokens the SAE may have trained on)."""
    from ..activations.extract import special_token_ids, stream_activations

    ex, n = params.extract, params.sae.eval_tokens
    if n == 0:
        return None
    if model is not None and rows:
        acts = [b.acts for b in stream_activations(
            model, rows, layer=ex.layer, hook=ex.hook, batch_tokens=ex.batch_tokens,
            device=device, exclude_ids=special_token_ids(tokenizer))]
        x = torch.cat(acts)[:n].float() * scale
    elif store is not None:
        x = store.sample(n, seed=params.run.seed + 1)
    else:
        return None
    return iter(x.split(params.sae.batch_size))


def stream_scale(acts: Iterator[torch.Tensor], n_vectors: int = 65_536) -> float:
    """The normalisation scalar C (E||C x||^2 = 1) over the first ~`n_vectors` streamed."""
    sq, n = 0.0, 0
    for a in acts:
        sq += float(a.float().pow(2).sum())
        n += len(a)
        if n >= n_vectors:
            break
    if n == 0:
        raise SaelabError("the corpus yields no tokens to stream; run `dvc repro fetch_oscar`")
    return 1.0 / math.sqrt(sq / n)


def _stream_source(params, model, tokenizer, store, device, rank: int, world: int):
    """(d_in, scale, data fingerprint, batches factory) for training straight from the model."""
    from ..core import paths
    from ..data.corpus import DOC_ORDER_RULE, iter_documents
    from ..activations.extract import prefetch, special_token_ids, stream_activations, token_rows
    from ..activations.hooks import hook_dim
    from .streaming import lane_batches, resolve_lanes

    cfg, ex, seed = params.sae, params.extract, params.run.seed
    d_in = hook_dim(model.config, ex.hook)
    specials = special_token_ids(tokenizer)
    n_lanes = resolve_lanes(cfg, world)

    def rows(my_share: bool) -> Iterator[np.ndarray]:
        # Tokenizing runs in a background thread, overlapping the forward passes. The
        # documents come in extraction's seeded order (the same on every rank), so a run
        # shorter than one pass still draws from every part of the corpus.
        texts = (text for _, text in iter_documents(paths.CORPUS_DIR, split="train",
                                                    seed=seed))
        it = token_rows(tokenizer, texts, ex.context_len)
        return prefetch(itertools.islice(it, rank, None, world) if my_share else it)

    def forwards(my_share: bool):
        return stream_activations(model, rows(my_share), layer=ex.layer, hook=ex.hook,
                                  batch_tokens=ex.batch_tokens, device=device,
                                  exclude_ids=specials)

    same_site = store is not None and (store.manifest.get("layer"), store.manifest.get("hook")) \
        == (ex.layer, ex.hook)
    # Without a store of this site: from the first streamed vectors (the same on every rank).
    scale = store.scale if same_site else stream_scale(b.acts for b in forwards(False))
    data_fp = checkpoint.fingerprint({"stream": True, "corpus": atomic.read_json(
        paths.CORPUS_DIR / "manifest.json"), "model": atomic.read_json(paths.MODEL_JSON),
        "extract": dataclasses.asdict(ex), "scale": scale,
        "doc_order": {"seed": seed, "rule": DOC_ORDER_RULE}})

    def make_batches(start: int) -> Iterator[torch.Tensor]:
        # Resuming regenerates (and drops) the batches already trained on: no disk involved.
        stream = lane_batches(forwards(True), rank=rank, world=world, n_lanes=n_lanes,
                              capacity=cfg.shuffle_buffer // n_lanes,
                              batch_size=cfg.batch_size // n_lanes, seed=seed, scale=scale)
        return itertools.islice(stream, start, None)

    return d_in, scale, data_fp, make_batches


def main() -> None:
    from ..core.stage import run_stage

    run_stage("train_sae", _run)
