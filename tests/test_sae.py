"""The SAE's pieces against their formulas (DESIGN §6) and the export fold."""
import dataclasses
import json

import pytest
import torch

from saelab.core.config import SAECfg
from saelab.sae.autoencoder import (SAE, auxk_decode, export_sae, jumprelu, jumprelu_with_l0,
                                    load_sae, sparse_decode, step, topk_decode)
from saelab.sae.train import _Objective

EPS = 1e-3


def cfg(**kw) -> SAECfg:
    return dataclasses.replace(SAECfg(), **kw)


def rect(u):
    return ((u > -0.5) & (u < 0.5)).double()


def pre_acts_near(theta: torch.Tensor, n: int, gen: torch.Generator) -> torch.Tensor:
    """Pre-activations of which a good share falls inside the kernel's window around theta."""
    return theta + (torch.rand(n, theta.numel(), generator=gen, dtype=torch.float64) - 0.5) * 4 * EPS


@pytest.mark.parametrize("theta_param", ["log", "raw"])
def test_straight_through_gradients_match_formulas(theta_param):
    gen = torch.Generator().manual_seed(0)
    sae = SAE(4, 6, cfg(d_sae=6, theta_param=theta_param, threshold_init=0.05)).double()
    theta = sae.threshold.detach()
    z = pre_acts_near(theta, 50, gen).requires_grad_(True)
    g = torch.randn(50, 6, generator=gen, dtype=torch.float64)
    kernel = rect((z.detach() - theta) / EPS)
    assert 0 < kernel.mean() < 1  # the window catches some but not all

    f = jumprelu(z, sae.threshold, EPS)
    assert torch.equal(f.detach(), z.detach() * (z.detach() > theta))
    (f * g).sum().backward()
    d_theta = (-(theta / EPS) * kernel * g).sum(0)
    param = sae.log_threshold if theta_param == "log" else sae.raw_threshold
    chain = theta if theta_param == "log" else 1.0  # d theta / d log theta = theta
    torch.testing.assert_close(param.grad, d_theta * chain)
    torch.testing.assert_close(z.grad, g * (z.detach() > theta))

    param.grad = None
    z.grad = None
    h = step(z, sae.threshold, EPS)
    assert torch.equal(h.detach(), (z.detach() > theta).double())
    (h * g).sum().backward()
    torch.testing.assert_close(param.grad, (-(1 / EPS) * kernel * g).sum(0) * chain)
    assert z.grad is None  # H's estimator gives z nothing


@pytest.mark.parametrize("theta_param", ["log", "raw"])
def test_fused_training_op_equals_the_two_estimators(theta_param):
    gen = torch.Generator().manual_seed(1)
    sae = SAE(4, 6, cfg(d_sae=6, theta_param=theta_param, threshold_init=0.05)).double()
    z = pre_acts_near(sae.threshold.detach(), 40, gen)
    g_f = torch.randn(40, 6, generator=gen, dtype=torch.float64)
    g_l0 = torch.randn(40, generator=gen, dtype=torch.float64)

    def grads(fn):
        zz = z.clone().requires_grad_(True)
        sae.zero_grad(set_to_none=True)
        f, l0 = fn(zz)
        ((f * g_f).sum() + (l0 * g_l0).sum()).backward()
        param = sae.log_threshold if theta_param == "log" else sae.raw_threshold
        return f.detach(), l0.detach(), zz.grad, param.grad

    fused = grads(lambda zz: jumprelu_with_l0(zz, sae.threshold, EPS)[:2])
    apart = grads(lambda zz: (jumprelu(zz, sae.threshold, EPS),
                              step(zz, sae.threshold, EPS).sum(-1)))
    for a, b in zip(fused, apart):
        torch.testing.assert_close(a, b)
    counts = jumprelu_with_l0(z, sae.threshold, EPS)[2]
    assert torch.equal(counts, (z > sae.threshold).sum(0).double())


@pytest.mark.parametrize("theta_param", ["log", "raw"])
def test_l0_term_trains_only_theta(theta_param):
    torch.manual_seed(0)
    sae = SAE(8, 16, cfg(d_sae=16, theta_param=theta_param, threshold_init=0.05))
    x = torch.randn(64, 8) * 0.3
    obj = _Objective(sae)

    def grads(lam):
        sae.zero_grad(set_to_none=True)
        obj(x, lam, None, 0)[0].backward()
        return {n: p.grad.clone() for n, p in sae.named_parameters()}

    without, with_l0 = grads(0.0), grads(10.0)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        torch.testing.assert_close(with_l0[name], without[name], rtol=0, atol=0)
    theta_name = "log_threshold" if theta_param == "log" else "raw_threshold"
    assert not torch.equal(with_l0[theta_name], without[theta_name])


def test_init_follows_gemma_scope():
    sae = SAE(16, 64, cfg(d_sae=64, threshold_init=1e-3, encoder_init_scale=1.0,
                          theta_param="log"))
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(sae.W_enc, sae.W_dec.t())
    scaled = SAE(16, 64, cfg(d_sae=64))  # JumpReLU default: W_enc = 0.1 W_dec^T
    torch.testing.assert_close(scaled.W_enc, 0.1 * scaled.W_dec.t())
    # decoder_norm "auto": unit atoms for JumpReLU (above), free ones for TopK/BatchTopK.
    assert sae.unit_decoder and not sae.rescale
    topk = SAE(16, 64, cfg(d_sae=64, architecture="topk", k=4))
    assert not topk.unit_decoder and topk.rescale
    torch.testing.assert_close(topk.W_dec.norm(dim=1), torch.full((64,), 0.1))
    assert torch.equal(topk.W_enc, topk.W_dec.t())
    unit_topk = SAE(16, 64, cfg(d_sae=64, architecture="topk", k=4, decoder_norm="unit"))
    torch.testing.assert_close(unit_topk.W_dec.norm(dim=1), torch.ones(64))
    assert torch.equal(unit_topk.W_enc, unit_topk.W_dec.t())
    assert not sae.b_enc.any() and not sae.b_dec.any()
    torch.testing.assert_close(sae.threshold, torch.full((64,), 1e-3))
    assert sae.log_threshold.dtype == torch.float32
    raw = SAE(16, 64, cfg(d_sae=64, theta_param="raw"))
    torch.testing.assert_close(raw.threshold, torch.full((64,), 1e-3))


def test_decoder_gradient_projection_and_renormalisation():
    torch.manual_seed(0)
    sae = SAE(8, 32, cfg(d_sae=32))
    sae.W_dec.grad = torch.randn(32, 8)
    before = sae.W_dec.grad.clone()
    sae.remove_parallel_grad()
    g, W = sae.W_dec.grad, sae.W_dec.detach()
    torch.testing.assert_close((g * W).sum(1), torch.zeros(32), atol=1e-6, rtol=0)
    # only the parallel component was removed
    torch.testing.assert_close(before - g, (before * W).sum(1, keepdim=True) * W)
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(32, 1) * 3 + 0.1)
    sae.normalise_decoder()
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(32))


def test_topk_and_batchtopk_l0_exact():
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    topk = SAE(8, 32, cfg(architecture="topk", d_sae=32, k=5))
    with torch.no_grad():
        topk.b_enc.fill_(10.0)  # every pre-activation positive: relu keeps all k
    assert ((topk.encode(x) != 0).sum(-1) == 5).all()
    btk = SAE(8, 32, cfg(architecture="batchtopk", d_sae=32, k=5)).train()
    with torch.no_grad():
        btk.b_enc.fill_(10.0)
    f = btk.encode(x)
    assert int((f != 0).sum()) == 5 * 40
    assert (f != 0).sum(-1).float().std() > 0  # per-token L0 varies; the batch mean is k


@pytest.mark.parametrize("decoder_norm", ["unit", "free"])
def test_sparse_decode_matches_dense_decode_and_its_gradients(decoder_norm):
    """The training decoders (TopK and AuxK) read k atoms per row through custom sparse
    kernels: values and gradients must equal a dense [batch, d_sae] code times the atoms."""
    gen = torch.Generator().manual_seed(0)
    sae = SAE(12, 40, cfg(architecture="topk", d_sae=40, k=5, decoder_norm=decoder_norm))
    sae = sae.double()
    with torch.no_grad():
        sae.W_dec.mul_(torch.rand(40, 1, generator=gen, dtype=torch.float64) + 0.5)
    z = torch.randn(30, 40, generator=gen, dtype=torch.float64, requires_grad=True)
    g = torch.randn(30, 12, generator=gen, dtype=torch.float64)
    dead = torch.rand(40, generator=gen) < 0.5

    def grads(out):
        sae.zero_grad()
        z.grad = None
        (out * g).sum().backward()
        return out.detach(), z.grad.clone(), sae.W_dec.grad.clone()

    sparse = grads(topk_decode(sae, z)[0])
    dense = grads(sae.decode(sae.activate(z)))
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)

    sparse = grads(auxk_decode(sae, z, dead, 3))
    vals, idx = z.masked_fill(~dead, float("-inf")).topk(3, dim=-1)
    code = torch.zeros_like(z).scatter(-1, idx, vals.relu())
    dense = grads(code @ sae.atoms())
    for a, b in zip(sparse, dense):
        torch.testing.assert_close(a, b)

    # The plain embedding_bag path (the one CUDA takes) gives the same gradients.
    idx = torch.randint(0, 40, (30, 5), generator=gen).unique(dim=-1)[:, :1]
    vals = torch.rand(30, 1, generator=gen, dtype=torch.float64, requires_grad=True)
    out = sparse_decode(idx, vals, sae.W_dec)
    ref = torch.nn.functional.embedding_bag(idx, sae.W_dec, per_sample_weights=vals, mode="sum")
    torch.testing.assert_close(out, ref)
    ga = torch.autograd.grad((out * g).sum(), (vals, sae.W_dec))
    gb = torch.autograd.grad((ref * g).sum(), (vals, sae.W_dec))
    for a, b in zip(ga, gb):
        torch.testing.assert_close(a, b)


def _perturbed(arch: str, **kw) -> SAE:
    torch.manual_seed(1)
    sae = SAE(8, 24, cfg(architecture=arch, d_sae=24, k=4, **kw))
    with torch.no_grad():
        if not sae.unit_decoder:  # free atoms of unequal norms, as training leaves them
            sae.W_dec.mul_(torch.rand(24, 1) * 2 + 0.2)
        sae.b_enc.normal_(0, 0.3)
        sae.b_dec.normal_(0, 0.5)
        if arch == "jumprelu":
            param = sae.log_threshold if sae.cfg.theta_param == "log" else sae.raw_threshold
            param.copy_(torch.rand(24) * 0.5 + 0.05)
            if sae.cfg.theta_param == "log":
                param.log_()
        if arch == "batchtopk":
            sae.batch_threshold.fill_(0.3)
    return sae.eval()


@pytest.mark.parametrize("arch,theta_param,decoder_norm", [
    ("jumprelu", "log", "unit"), ("jumprelu", "raw", "unit"), ("jumprelu", "raw", "free"),
    ("topk", "log", "unit"), ("topk", "log", "free"), ("batchtopk", "log", "unit"),
    ("batchtopk", "log", "free")])
def test_export_folds_the_scale(tmp_path, arch, theta_param, decoder_norm):
    """Exported (raw x, unit form) = trained on C x, divided by C; free TopK/BatchTopK
    atoms are also folded to unit norm, their norms moved into the encoder."""
    sae = _perturbed(arch, theta_param=theta_param, decoder_norm=decoder_norm)
    C = 3.7
    export_sae(sae, tmp_path, scale=C, meta={"model_name": "tiny"})
    loaded = load_sae(tmp_path)
    x = torch.randn(200, 8) * 2
    x_hat, f = sae(C * x)
    x_hat2, f2 = loaded(x)
    assert torch.equal(f2 != 0, f != 0)
    torch.testing.assert_close(f2, f / C, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_hat2, x_hat / C, rtol=1e-5, atol=1e-6)
    if arch != "jumprelu":
        torch.testing.assert_close(loaded.W_dec.norm(dim=1), torch.ones(24))
    spec = json.loads((tmp_path / "cfg.json").read_text())
    assert spec["architecture"] == ("topk" if arch == "topk" else "jumprelu")
    assert spec["normalize_activations"] == "none"
    assert spec["metadata"]["hook_name"] == "blocks.8.hook_mlp_out"
    assert (spec["d_in"], spec["d_sae"]) == (8, 24)


@pytest.mark.parametrize("arch", ["jumprelu", "topk"])
def test_saelens_loads_the_export(tmp_path, arch):
    # Installed by `make test` (requirements-dev.lock): a missing SAELens fails, never skips.
    import sae_lens
    sae = _perturbed(arch)
    export_sae(sae, tmp_path, scale=2.0, meta={"model_name": "tiny"})
    theirs = sae_lens.SAE.load_from_disk(str(tmp_path), device="cpu")
    ours = load_sae(tmp_path)
    x = torch.randn(100, 8)
    with torch.no_grad():
        f_ours = ours.encode(x)
        torch.testing.assert_close(theirs.encode(x), f_ours, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.decode(f_ours), ours.decode(f_ours),
                                   rtol=1e-5, atol=1e-6)
