"""Device, threads, seeds and logging: what every stage sets up the same way."""
from __future__ import annotations

import logging
import os
import random

import numpy as np
import torch

from .config import Params


def rank_world() -> tuple[int, int]:
    """(rank, world size) of this process: (0, 1) outside a torch.distributed group."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: torch.device) -> tuple[int, int]:
    """Join the torchrun process group (nccl on GPUs, gloo on CPUs); (rank, world).

    Under torchrun even a single process joins (and trains through DDP), so a 1-process run
    exercises the backend that a many-GPU run relies on. Outside torchrun: (0, 1).
    """
    import torch.distributed as dist

    if "MASTER_ADDR" in os.environ and "RANK" in os.environ and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        logging.getLogger(__name__).info("joined the %s process group: rank %d of %d",
                                         dist.get_backend(), dist.get_rank(),
                                         dist.get_world_size())
    return rank_world()


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    # Quiet chatty libraries; their warnings still show.
    for name in ("urllib3", "httpx", "httpx2", "alembic", "mlflow.store", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def resolve_device(params: Params) -> torch.device:
    want = params.run.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and not torch.cuda.is_available():
        from .errors import SaelabError
        raise SaelabError("run.device = cuda but no CUDA GPU is visible; "
                          "set run.device to auto or cpu")
    if want == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(want)


def compute_dtype(params: Params, device: torch.device) -> torch.dtype:
    """bf16 on GPU, fp32 on CPU unless params pin one; never fp16 (Llama MLP outputs overflow it)."""
    name = params.model.dtype
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def setup_threads(params: Params) -> None:
    n = params.run.num_threads or os.cpu_count() or 1
    torch.set_num_threads(n)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
