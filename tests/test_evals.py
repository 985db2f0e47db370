"""Evaluation metrics on a perfect SAE, a useless one, and a tiny random Llama."""
import dataclasses
import math

import pytest
import torch

from saelab.core.config import SAECfg
from saelab.core.errors import SaelabError
from saelab.sae.evals import lm_metrics, reconstruction_metrics
from saelab.sae.autoencoder import SAE

D = 32
BOS, EOS = 128000, 128001


def perfect_sae() -> SAE:
    """f = [relu(x), relu(-x)], x_hat = relu(x) - relu(-x) = x exactly."""
    cfg = dataclasses.replace(SAECfg(), d_sae=2 * D, theta_param="raw")
    sae = SAE(D, 2 * D, cfg)
    eye = torch.eye(D)
    with torch.no_grad():
        sae.W_enc.copy_(torch.cat([eye, -eye], 1))
        sae.W_dec.copy_(torch.cat([eye, -eye], 0))
        sae.raw_threshold.zero_()
    return sae.eval()


def test_reconstruction_metrics():
    x = [torch.randn(100, D, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    m = reconstruction_metrics(perfect_sae(), iter(x), n_batches=3)
    assert m["mse"] == pytest.approx(0, abs=1e-12) and m["fvu"] == pytest.approx(0, abs=1e-12)
    assert m["l0"] == D and m["eval_tokens"] == 300
    assert m["frac_active_gt_10pct"] == 1.0

    half = perfect_sae()
    with torch.no_grad():
        half.W_dec.mul_(0.5)  # x_hat = x / 2
    m = reconstruction_metrics(half, iter(x), n_batches=3)
    allx = torch.cat(x).double()
    expected = (0.25 * allx.pow(2).sum() / (allx - allx.mean(0)).pow(2).sum()).item()
    assert m["fvu"] == pytest.approx(expected, rel=1e-6)
    assert m["mse"] == pytest.approx(0.25 * allx.pow(2).mean().item(), rel=1e-6)
    with pytest.raises(SaelabError):
        reconstruction_metrics(half, iter([]), n_batches=1)


@pytest.fixture(scope="module")
def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=D, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=2, num_key_value_heads=1, vocab_size=128256,
                         max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def rows():
    ids = torch.randint(0, 5000, (2, 24), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = BOS
    ids[0, 10] = EOS
    return [ids]


def test_lm_metrics_perfect_and_useless_sae(tiny_llama):
    good = lm_metrics(tiny_llama, perfect_sae(), rows(), layer=1, hook="mlp_out", scale=2.5,
                      device="cpu", special_ids=(BOS, EOS))
    # 2 rows x 23 predictions, minus those from or of a special token (BOS x2, EOS in & out)
    assert good["lm_eval_tokens"] == 2 * 23 - 2 - 2
    assert good["delta_lm_loss"] == pytest.approx(0, abs=1e-5)
    assert good["kl_div"] == pytest.approx(0, abs=1e-5)
    assert good["ce_zero_ablation"] != pytest.approx(good["ce_clean"], abs=1e-4)
    assert good["ce_loss_recovered"] == pytest.approx(1.0, abs=1e-3)
    # The masked ids are the caller's (its tokenizer's), not Llama-3's: with only BOS
    # special, the two predictions from and of the EOS count.
    bos_only = lm_metrics(tiny_llama, perfect_sae(), rows(), layer=1, hook="mlp_out",
                          scale=2.5, device="cpu", special_ids=(BOS,))
    assert bos_only["lm_eval_tokens"] == 2 * 23 - 2

    useless = perfect_sae()
    with torch.no_grad():
        useless.W_dec.zero_()  # x_hat = b_dec = 0: the zero ablation
    bad = lm_metrics(tiny_llama, useless, rows(), layer=1, hook="mlp_out", scale=1.0,
                     device="cpu", special_ids=(BOS, EOS))
    assert bad["ce_sae"] == pytest.approx(bad["ce_zero_ablation"], abs=1e-6)
    assert bad["ce_loss_recovered"] == pytest.approx(0.0, abs=1e-6)
    assert bad["kl_div"] > 0


def test_unknown_hook_or_layer_is_a_clear_error(tiny_llama):
    with pytest.raises(SaelabError, match="layer 8"):
        lm_metrics(tiny_llama, perfect_sae(), rows(), layer=8, hook="mlp_out", scale=1.0,
                   device="cpu", special_ids=(BOS, EOS))
    with pytest.raises(SaelabError, match="unknown hook"):
        lm_metrics(tiny_llama, perfect_sae(), rows(), layer=1, hook="attn_out", scale=1.0,
                   device="cpu", special_ids=(BOS, EOS))


def test_lm_metrics_bootstrap_interval_and_random_model_flag(tiny_llama):
    useless = perfect_sae()
    with torch.no_grad():
        useless.W_dec.mul_(0.5)  # a half-strength reconstruction: between perfect and zero
    m = lm_metrics(tiny_llama, useless, rows(), layer=1, hook="mlp_out", scale=1.0,
                   device="cpu", special_ids=(BOS, EOS))
    assert m["lm_eval_rows"] == 2
    lo, hi = m["delta_lm_loss_ci95"]
    assert lo <= m["delta_lm_loss"] <= hi and lo < hi  # two rows that differ: a real interval
    lo, hi = m["ce_loss_recovered_ci95"]
    assert lo <= m["ce_loss_recovered"] <= hi
    # The fixture has random weights: its clean CE is near ln(vocab), and the figures are
    # flagged as saying nothing about a language model.
    assert m["ce_clean"] > 0.9 * math.log(tiny_llama.config.vocab_size)
    assert m["lm_metrics_meaningful"] is False and "random-weight" in m["lm_metrics_note"]


def test_a_model_that_predicts_is_not_flagged(tiny_llama, monkeypatch):
    import saelab.sae.evals as evals
    # Same computation, but a threshold no model's CE can pass: nothing gets flagged.
    monkeypatch.setattr(evals, "RANDOM_MODEL_CE_FRACTION", 10.0)
    m = lm_metrics(tiny_llama, perfect_sae(), rows(), layer=1, hook="mlp_out", scale=1.0,
                   device="cpu", special_ids=(BOS, EOS))
    assert m["lm_metrics_meaningful"] is True and "lm_metrics_note" not in m
