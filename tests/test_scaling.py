import json
import math

import numpy as np
import pytest
import yaml

from saelab.core import paths
from saelab.core.config import SAECfg, ScalingCfg, parse_params
from saelab.scaling.laws import (DEAD_LR_STEP, DEAD_MAX_STEPS, caveats, fit_pilots, flag_batch,
                                 heldout_split, main, mean_losses, pilot_cfg, pilot_loss,
                                 run_grid, sizes_of, write_outputs)
from saelab.activations.store import ActivationStore, StoreWriter

# Ground truth of the synthetic pilots: L(N, lr) = a N^-b + c + k (log10 lr - log10 lr*(N))^2
# with lr*(N) = 0.256 / N, so lr* halves per doubling and sits on this grid for 64..256.
A, B, C, K = 2.0, 0.5, 0.05, 0.04
LRS = [2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3, 8e-3, 1.6e-2]
SIZES = [64, 128, 256]


def cfg1d(**kw):
    """The loss law over width alone (no token axis): what these synthetic pilots support."""
    return ScalingCfg(tokens_grid=(), **kw)


def lr_star(n):
    return 0.256 / n


def synth_rows(sizes=SIZES, lrs=LRS, star=lr_star, seeds=(0,)):
    return [{"d_sae": n, "lr": lr, "seed": seed, "status": "ok",
             "loss": A * n ** -B + C + K * (math.log10(lr) - math.log10(star(n))) ** 2}
            for n in sizes for lr in lrs for seed in seeds]


def test_pilot_cfg_overrides_warmups_and_batch():
    params = parse_params({"scaling": {"batch_size": 512, "lr_warmup_steps": 3,
                                       "l0_warmup_steps": 7}})
    cfg = pilot_cfg(params, 96)
    assert (cfg.d_sae, cfg.batch_size, cfg.lr_warmup_steps, cfg.l0_warmup_steps) == (96, 512, 3, 7)
    assert cfg.l0_coeff == params.sae.l0_coeff and cfg.architecture == params.sae.architecture


def test_pilots_default_to_train_sae_batch_and_schedule_shape():
    # Unset, the pilots take train_sae's batch and its warm-ups at the same fraction of
    # their steps: the law's token axis is then train_sae's (issue 17).
    params = parse_params({"sae": {"batch_size": 1024, "n_tokens": 1024 * 400,
                                   "lr_warmup_steps": 40, "l0_warmup_steps": 200},
                           "scaling": {"n_tokens": 1024 * 100}})
    cfg = pilot_cfg(params, 96)
    assert (cfg.batch_size, cfg.lr_warmup_steps, cfg.l0_warmup_steps) == (1024, 10, 50)
    assert cfg.n_tokens is None  # train_sae's own count is not the pilot's


def test_pilot_loss_is_the_heldout_objective():
    m = {"mse": 0.01, "l0": 20.0}
    assert pilot_loss(m, SAECfg(l0_coeff=1e-3), d_in=16) == pytest.approx(0.16 + 0.02)
    assert pilot_loss(m, SAECfg(sparsity="target_l0", target_l0=10.0, l0_coeff=1e-3),
                      d_in=16) == pytest.approx(0.16 + 1e-3 * 0.2 * 100)
    assert pilot_loss(m, SAECfg(architecture="topk", k=4), d_in=16) == pytest.approx(0.16)


def test_heldout_split_refuses_a_store_too_small():
    assert heldout_split(10_000, 1_000, 256) == 9_000
    with pytest.raises(Exception, match="raise extract.n_tokens"):
        heldout_split(1_000, 900, 256)


def test_mean_over_seeds_and_a_diverged_seed():
    rows = [{"d_sae": 8, "lr": 1e-3, "loss": v} for v in (1.0, 2.0, 3.0)]
    rows += [{"d_sae": 8, "lr": 1e-2, "loss": v} for v in (1.0, math.nan)]
    rows += [{"d_sae": 16, "lr": 1e-3, "loss": 0.5}]
    m = mean_losses(rows)
    assert m[(8, 1e-3)] == pytest.approx((2.0, 1.0 / math.sqrt(3)))
    assert all(math.isnan(v) for v in m[(8, 1e-2)])  # an lr that sometimes diverges is out
    assert m[(16, 1e-3)][0] == 0.5 and math.isnan(m[(16, 1e-3)][1])


def test_caveats_name_what_the_lr_ignores():
    params = parse_params({"scaling": {"batch_size": 1024}, "sae": {"batch_size": 4096}})
    text = " ".join(caveats(params))
    assert "32768 tokens" in text and "batch 1024" in text and "4096" in text
    # By default the pilots run at train_sae's batch: no batch caveat, and the law's
    # prediction for train_sae is at its own batch.
    matched = parse_params({"sae": {"batch_size": 2048}})
    assert not any("batch" in c for c in caveats(matched))
    result = {"extrapolation": {"train_sae": {"loss": 0.2}}}
    flag_batch(result, matched)
    assert result["extrapolation"]["train_sae"]["batch_matched"] is True
    assert "loss_note" not in result["extrapolation"]["train_sae"]


def test_grid_fit_recovers_known_laws():
    res = fit_pilots(synth_rows(), cfg1d(bootstrap=50), d_sae=512, n_tokens=2_100_000_000,
                     real_d_sae=16384)
    assert res["status"] == "ok"
    assert res["loss_fit"]["coef"] == pytest.approx({"a": A, "b": B, "c": C}, rel=1e-3)
    assert res["lr_fit"]["coef"]["b"] == pytest.approx(-1.0, rel=1e-6)
    rec = res["recommended"]
    assert rec["lr"] == pytest.approx(lr_star(512), rel=1e-6)
    assert (rec["d_sae"], rec["n_tokens"], rec["lr_source"]) == (512, 2_100_000_000, "fit")
    assert res["extrapolation"]["budget"]["lr"] == pytest.approx(lr_star(16384), rel=1e-5)
    assert res["extrapolation"]["budget"]["loss"] == pytest.approx(A * 16384 ** -B + C, rel=1e-3)
    # Held-out largest size: fitted on 64 and 128 only (c = 0 there), predicted at 256.
    h = res["holdout"]
    assert h["status"] == "ok" and h["fit_sizes"] == [64, 128] and h["d_sae"] == 256
    assert h["trained_loss"] == pytest.approx(A * 256 ** -B + C)
    assert h["predicted_lr_star"] == pytest.approx(lr_star(256), rel=1e-6)
    assert h["gap"] == pytest.approx(h["predicted_loss"] - h["trained_loss"])


def test_grid_fit_with_noise_recovers_exponent_within_5_percent():
    rng = np.random.default_rng(0)
    sizes = [32, 64, 128, 256, 512, 1024, 2048, 4096]
    lrs = [0.256 / 2 ** k for k in range(2, 16)]
    rows = synth_rows(sizes, lrs)
    for r in rows:
        r["loss"] *= 1 + rng.normal(0, 0.003)
    res = fit_pilots(rows, cfg1d(bootstrap=100), d_sae=8192, n_tokens=1)
    assert res["status"] == "ok"
    assert res["loss_fit"]["coef"]["b"] == pytest.approx(B, rel=0.05)
    assert res["loss_fit"]["ci"] is not None  # residual bootstrap: 8 sizes, 3 parameters
    assert res["recommended"]["lr"] == pytest.approx(lr_star(8192), rel=0.25)


def noisy_rows(sizes, seeds=(0, 1, 2), noise=0.005):
    rng = np.random.default_rng(0)
    rows = synth_rows(sizes=sizes, seeds=seeds)
    for r in rows:
        r["loss"] *= 1 + rng.normal(0, noise)
    return rows


def test_held_out_size_inside_its_interval_is_ok():
    res = fit_pilots(noisy_rows([32, 64, 128, 256]), cfg1d(seeds=3, bootstrap=200),
                     d_sae=512, n_tokens=10)
    assert res["status"] == "ok", res["problems"]
    h = res["holdout"]  # 32-128 fitted (c identified), 256 predicted within its interval
    assert h["fit_sizes"] == [32, 64, 128] and h["trained_within_ci"]
    assert abs(h["rel_error_pct"]) < 3 and h["rel_error_pct"] == pytest.approx(100 * h["rel_gap"])
    lo, hi = h["predicted_loss_ci"]
    assert lo <= h["predicted_loss_ci_bootstrap"][0] and h["predicted_loss_ci_loso"][1] <= hi
    assert len(h["predicted_loss_ci_loso"]) == 2 and h["predicted_lr_star_ci"]


def test_held_out_size_outside_its_interval_is_not_ok():
    # Two fitted sizes leave c unidentified (0): the law under-predicts 256's loss, and the
    # seed noise is far too small for its interval to cover the miss.
    res = fit_pilots(noisy_rows(SIZES), cfg1d(seeds=3, bootstrap=200), d_sae=512, n_tokens=10)
    h = res["holdout"]
    assert h["trained_within_ci"] is False and h["rel_error_pct"] < -1
    assert res["status"] == "holdout_outside_interval" and "d_sae=256" in res["reason"]
    assert res["recommended"]["lr_source"] == "fit"  # the lr law itself passed its check


def test_seed_spread_gives_parametric_intervals():
    rows = noisy_rows(SIZES)
    res = fit_pilots(rows, cfg1d(seeds=3, bootstrap=200), d_sae=512, n_tokens=10)
    assert res["status"] in ("ok", "holdout_outside_interval")
    assert all(e["parabola"]["loss_se"] > 0 for e in res["per_size"])
    for key in ("loss_fit", "lr_fit"):
        assert "parametric" in res[key]["note"] and res[key]["ci"]["b"][0] < res[key]["ci"]["b"][1]
    lo, hi = res["extrapolation"]["train_sae"]["lr_ci"]
    assert lo < res["recommended"]["lr"] < hi
    assert lo < lr_star(512) < hi


# L(N, D) ground truth of the joint-law tests: the sweep's best loss is A N^-B + C at
# SWEEP tokens; E + A N^-B + BD (D/SWEEP)^-BETA in general (E = C - BD at the sweep count).
BD, BETA, SWEEP = 0.03, 0.4, 4096


def joint_loss(n, d):
    return A * n ** -B + C - BD + BD * (d / SWEEP) ** -BETA


def joint_rows(sizes=(64, 128, 256, 512), counts=(1024, 16384)):
    """The lr sweep at SWEEP tokens, then each count at each size's best (= exact) lr."""
    rows = [{**r, "n_tokens": SWEEP} for r in synth_rows(sizes, lrs=[6.25e-5, 1.25e-4, *LRS])]
    for r in rows:
        r["loss"] += joint_loss(r["d_sae"], SWEEP) - (A * r["d_sae"] ** -B + C)
    rows += [{"d_sae": n, "lr": lr_star(n), "seed": 0, "status": "ok", "n_tokens": d,
              "loss": joint_loss(n, d)} for n in sizes for d in counts]
    return rows


def test_joint_law_predicts_width_and_tokens_and_the_held_out_size():
    cfg = ScalingCfg(n_tokens=SWEEP, tokens_grid=(1024, 16384), bootstrap=0)
    res = fit_pilots(joint_rows(), cfg, d_sae=2048, n_tokens=10, train_tokens=65536)
    assert res["status"] == "ok", res["problems"]
    assert res["loss_fit"]["law"].startswith("L = E + A")
    assert res["tokens_grid"] == [1024, 4096, 16384]
    assert res["loss_fit"]["coef"]["alpha"] == pytest.approx(B, rel=1e-3)
    assert res["loss_fit"]["coef"]["beta"] == pytest.approx(BETA, rel=1e-3)
    t = res["extrapolation"]["train_sae"]  # 4x the widest pilot, 4x its tokens
    assert (t["d_sae"], t["n_tokens"], t["beyond_largest_pilot_tokens"]) == (2048, 65536, 4.0)
    assert t["loss"] == pytest.approx(joint_loss(2048, 65536), rel=1e-4)
    assert t["tokens_for_1pct_of_floor"] > 16384
    h = res["holdout"]  # 64-256 at all three counts fitted, 512 predicted at the sweep's
    assert h["fit_sizes"] == [64, 128, 256] and h["n_tokens"] == SWEEP
    assert abs(h["rel_error_pct"]) < 0.1 and h["lr_star_ratio"] == pytest.approx(1, rel=1e-6)
    assert h["predicted_loss_ci_loso"] is not None  # 3 sizes: each left out in turn


def test_rising_lr_law_falls_back_to_the_nearest_width():
    # lr* rising with width (b = +1) passes every fit but not the lr check.
    res = fit_pilots(synth_rows(star=lambda n: 1e-5 * n), cfg1d(), d_sae=512, n_tokens=10)
    assert res["status"] == "lr_fallback" and "lr_max_exponent" in res["reason"]
    chk = res["lr_check"]
    assert not chk["ok"] and chk["exponent"] == pytest.approx(1.0, rel=1e-6)
    rec = res["recommended"]
    assert rec["lr_source"] == "fallback_nearest_width"
    assert rec["lr"] == pytest.approx(1e-5 * 256, rel=1e-6)  # measured lr* at 256, not 512's
    assert rec["source"].startswith("FALLBACK, not the law") and "d_sae=256" in rec["source"]
    # Far beyond the swept lrs: the law's lr* at 2**20 is 2.4e-7, below 2.5e-4.
    far = fit_pilots(synth_rows(), cfg1d(), d_sae=2 ** 20, n_tokens=10)
    assert far["status"] == "lr_fallback" and "outside the swept lrs" in far["reason"]


def test_edge_of_grid_is_degenerate_and_the_fallback_says_so():
    # The largest size wants an lr above the grid.
    rows = synth_rows(star=lambda n: 0.256 / n if n < 256 else 0.05)
    res = fit_pilots(rows, cfg1d(), d_sae=512, n_tokens=10)
    assert res["status"] == "degenerate"
    assert "d_sae=256" in res["reason"] and "largest in the grid" in res["reason"]
    rec = res["recommended"]
    assert rec["lr"] == 1.6e-2 and rec["lr_source"] == "fallback_best_pilot"
    assert rec["source"].startswith("FALLBACK, not the law") and "d_sae=256" in rec["source"]
    assert "loss_fit" not in res and "extrapolation" not in res


def test_one_size_and_rising_losses_are_degenerate():
    res = fit_pilots(synth_rows(sizes=[64]), cfg1d(), d_sae=512, n_tokens=10)
    assert res["status"] == "degenerate" and "only one size" in res["reason"]
    rows = synth_rows()
    for r in rows:
        if r["d_sae"] == 256:
            r["loss"] += 1.0
    res = fit_pilots(rows, cfg1d(), d_sae=512, n_tokens=10)
    assert res["status"] == "degenerate" and "does not decrease with size" in res["reason"]


def test_two_step_method_reproduces_the_seed():
    rows = synth_rows()
    cfg = cfg1d(method="two_step", two_step_lr=2e-3, bootstrap=0)
    res = fit_pilots(rows, cfg, d_sae=512, n_tokens=10)
    assert res["status"] == "ok" and res["two_step_lr"] == 2e-3
    loss = {(r["d_sae"], r["lr"]): r["loss"] for r in rows}
    l64, l128 = loss[(64, 2e-3)], loss[(128, 2e-3)]
    b = math.log(l64 / l128) / math.log(2)
    assert res["loss_fit"]["coef"] == pytest.approx({"a": l64 * 64 ** b, "b": b, "c": 0.0},
                                                    rel=1e-12)
    assert res["lr_fit"]["coef"]["b"] == pytest.approx(-1.0, rel=1e-9)
    assert res["recommended"]["lr"] == pytest.approx(lr_star(512), rel=1e-9)
    check = res["holdout"]["checks"][0]
    assert check["d_sae"] == 256 and check["trained_loss"] == loss[(256, 2e-3)]
    assert check["predicted_loss"] == pytest.approx(l64 * (l128 / l64) ** 2, rel=1e-12)
    bad = fit_pilots(rows, cfg1d(method="two_step", two_step_lr=3e-3), d_sae=512,
                     n_tokens=10)
    assert bad["status"] == "degenerate" and "not in scaling.lr_grid" in bad["reason"]


def test_outputs_are_strict_json_and_plots(tmp_path):
    rows = synth_rows()
    rows[-1].update(loss=math.nan, status="diverged", error="NaN at step 3")
    res = fit_pilots(rows, cfg1d(bootstrap=20), d_sae=512, n_tokens=10)
    written = write_outputs(res, rows, tmp_path)
    report = json.loads(written["fit_json"].read_text(),
                        parse_constant=lambda c: pytest.fail(f"non-JSON constant {c}"))
    assert report["status"] == "ok" and len(report["pilots"]) == len(rows)
    assert report["pilots"][-1]["loss"] is None and report["pilots"][-1]["status"] == "diverged"
    for key in ("loss_png", "lr_curves_png", "lr_star_png", "pilots_csv", "loss_csv", "lr_csv"):
        assert written[key].stat().st_size > 0, key
    header = written["pilots_csv"].read_text().splitlines()[0]
    assert header.startswith("d_sae,lr,seed,n_tokens,phase,status,loss")
    # Degenerate results still write every file but the fit curves, and say why.
    bad = fit_pilots(synth_rows(sizes=[64]), cfg1d(), d_sae=512, n_tokens=10)
    written = write_outputs(bad, synth_rows(sizes=[64]), tmp_path / "bad")
    report = json.loads(written["fit_json"].read_text())
    assert report["status"] == "degenerate" and report["reason"]
    assert written["loss_png"].exists()
    assert written["loss_csv"].read_text().strip() == "d_sae,loss,lo,hi"  # DVC needs the out


# --- the real pilot grid on a tiny synthetic store ----------------------------------------

def make_store(path, n_tokens=6144, d=16, ctx=9, seed=0):
    """A finished store of sparse codes over a known dictionary (identifiable structure,
    so bigger SAEs reconstruct better)."""
    rng = np.random.default_rng(seed)
    atoms = rng.normal(size=(48, d))
    atoms /= np.linalg.norm(atoms, axis=1, keepdims=True)
    per_row = ctx - 1  # position 0 is BOS, never stored
    n_rows = n_tokens // per_row
    rows = rng.integers(10, 1000, size=(n_rows, ctx)).astype(np.uint32)
    rows[:, 0] = 128000
    codes = np.zeros((n_tokens, 48))
    for i in range(n_tokens):
        codes[i, rng.choice(48, 3, replace=False)] = rng.uniform(0.5, 1.5, 3)
    acts = (codes @ atoms + 0.02 * rng.normal(size=(n_tokens, d))).astype(np.float32)
    index = np.stack(np.meshgrid(np.arange(n_rows), np.arange(1, ctx), indexing="ij"), -1)
    index = index.reshape(-1, 2).astype(np.int64)
    writer = StoreWriter(path, fingerprint="synthetic", d=d, dtype="float32", n_tokens=n_tokens,
                         shard_tokens=2048, context_len=ctx)
    writer.add(0, rows, acts, rows[:, 1:].reshape(-1), index, np.linalg.norm(acts, axis=1))
    writer.finalize({"model": "synthetic"}, vocab_size=128256, special_ids=(128000, 128001),
                    bos_id=128000, eos_id=128001)
    return ActivationStore(path)


PILOT_PARAMS = {
    "run": {"device": "cpu", "num_threads": 1, "seed": 5},
    "sae": {"d_sae": 64, "eval_tokens": 1024, "log_every": 4, "l0_coeff": 1.0e-3},
    "scaling": {"d_sae_grid": [8, 16, 32], "lr_grid": [3.0e-3, 1.0e-2, 3.0e-2, 1.0e-1],
                "n_tokens": 4096, "tokens_grid": [2048], "batch_size": 256, "bootstrap": 50,
                "lr_warmup_steps": 2,
                "l0_warmup_steps": 4, "seeds": 2, "workers": 1},
    "budget": {"d_sae": 128},
}


def test_outputs_are_byte_identical_whatever_the_timings(tmp_path):
    # DVC tracks these files: a rerun on the same pilots must not change a byte, however
    # fast the pilots ran (their timings go to MLflow).
    written = []
    for i, (rate, secs) in enumerate([(1.0e5, 3.0), (2.5e6, 0.1)]):
        rows = [{**r, "tokens_per_s": rate, "seconds": secs} for r in synth_rows()]
        res = fit_pilots(rows, cfg1d(bootstrap=20), d_sae=512, n_tokens=10)
        written.append(write_outputs(res, rows, tmp_path / str(i)))
    for key, path in written[0].items():
        assert path.read_bytes() == written[1][key].read_bytes(), key
    assert "seconds" not in written[0]["pilots_csv"].read_text()


def test_serial_grid_logs_a_nested_run_per_pilot(tmp_path, isolated_mlflow):
    import mlflow

    from saelab.core.tracking import stage_run

    params = parse_params(PILOT_PARAMS)
    calls = []

    def fake_pilot(p, d, lr, seed, store_dir, threads=None):
        calls.append((d, lr, seed, p.scaling.n_tokens))
        return {"d_sae": d, "lr": lr, "seed": seed, "status": "ok", "loss": 1.0 / d + lr,
                "error": "", "tokens_per_s": 1.0e5, "seconds": 0.5,
                "history": [{"step": 4, "loss": 2.0}, {"step": 8, "loss": 1.5}]}

    with stage_run("fit_scaling_laws", params) as parent:
        rows = run_grid(params, tmp_path / "store", pilot_fn=fake_pilot)
    # The lr sweep (sizes x lrs x seeds at scaling.n_tokens), then sizes x seeds at the
    # tokens_grid count, each at its size's best swept lr (the lowest: loss = 1/d + lr).
    assert len(calls) == len(rows) == 3 * 4 * 2 + 3 * 2
    assert {c[2] for c in calls} == {5, 6}  # run.seed, run.seed + 1
    assert sorted(c for c in calls if c[3] == 2048) == [(d, 3e-3, s, 2048) for d in (8, 16, 32)
                                                         for s in (5, 6)]
    keys = [(r["d_sae"], r["n_tokens"], r["lr"], r["seed"]) for r in rows]
    assert keys == sorted(keys)
    runs = mlflow.search_runs(experiment_names=["saelab"],
                              filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(runs) == 30
    history = mlflow.tracking.MlflowClient().get_metric_history(runs.run_id[0], "train.loss")
    assert sorted(m.step for m in history) == [4, 8]
    assert runs["metrics.heldout_loss"].notna().all()
    # Timings are in each pilot's run (and not in the DVC-tracked pilots.csv).
    assert (runs["metrics.seconds"] == 0.5).all() and (runs["metrics.tokens_per_s"] == 1e5).all()


def test_stage_end_to_end_on_a_synthetic_store(tmp_path, monkeypatch, isolated_mlflow):
    import mlflow

    monkeypatch.chdir(tmp_path)
    store = make_store(tmp_path / paths.ACTIVATIONS_DIR)
    raw = {**PILOT_PARAMS, "scaling": {**PILOT_PARAMS["scaling"], "workers": 2}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    main()

    report = json.loads((tmp_path / paths.FIT_JSON).read_text())
    phases = [p["phase"] for p in report["pilots"]]
    # 24 in the lr sweep, 6 at tokens_grid's 2048, and the dead-latent guard's at the
    # largest count (the sweep's 4096): each width's lr*, then steps down while dead.
    assert phases.count("sweep") == 24 and phases.count("tokens") == 6
    guard = [p for p in report["pilots"] if p["phase"] == "guard"]
    assert len(guard) >= 6 and {p["n_tokens"] for p in guard} == {4096}
    for e in report["per_size"]:
        g = e["dead_guard"]
        assert g["tokens"] == 4096 and g["state"] in ("ok", "lowered", "failed")
        assert e["lr_used"] == g["lr"] <= e["lr_star"] * (1 + 1e-9)
    ok = [p for p in report["pilots"] if p["status"] == "ok"]
    assert ok, report["pilots"]
    for p in ok:  # the loss is the held-out objective of DESIGN §6
        assert p["loss"] == pytest.approx(p["mse"] * store.d + 1.0e-3 * p["l0"], rel=1e-9)
        assert p["tokens"] == p["n_tokens"] in (4096, 2048)
        assert p["dead_fraction"] is not None
    rec = report["recommended"]
    assert rec["n_tokens"] == 2_100_000_000 and rec["d_sae"] == 64
    assert report["status"] in ("ok", "lr_fallback", "holdout_outside_interval", "degenerate")
    if report["status"] != "degenerate":
        assert report["loss_fit"]["law"].startswith("L = E + A")  # L(N, D): tokens_grid set
        b = report["extrapolation"]["budget"]
        assert b["d_sae"] == 128
        # The store's d_in is not the budget's 2048 (another model): labelled, not logged.
        assert store.d != 2048 and b["meaningful"] is False and "MEANINGLESS" in b["loss_note"]
        t = report["extrapolation"]["train_sae"]
        assert t["n_tokens"] == 2_100_000_000
        # Pilots at batch 256, train_sae at 4096: the law's tokens are not train_sae's.
        assert t["batch_matched"] is False and "batch 256" in t["loss_note"]
        assert rec["lr"] > 0 and rec["caveats"]
        assert (rec["lr_source"] == "fit") == report["lr_check"]["ok"]
    else:
        assert rec["source"].startswith("FALLBACK") and report["reason"]
    assert (report["status"] == "ok") == (not report["problems"])
    md = (tmp_path / paths.BUDGET_MD).read_text()
    assert f"({rec['lr_source']})" in md and f"status {report['status']}" in md
    for name in ("loss_vs_size.png", "lr_curves.png", "lr_star_vs_size.png", "pilots.csv"):
        assert (tmp_path / paths.SCALING_DIR / name).stat().st_size > 0
    assert json.loads((tmp_path / paths.BUDGET_JSON).read_text())["tokens"] == 2.1e9
    assert (tmp_path / paths.BUDGET_MD).exists()

    runs = mlflow.search_runs(experiment_names=["saelab"])
    # Pilots carry their stage's tags too; the stage's own run is the one that is no pilot.
    parents = runs[(runs["tags.dvc.stage"] == "fit_scaling_laws") & runs["tags.saelab.pilot"].isna()]
    assert len(parents) == 1
    nested = runs[runs["tags.mlflow.parentRunId"] == parents.run_id.iloc[0]]
    assert len(nested) == len(report["pilots"])
    assert {"metrics.degenerate", "metrics.status_ok"} <= set(parents.columns)
    assert "metrics.predicted_loss_budget" not in parents.columns


def test_pilots_ignore_the_train_only_keys(tmp_path):
    # dvc.yaml leaves these out of fit_scaling_laws' params: changing them (an lr sweep of
    # train_sae) must not change a pilot.
    from saelab.scaling.laws import TRAIN_ONLY, run_pilot

    make_store(tmp_path / "store", n_tokens=2048)
    other = {"lr": 0.5, "n_tokens": 123, "max_epochs": 9.0, "stream": True,
             "shuffle_buffer": 7, "stream_lanes": 3, "checkpoint_every": 1}
    assert set(other) == set(TRAIN_ONLY)
    rows = [run_pilot(parse_params({**PILOT_PARAMS, "sae": {**PILOT_PARAMS["sae"], **sae}}),
                      8, 1e-2, 0, str(tmp_path / "store")) for sae in ({}, other)]
    for r in rows:
        del r["tokens_per_s"], r["seconds"]
    assert rows[0] == rows[1] and rows[0]["status"] == "ok"


def test_a_diverged_pilot_is_a_result_other_errors_stop(tmp_path, monkeypatch):
    import saelab.scaling.laws as scaling
    from saelab.core.errors import SaelabError

    make_store(tmp_path / "store", n_tokens=2048)
    params = parse_params(PILOT_PARAMS)

    def nan_guard(*a, **k):
        raise SaelabError("the loss or gradient became NaN/Inf at step 3 of 16. Lower ...")

    monkeypatch.setattr(scaling, "train", nan_guard)
    row = scaling.run_pilot(params, 8, 1e-1, 0, str(tmp_path / "store"))
    assert row["status"] == "diverged" and math.isnan(row["loss"]) and "NaN/Inf" in row["error"]

    def bad_setup(*a, **k):
        raise SaelabError("sae.k = 32 exceeds sae.d_sae = 8")

    monkeypatch.setattr(scaling, "train", bad_setup)
    with pytest.raises(SaelabError, match="exceeds"):
        scaling.run_pilot(params, 8, 1e-1, 0, str(tmp_path / "store"))


def test_topk_pilots_scale_k_with_their_width(tmp_path):
    """The README's `-S sae.architecture=topk -S sae.k=32` on tiny (d_sae 512, pilots 8-64
    wide): each pilot keeps the final SAE's fraction of active latents, never k > width."""
    from saelab.scaling.laws import pilot_cfg, pilot_k, run_pilot

    params = parse_params({**PILOT_PARAMS, "sae": {**PILOT_PARAMS["sae"], "architecture": "topk",
                                                   "k": 32, "d_sae": 512}})
    assert [pilot_cfg(params, d).k for d in (8, 16, 64, 512)] == [1, 1, 4, 32]
    assert pilot_k(32, 512, 48) == 3 and pilot_k(5, 10, 10) == 5
    make_store(tmp_path / "store", n_tokens=2048)
    row = run_pilot(params, 8, 1e-2, 0, str(tmp_path / "store"))
    assert row["status"] == "ok" and 0 < row["l0"] <= 1.0 + 1e-6


def _guard_grid(dead_above: float, sizes=(8, 16, 32)):
    """run_grid with fake pilots: loss 1/d + (log10 lr + 1.5)^2 (lr* ~ 0.032 at every
    width, between the grid's 0.01 and 0.1), and every latent... dead above `dead_above`
    at the guard's count, 1% dead below it."""
    params = parse_params({**PILOT_PARAMS, "scaling": {
        **PILOT_PARAMS["scaling"], "d_sae_grid": list(sizes), "lr_grid": [1e-3, 1e-2, 1e-1],
        "tokens_grid": [2048, 16384]}})
    calls = []

    def fake_pilot(p, d, lr, seed, store_dir, threads=None):
        n = p.scaling.n_tokens
        calls.append((d, lr, seed, n))
        dead = 0.3 if (n == 16384 and lr > dead_above) else 0.01
        return {"d_sae": d, "lr": lr, "seed": seed, "status": "ok", "error": "",
                "loss": 1.0 / d + (math.log10(lr) + 1.5) ** 2 + 1.0 / n, "dead_fraction": dead}

    return params, run_grid(params, "unused", pilot_fn=fake_pilot), calls


def test_dead_guard_steps_lr_down_at_the_largest_count_until_latents_live(isolated_mlflow):
    params, rows, calls = _guard_grid(dead_above=0.012)
    s = params.scaling
    sizes = {e["d_sae"]: e for e in sizes_of(rows, s)}
    for d, e in sizes.items():
        star = e["lr_star"]
        assert star == pytest.approx(10 ** -1.5, rel=0.05)
        # lr*, lr*/sqrt2, lr*/2, lr*/(2 sqrt2) = 0.0112: the first <= 0.012 is kept.
        tried = sorted(lr for dd, lr, _, n in calls if dd == d and n == 16384)
        expect = sorted({star / DEAD_LR_STEP ** k for k in range(4)})
        assert tried == pytest.approx(sorted(expect * 2))  # 2 seeds each
        g = e["dead_guard"]
        assert g["state"] == "lowered" and e["lr_used"] == pytest.approx(star / DEAD_LR_STEP ** 3)
    # Every guard pilot is at the largest count; the sweep is untouched by them.
    assert {r["n_tokens"] for r in rows if r["phase"] == "guard"} == {16384}
    res = fit_pilots(rows, s, d_sae=64, n_tokens=10)
    assert res["status"] in ("ok", "lr_fallback", "holdout_outside_interval")
    assert "dead_latents" not in res["status"]
    # lr* is the loss's optimum (the law's); train_sae's lr is capped by the guard's lr at
    # the nearest pilot width (or that width's guarded lr, on a fallback).
    rec = res["recommended"]
    assert rec["lr"] == pytest.approx(sizes[32]["lr_used"])
    assert rec["lr_source"] in ("fit_capped_dead", "fallback_nearest_width")
    # The loss law does not fit the losses of runs that left too many latents dead: its
    # cell at (d, 16384) is the guarded lr's loss, not lr*'s lower one.
    from saelab.scaling.laws import best_cells, unsafe_cells
    cells = {(d, n): v for d, n, v in best_cells(rows, s.n_tokens, unsafe_cells(rows, s))}
    for d, e in sizes.items():
        assert cells[(d, 16384)] == pytest.approx(
            1.0 / d + (math.log10(e["lr_used"]) + 1.5) ** 2 + 1.0 / 16384)


def test_dead_guard_that_finds_no_live_lr_says_so(isolated_mlflow):
    params, rows, calls = _guard_grid(dead_above=1e-6, sizes=(8, 16, 32))
    e = sizes_of(rows, params.scaling)[0]
    g = e["dead_guard"]
    assert g["state"] == "failed"
    assert g["lr"] == pytest.approx(e["lr_star"] / DEAD_LR_STEP ** DEAD_MAX_STEPS)
    res = fit_pilots(rows, params.scaling, d_sae=64, n_tokens=10)
    assert res["status"] == "dead_latents" or any(p.startswith("dead_latents")
                                                   for p in res["problems"])
    assert "raise scaling.max_dead_fraction" in res["reason"]


def test_pilot_grid_logs_progress_off_a_terminal(isolated_mlflow, caplog):
    # tqdm draws nothing under nohup or `dvc queue`: the grid must still say where it is.
    with caplog.at_level("INFO", logger="saelab.progress"):
        _guard_grid(dead_above=0.012)
    lines = [r.getMessage() for r in caplog.records if r.name == "saelab.progress"]
    assert lines and all(line.startswith("pilots: pilot token") for line in lines)
    assert "(100.0%)" in lines[-1] and "guard d_sae=" in lines[-1]
