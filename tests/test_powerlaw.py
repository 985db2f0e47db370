import math

import numpy as np
import pytest

from saelab.core.errors import SaelabError
from saelab.scaling.powerlaw import (FitError, best_lr_parabola, fit_joint, fit_loss_vs_size,
                                     fit_lr_vs_size)

A, B, C = 3.0, 0.45, 0.08
SIZES = 2.0 ** np.arange(5, 13)  # 32 .. 4096
LRS = [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]


def law(n):
    return A * n ** -B + C


def noisy(seed, rel=0.005):
    rng = np.random.default_rng(seed)
    return law(SIZES) * (1 + rng.normal(0, rel, len(SIZES)))


def test_recovers_exponent_within_5_percent():
    for seed in range(5):
        fit = fit_loss_vs_size(SIZES, noisy(seed), bootstrap=0)
        assert fit.coef["b"] == pytest.approx(B, rel=0.05), seed
        assert fit.r2 > 0.99
        assert len(fit.residuals) == len(SIZES)
        assert fit.predict(16384) == pytest.approx(law(16384), rel=0.05)


def test_exact_data_exact_fit():
    fit = fit_loss_vs_size(SIZES[:3], law(SIZES[:3]), bootstrap=50)
    assert fit.coef == pytest.approx({"a": A, "b": B, "c": C}, rel=1e-4)
    # Three points, three parameters: no residuals, so no R^2 and no interval, and it says so.
    assert fit.r2 is None and fit.ci is None and "no confidence interval" in fit.note


def test_bootstrap_interval_covers_true_exponent():
    fit = fit_loss_vs_size(SIZES, noisy(1), bootstrap=300, seed=0)
    lo, hi = fit.ci["b"]
    assert lo < B < hi and hi - lo > 0
    lo, hi = fit.predict_ci(4096)
    assert lo < law(4096) < hi


def test_parametric_bootstrap_with_per_point_errors():
    y = noisy(2, rel=0.005)
    fit = fit_loss_vs_size(SIZES[:3], y[:3], sigma=0.005 * y[:3], bootstrap=200, seed=0)
    assert fit.ci is not None and "parametric" in fit.note
    assert fit.ci["b"][0] < fit.coef["b"] < fit.ci["b"][1]


def test_two_sizes_fall_back_to_c_zero_with_a_note():
    fit = fit_loss_vs_size([64, 128], [0.4, 0.3])
    assert fit.coef["c"] == 0.0
    assert "c is not identifiable" in fit.note


def test_two_step_reproduces_hand_computation():
    # Seed's step 1: two sizes, one lr, L = a N^-b through both points.
    # 0.4 -> 0.3 per doubling: b = log2(4/3), a = 0.4 * 64^b, and each doubling is x 0.75.
    fit = fit_loss_vs_size([64, 128], [0.4, 0.3], bootstrap=0)
    b = math.log(0.4 / 0.3) / math.log(2)
    assert fit.coef["b"] == pytest.approx(b, rel=1e-12)
    assert fit.coef["a"] == pytest.approx(0.4 * 64 ** b, rel=1e-12)
    assert fit.predict(256) == pytest.approx(0.225, rel=1e-12)
    assert fit.predict(16384) == pytest.approx(0.4 * 0.75 ** 8, rel=1e-12)
    # Step 2: lr* halves per doubling -> lr* = 0.256 / N.
    lr_fit = fit_lr_vs_size([64, 128], [4e-3, 2e-3], bootstrap=0)
    assert lr_fit.coef["b"] == pytest.approx(-1.0, rel=1e-12)
    assert lr_fit.coef["a"] == pytest.approx(0.256, rel=1e-12)
    assert lr_fit.predict(512) == pytest.approx(5e-4, rel=1e-12)


def test_lr_power_law_recovers_exponent():
    rng = np.random.default_rng(0)
    lr_star = 0.5 * SIZES ** -0.7 * np.exp(rng.normal(0, 0.02, len(SIZES)))
    fit = fit_lr_vs_size(SIZES, lr_star, bootstrap=200)
    assert fit.coef["b"] == pytest.approx(-0.7, rel=0.05)
    assert fit.ci["b"][0] < -0.7 < fit.ci["b"][1]
    assert "ln(lr)" in fit.note


def bowl(lr, lr_star=4e-3, k=0.05, floor=0.3):
    return floor + k * (np.log10(lr) - math.log10(lr_star)) ** 2


def test_parabola_recovers_known_lr_star():
    lr_star, info = best_lr_parabola(LRS, bowl(np.array(LRS)))
    assert lr_star == pytest.approx(4e-3, rel=1e-9)
    assert info["loss_at_lr_star"] == pytest.approx(0.3, rel=1e-9)
    assert info["best_grid_lr"] == 3e-3
    assert info["window_lrs"] == [1e-3, 3e-3, 1e-2]  # the best and one neighbour each side
    noise = np.array([0.001, -0.001, 0, 0.001, -0.001])
    noisy_lr, info = best_lr_parabola(LRS, bowl(np.array(LRS)) + noise, neighbours=2)
    assert noisy_lr == pytest.approx(4e-3, rel=0.1)
    assert info["resid_sd"] > 0 and info["log10_lr_star_se"] > 0 and info["loss_se"] is None
    # Errors from repeated seeds: pooled over the window, propagated to lr*.
    _, info = best_lr_parabola(LRS, bowl(np.array(LRS)), sigma=[1, 0.002, 0.002, 0.002, 1])
    assert info["loss_se"] == pytest.approx(0.002) and info["log10_lr_star_se"] > 0


def test_local_parabola_ignores_the_far_side_of_an_asymmetric_curve():
    # Undertrained low lrs fall on a line, the top lr blows up (a real tiny-profile curve).
    losses = [0.7009, 0.5832, 0.4037, 0.2453, 0.2569]
    lr_star, _ = best_lr_parabola(LRS, losses)
    assert 3e-3 < lr_star < 3e-2
    # Through all five points the low side drags the vertex past the top of the grid.
    with pytest.raises(FitError, match="outside the learning rates it was fitted on"):
        best_lr_parabola(LRS, losses, neighbours=2)


def test_parabola_drops_a_diverged_run_but_keeps_it_as_a_bracket():
    losses = bowl(np.array(LRS), lr_star=3e-3)
    losses[-1] = np.nan
    lr_star, info = best_lr_parabola(LRS, losses)
    assert lr_star == pytest.approx(3e-3, rel=1e-6)
    assert info["dropped_nonfinite_lrs"] == [3e-2]


@pytest.mark.parametrize("lr_star, word", [(1e-4, "smallest"), (1e-1, "largest")])
def test_best_lr_at_edge_of_grid_is_an_error(lr_star, word):
    with pytest.raises(FitError, match=f"is the {word} in the grid.*extend scaling.lr_grid"):
        best_lr_parabola(LRS, bowl(np.array(LRS), lr_star=lr_star))


def test_degenerate_inputs_give_clear_messages():
    assert issubclass(FitError, SaelabError)
    with pytest.raises(FitError, match="only one size"):
        fit_loss_vs_size([128, 128], [0.3, 0.31])
    with pytest.raises(FitError, match="only one size"):
        fit_lr_vs_size([128], [1e-3])
    with pytest.raises(FitError, match="does not decrease with size.*d_sae=128"):
        fit_loss_vs_size([64, 128, 256], [0.4, 0.3, 0.35])
    with pytest.raises(FitError, match="NaN/inf at d_sae=128"):
        fit_loss_vs_size([64, 128, 256], [0.4, float("nan"), 0.2])
    with pytest.raises(FitError, match="only 2 finite losses"):
        best_lr_parabola(LRS, [0.5, 0.4, np.nan, np.nan, np.nan])
    with pytest.raises(FitError, match="not bowl-shaped"):
        best_lr_parabola(LRS, [0.35, 0.28, 0.5, 0.5, 0.30], neighbours=2)  # noise, not a bowl
    with pytest.raises(FitError, match="outside the learning rates"):  # next lr diverged
        best_lr_parabola(LRS, [0.5, 0.4, 0.3, 0.25, np.nan])


def test_fit_serialises():
    d = fit_loss_vs_size(SIZES, noisy(0), bootstrap=20).to_dict()
    assert d["law"] == "L = a * N^-b + c" and d["bootstrap_reps"] > 0
    assert set(d["coef"]) == {"a", "b", "c"} and len(d["residuals"]) == len(SIZES)


def test_joint_law_recovers_width_and_token_exponents():
    n = np.repeat([64.0, 128, 256, 512], 3)
    d = np.tile([8192.0, 32768, 131072], 4)
    loss = 0.1 + 3.0 * n ** -0.6 + 4.0 * d ** -0.35
    fit = fit_joint(n, d, loss)
    assert fit.coef["alpha"] == pytest.approx(0.6, rel=1e-3)
    assert fit.coef["beta"] == pytest.approx(0.35, rel=1e-3)
    assert fit.coef["E"] == pytest.approx(0.1, rel=1e-3)
    assert fit.predict(4096, 1e6) == pytest.approx(0.1 + 3.0 * 4096 ** -0.6 + 4.0 * 1e6 ** -0.35,
                                                  rel=1e-4)
    # A warm start from that fit lands on the same law.
    again = fit_joint(n, d, loss, start=fit)
    assert again.predict(4096, 1e6) == pytest.approx(fit.predict(4096, 1e6), rel=1e-6)


def test_joint_law_with_flat_width_and_too_few_points():
    n = np.repeat([64.0, 128, 256], 2)
    d = np.tile([8192.0, 65536], 3)
    fit = fit_joint(n, d, 0.2 + 2.0 * d ** -0.3)  # width does not matter
    assert fit.coef["A"] == pytest.approx(0.0, abs=1e-6) and "A = 0" in fit.note
    assert fit.predict(4096, 8192) == pytest.approx(0.2 + 2.0 * 8192 ** -0.3, rel=1e-3)
    with pytest.raises(FitError, match="5 parameters"):
        fit_joint(n[:5], d[:5], np.ones(5))
    with pytest.raises(FitError, match=">= 2 token counts"):
        fit_joint(n, np.full(6, 8192.0), np.ones(6))
