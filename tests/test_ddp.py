"""Two processes on gloo (CPU) train the same SAE as one process with the same global batch."""
import dataclasses

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from saelab.core.config import SAECfg
from saelab.sae.train import train

GLOBAL_BATCH, D_IN, STEPS = 64, 16, 25


def cfg(arch: str) -> SAECfg:
    # "target_l0": JumpReLU under the L0 controller, whose state and final threshold
    # calibration must come out the same from the global L0 and MSE on every rank.
    sparsity = dict(architecture="jumprelu", sparsity="target_l0", target_l0=4.0) \
        if arch == "target_l0" else dict(architecture=arch)
    return dataclasses.replace(SAECfg(), d_sae=48, batch_size=GLOBAL_BATCH,
                               k=4, lr_warmup_steps=5, l0_warmup_steps=10, log_every=5,
                               theta_param="raw", l0_coeff=0.02, **sparsity)


def global_batches(rank: int = 0, world: int = 1):
    """Deterministic global batches; each rank takes its contiguous slice."""
    atoms = torch.randn(40, D_IN, generator=torch.Generator().manual_seed(0))
    atoms /= atoms.norm(dim=1, keepdim=True)
    i = 0
    while True:
        g = torch.Generator().manual_seed(100 + i)
        coef = (torch.rand(GLOBAL_BATCH, 40, generator=g) < 0.1) * torch.rand(GLOBAL_BATCH, 40,
                                                                             generator=g)
        x = coef @ atoms
        per = GLOBAL_BATCH // world
        yield x[rank * per:(rank + 1) * per]
        i += 1


def _worker(rank: int, world: int, init_file: str, out: str, arch: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        res = train(cfg(arch), global_batches(rank, world), d_in=D_IN,
                    n_tokens=GLOBAL_BATCH * STEPS, lr=1e-2, device="cpu", seed=0)
        if rank == 0:
            torch.save({"state": res.sae.state_dict(), "history": res.history}, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("arch", ["jumprelu", "topk", "target_l0"])
def test_two_gloo_processes_match_one(tmp_path, arch):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "ddp.pt"), arch),
             nprocs=2, join=True)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=False)
    single = train(cfg(arch), global_batches(), d_in=D_IN, n_tokens=GLOBAL_BATCH * STEPS,
                   lr=1e-2, device="cpu", seed=0)
    for name, value in single.sae.state_dict().items():
        torch.testing.assert_close(ddp["state"][name], value, rtol=1e-4, atol=1e-5)
    for a, b in zip(ddp["history"], single.history):
        assert a["l0"] == pytest.approx(b["l0"], rel=1e-4)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-4)
