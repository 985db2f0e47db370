"""Scaling-law fits: loss against SAE size, the best learning rate per size, lr* against size.

- `fit_loss_vs_size`: L = a N^-b + c (c >= 0 is the irreducible loss), least squares on
  ln L, started from the best pure power law for each c (a 1-D profile, so no fragile
  guess). With two sizes the three parameters are not identified: c = 0 and the line
  through the two points in log-log space (the seed's two-step method), said in the note.
- `best_lr_parabola`: a parabola in log10(lr); its vertex is lr*.
- `fit_lr_vs_size`: lr* = a N^b, least squares in log-log space.
- `fit_joint`: L(N, D) = E + A N^-alpha + B D^-beta over width N and pilot tokens D
  (Chinchilla's form, Hoffmann et al. 2022), least squares on ln L from the best point of
  an (alpha, beta) grid whose E, A, B are non-negative least squares (so no fragile
  guess). A >= 0: a width that does not help gives A = 0 (a flat law), never a rise.

Both laws are fitted on the log of the value: pilot noise is roughly proportional to the
loss, and on synthetic data with relative noise the log fit recovers b with ~30% less
scatter than a fit on L itself, and its bootstrap spread matches the real one.

Uncertainty is a bootstrap. With per-point standard errors (`sigma`: the pilot grid
measures them from the spread of each size's lr curve) it is parametric: redraw each
point from its error and refit. Without them it resamples the fit's residuals, scaled by
sqrt(n / (n - p)) for the p parameters they absorbed and by t_{n-p} / z at the interval's
level for the noise in that scale (95% intervals cover the truth ~92-98% of the time in
tests with 5-8 sizes; unscaled, 71%). That needs more points than parameters; an exact
fit gets no interval, and the note says so.

Inputs a law cannot describe (one size, NaN losses, loss rising with size, a best lr
on the edge of the grid) raise `FitError` with what to change, never a number.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
from scipy.optimize import least_squares, minimize_scalar, nnls
from scipy.stats import norm, t as student_t

from ..core.errors import SaelabError

LEVEL = 0.95


class FitError(SaelabError):
    """The data cannot support the requested fit; the message says why and what to change."""


@dataclass
class Fit:
    """One fitted law. `law` is "loss" (L = a N^-b + c) or "lr" (lr = a N^b)."""

    law: str
    coef: dict[str, float]
    x: list[float]
    y: list[float]
    residuals: list[float]
    r2: float | None
    method: str
    note: str = ""
    ci: dict[str, list[float]] | None = None
    # Bootstrap replicates of the coefficients (rows follow `coef`'s keys), for intervals
    # on predictions; not serialised.
    boot: np.ndarray | None = field(default=None, repr=False)
    boot_failed: int = 0

    def _eval(self, n: np.ndarray, coef: Sequence[float]) -> np.ndarray:
        if self.law == "loss":
            a, b, c = coef
            return a * n ** (-b) + c
        a, b = coef
        return a * n ** b

    def predict(self, n):
        """The law at size(s) n (float for a scalar, array otherwise)."""
        out = self._eval(np.asarray(n, dtype=float), list(self.coef.values()))
        return float(out) if np.ndim(out) == 0 else out

    def predict_ci(self, n, level: float = LEVEL) -> list[float] | None:
        """Percentile bootstrap interval of the prediction at a scalar n (None without one)."""
        if self.boot is None or len(self.boot) == 0:
            return None
        preds = self._eval(np.full(len(self.boot), float(n)), self.boot.T)
        q = 100 * (1 - level) / 2
        return [float(np.percentile(preds, q)), float(np.percentile(preds, 100 - q))]

    def to_dict(self) -> dict[str, Any]:
        return {
            "law": "L = a * N^-b + c" if self.law == "loss" else "lr = a * N^b",
            "method": self.method,
            "coef": self.coef,
            "ci": self.ci,
            "ci_level": LEVEL if self.ci else None,
            "bootstrap_reps": 0 if self.boot is None else int(len(self.boot)),
            "bootstrap_failed": self.boot_failed,
            "r2": self.r2,
            "x": self.x,
            "y": self.y,
            "residuals": self.residuals,
            "note": self.note,
        }


# --- input checks --------------------------------------------------------------------

def _as_arrays(sizes, values, what: str) -> tuple[np.ndarray, np.ndarray]:
    x = np.asarray(sizes, dtype=float).ravel()
    y = np.asarray(values, dtype=float).ravel()
    if len(x) != len(y):
        raise FitError(f"{len(x)} sizes but {len(y)} {what} values; pass one value per size")
    bad = [f"d_sae={s:g}" for s, v in zip(x, y) if not math.isfinite(v)]
    if bad:
        raise FitError(f"{what} is NaN/inf at {', '.join(bad)}: those pilots diverged or "
                       "failed; lower the top of scaling.lr_grid or check the pilot logs")
    if np.any(x <= 0) or np.any(~np.isfinite(x)):
        raise FitError(f"sizes must be finite and > 0, got {x.tolist()}")
    if np.any(y <= 0):
        raise FitError(f"{what} must be > 0 for a power law, got {y.tolist()}")
    distinct = np.unique(x)
    if len(distinct) < 2:
        raise FitError(f"only one size ({', '.join(f'{s:g}' for s in distinct) or 'none'}): "
                       f"a power law of {what} needs at least 2 sizes (3 for an irreducible "
                       "term); add sizes to scaling.d_sae_grid")
    return x, y


def _check_decreasing(x: np.ndarray, y: np.ndarray) -> None:
    sizes = np.unique(x)
    means = np.array([y[x == s].mean() for s in sizes])
    rises = [f"d_sae={sizes[i]:g} -> {means[i]:.4g} but d_sae={sizes[i + 1]:g} -> "
             f"{means[i + 1]:.4g}" for i in range(len(sizes) - 1) if means[i + 1] >= means[i]]
    if rises:
        raise FitError("loss does not decrease with size (" + "; ".join(rises) + "), so no "
                       "L = a N^-b + c with b > 0 fits it. Usual causes: pilots too short for "
                       "the larger SAEs (raise scaling.n_tokens), a learning rate grid that "
                       "misses some sizes' optimum, or sizes too close together for the noise")


# --- the fits --------------------------------------------------------------------------

def _loglog(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(a, s) of y = a x^s by least squares in log-log space."""
    s, log_a = np.polyfit(np.log(x), np.log(y), 1)
    return float(np.exp(log_a)), float(s)


def _fit_offset(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """(a, b, c) of y = a x^-b + c by least squares on ln y; c in [0, min y), a > 0, b >= 0."""
    if np.min(y) <= 0:
        raise FitError("non-positive loss in the data")
    # Sizes relative to their geometric mean keep a of the order of the losses.
    x0 = float(np.exp(np.mean(np.log(x))))
    u, ly = x / x0, np.log(y)

    def given_c(c: float) -> tuple[float, float]:
        a, s = _loglog(u, y - c)
        return a, -s

    def sse(c: float) -> float:
        a, b = given_c(c)
        return float(np.sum((np.log(a * u ** (-b) + c) - ly) ** 2))

    c0 = minimize_scalar(sse, bounds=(0.0, float(np.min(y)) * (1 - 1e-9)), method="bounded").x
    a0, b0 = given_c(c0)
    res = least_squares(lambda p: np.log(p[0] * u ** (-p[1]) + p[2]) - ly,
                        x0=[a0, max(b0, 0.0), c0], bounds=([1e-300, 0.0, 0.0], np.inf),
                        x_scale="jac")
    a, b, c = res.x
    return float(a * x0 ** b), float(b), float(c)


def _bootstrap(refit: Callable[[np.ndarray], Sequence[float]], lyhat: np.ndarray,
               lresid: np.ndarray, sigma_log: np.ndarray | None, n_params: int, reps: int,
               seed: int) -> tuple[np.ndarray | None, int, str]:
    """Coefficient replicates from refits of redrawn ln-values; (replicates, failures, note)."""
    n = len(lyhat)
    if reps <= 0:
        return None, 0, "no bootstrap (scaling.bootstrap = 0)"
    if sigma_log is None and n <= n_params:
        return None, 0, (f"no confidence interval: {n} points for {n_params} parameters leave "
                         "no residuals to resample; add sizes or pass per-point errors")
    rng = np.random.default_rng(seed)
    if sigma_log is None:
        dof = n - n_params
        q = 0.5 + LEVEL / 2
        scaled = lresid * math.sqrt(n / dof) * float(student_t.ppf(q, dof) / norm.ppf(q))
    rows, failed = [], 0
    for _ in range(reps):
        if sigma_log is not None:
            ly = lyhat + rng.normal(0.0, sigma_log)
        else:
            ly = lyhat + rng.choice(scaled, size=n, replace=True)
        try:
            coef = refit(np.exp(ly))
        except (FitError, ValueError, FloatingPointError, np.linalg.LinAlgError):
            failed += 1
            continue
        if np.all(np.isfinite(coef)):
            rows.append(coef)
        else:
            failed += 1
    how = ("parametric bootstrap from per-point errors" if sigma_log is not None
           else "bootstrap of residuals scaled for degrees of freedom")
    note = f"{how}, {reps} reps"
    if failed:
        note += f", {failed} refits failed and were dropped"
    return (np.array(rows) if rows else None), failed, note


def _ci(boot: np.ndarray | None, names: Sequence[str]) -> dict[str, list[float]] | None:
    if boot is None or len(boot) == 0:
        return None
    q = 100 * (1 - LEVEL) / 2
    return {k: [float(np.percentile(boot[:, i], q)), float(np.percentile(boot[:, i], 100 - q))]
            for i, k in enumerate(names)}


def _r2(y: np.ndarray, yhat: np.ndarray, n_params: int) -> float | None:
    # With as many points as parameters R^2 is 1 by construction and says nothing.
    if len(y) <= n_params:
        return None
    sst = float(np.sum((y - y.mean()) ** 2))
    return 1.0 - float(np.sum((y - yhat) ** 2)) / sst if sst > 0 else None


def fit_loss_vs_size(sizes: Sequence[float], losses: Sequence[float], *,
                     sigma: Sequence[float] | None = None, bootstrap: int = 200,
                     seed: int = 0) -> Fit:
    """L = a N^-b + c; with exactly two sizes c = 0 (pure power law through the points).
    `sigma` are standard errors of the losses (same units)."""
    x, y = _as_arrays(sizes, losses, "loss")
    _check_decreasing(x, y)
    if len(np.unique(x)) >= 3:
        a, b, c = _fit_offset(x, y)
        n_params, method, note = 3, "least squares on ln L", ""
        refit = lambda yy: _fit_offset(x, yy)  # noqa: E731
    else:
        a, s = _loglog(x, y)
        b, c = -s, 0.0
        n_params, method = 2, "power law through two sizes in log-log space (c = 0)"
        note = ("only two sizes: the irreducible term c is not identifiable and is set to 0 "
                "(the seed's two-step law); add a third size to fit it")
        refit = lambda yy: _with_zero_c(_loglog(x, yy))  # noqa: E731
    coef = {"a": a, "b": b, "c": c}
    sig = None if sigma is None else np.asarray(sigma, dtype=float) / y
    return _finish(Fit("loss", coef, x.tolist(), y.tolist(), [], None, method), refit,
                   n_params, sig, bootstrap, seed, note)


def _with_zero_c(a_s: tuple[float, float]) -> tuple[float, float, float]:
    a, s = a_s
    return a, -s, 0.0


def fit_lr_vs_size(sizes: Sequence[float], lr_stars: Sequence[float], *,
                   sigma_log: Sequence[float] | None = None, bootstrap: int = 200,
                   seed: int = 0) -> Fit:
    """lr* = a N^b by least squares in log-log space; `sigma_log` are errors of ln lr*."""
    x, y = _as_arrays(sizes, lr_stars, "best learning rate")
    a, b = _loglog(x, y)
    sig = None if sigma_log is None else np.asarray(sigma_log, dtype=float)
    return _finish(Fit("lr", {"a": a, "b": b}, x.tolist(), y.tolist(), [], None,
                       "least squares in log-log space"),
                   lambda yy: _loglog(x, yy), 2, sig, bootstrap, seed, "")


def _finish(fit: Fit, refit: Callable[[np.ndarray], Sequence[float]], n_params: int,
            sigma_log: np.ndarray | None, bootstrap: int, seed: int, note: str) -> Fit:
    """Residuals, R^2 and the bootstrap, all on the log scale the fit was made on."""
    x, y = np.asarray(fit.x), np.asarray(fit.y)
    ly, lyhat = np.log(y), np.log(fit.predict(x))
    fit.residuals = (ly - lyhat).tolist()
    fit.r2 = _r2(ly, lyhat, n_params)
    boot, failed, bnote = _bootstrap(refit, lyhat, ly - lyhat, sigma_log, n_params, bootstrap,
                                     seed)
    fit.boot, fit.boot_failed = boot, failed
    fit.ci = _ci(boot, list(fit.coef))
    name = "L" if fit.law == "loss" else "lr"
    fit.note = "; ".join(filter(None, [note, f"residuals and R^2 are in ln({name})", bnote]))
    return fit


@dataclass
class JointFit:
    """L(N, D) = E + A (N/n0)^-alpha + B (D/d0)^-beta; n0, d0 the geometric means of the
    fitted widths and token counts (A and B stay of the order of the losses)."""

    coef: dict[str, float]
    n0: float
    d0: float
    points: list[list[float]]
    residuals: list[float]
    r2: float | None
    note: str = ""

    def predict(self, n, d):
        c = self.coef
        out = (c["E"] + c["A"] * (np.asarray(n, dtype=float) / self.n0) ** (-c["alpha"])
               + c["B"] * (np.asarray(d, dtype=float) / self.d0) ** (-c["beta"]))
        return float(out) if np.ndim(out) == 0 else out

    def tokens_for(self, n: float, excess: float) -> float:
        """Tokens at which the data term is `excess` (relative) of the loss at unlimited
        data for width n; inf when the law has no data term to shrink."""
        c = self.coef
        floor = c["E"] + c["A"] * (n / self.n0) ** (-c["alpha"])
        if c["B"] <= 0 or c["beta"] <= 0 or floor <= 0:
            return math.inf
        return float(self.d0 * (c["B"] / (excess * floor)) ** (1.0 / c["beta"]))

    def to_dict(self) -> dict[str, Any]:
        return {"law": "L = E + A * (N/n0)^-alpha + B * (D/d0)^-beta", "coef": self.coef,
                "n0": self.n0, "d0": self.d0, "r2": self.r2, "points": self.points,
                "residuals": self.residuals, "note": self.note}


JOINT_PARAMS = 5
_EXPONENTS = np.geomspace(0.02, 3.0, 28)


def fit_joint(sizes: Sequence[float], tokens: Sequence[float], losses: Sequence[float], *,
              start: JointFit | None = None) -> JointFit:
    """L(N, D) = E + A (N/n0)^-alpha + B (D/d0)^-beta by least squares on ln L, with E, A,
    B >= 0 and alpha, beta in [0.02, 3]. Needs more points than its 5 parameters, at >= 2
    widths and >= 2 token counts. `start` (a fit of the same points' layout, e.g. for
    bootstrap refits) replaces the grid search as the starting point."""
    n = np.asarray(sizes, dtype=float).ravel()
    d = np.asarray(tokens, dtype=float).ravel()
    y = np.asarray(losses, dtype=float).ravel()
    if not len(n) == len(d) == len(y):
        raise FitError(f"{len(n)} widths, {len(d)} token counts and {len(y)} losses; pass "
                       "one of each per point")
    bad = [f"(d_sae={a:g}, tokens={b:g})" for a, b, v in zip(n, d, y) if not math.isfinite(v)]
    if bad:
        raise FitError(f"loss is NaN/inf at {', '.join(bad)}: those pilots diverged; lower "
                       "the top of scaling.lr_grid or check the pilot logs")
    if np.any(y <= 0) or np.any(n <= 0) or np.any(d <= 0):
        raise FitError("widths, token counts and losses must be > 0 for L(N, D)")
    if len(np.unique(n)) < 2 or len(np.unique(d)) < 2 or len(y) <= JOINT_PARAMS:
        raise FitError(f"L(N, D) has {JOINT_PARAMS} parameters and needs more points, at >= 2 "
                       f"widths and >= 2 token counts; got {len(y)} points at widths "
                       f"{sorted(set(n.tolist()))} and token counts {sorted(set(d.tolist()))}. "
                       "Add sizes to scaling.d_sae_grid or counts to scaling.tokens_grid")
    n0, d0 = float(np.exp(np.mean(np.log(n)))), float(np.exp(np.mean(np.log(d))))
    u, v, ly = n / n0, d / d0, np.log(y)
    best: tuple[float, Any] = (math.inf, None)
    if start is not None and (start.n0, start.d0) == (n0, d0):
        best = (math.inf, list(start.coef.values()))
    for alpha in _EXPONENTS if best[1] is None else ():
        for beta in _EXPONENTS:
            design = np.stack([np.ones_like(u), u ** -alpha, v ** -beta], 1)
            # Rows scaled by 1/L: least squares on relative error, close to the ln L fit.
            w, _ = nnls(design / y[:, None], np.ones_like(y))
            pred = design @ w
            if np.all(pred > 0):
                sse = float(np.sum((np.log(pred) - ly) ** 2))
                if sse < best[0]:
                    best = (sse, [w[0], w[1], alpha, w[2], beta])
    if best[1] is None:
        raise FitError("no L(N, D) with non-negative terms fits these losses")

    def resid(p):
        return np.log(p[0] + p[1] * u ** -p[2] + p[3] * v ** -p[4]) - ly

    lo = [0.0, 0.0, _EXPONENTS[0], 0.0, _EXPONENTS[0]]
    hi = [np.inf, np.inf, _EXPONENTS[-1], np.inf, _EXPONENTS[-1]]
    x0 = np.clip(best[1], lo, hi)
    x0[[0, 1, 3]] = np.maximum(x0[[0, 1, 3]], 1e-12)  # strictly positive for a finite log
    res = least_squares(resid, x0=x0, bounds=(lo, hi), x_scale="jac")
    p = res.x if np.sum(res.fun ** 2) <= best[0] else np.asarray(best[1])
    coef = dict(zip(("E", "A", "alpha", "B", "beta"), (float(v) for v in p)))
    fit = JointFit(coef, n0, d0, [[float(a), float(b), float(c)] for a, b, c in zip(n, d, y)],
                   [], None)
    r = ly - np.log(fit.predict(n, d))
    fit.residuals = r.tolist()
    fit.r2 = _r2(ly, ly - r, JOINT_PARAMS)
    notes = ["residuals and R^2 are in ln(L)"]
    if coef["A"] < 1e-9 * max(coef["E"], 1e-300):
        notes.append("A = 0: loss does not fall with width over these pilots (alpha is then "
                     "unidentified and irrelevant)")
    fit.note = "; ".join(notes)
    return fit


def best_lr_parabola(lrs: Sequence[float], losses: Sequence[float], *, neighbours: int = 1,
                     sigma: Sequence[float] | None = None) -> tuple[float, dict]:
    """lr* from a parabola in log10(lr) around the best grid point of one size.

    The parabola goes through the best finite point and its `neighbours` nearest finite
    points on each side (1: three-point parabolic interpolation). Loss against log lr is
    a bowl only near its bottom: undertrained low lrs fall on a near-straight line and high
    lrs blow up, and a parabola through all of them puts its vertex off the optimum.
    A non-finite loss (a diverged pilot) counts as worse than any finite one when deciding
    whether the best lr is bracketed, and is left out of the parabola. `sigma` are the
    losses' standard errors (from repeated seeds), pooled over the parabola's points.
    """
    lr = np.asarray(lrs, dtype=float).ravel()
    loss = np.asarray(losses, dtype=float).ravel()
    if len(lr) != len(loss):
        raise FitError(f"{len(lr)} learning rates but {len(loss)} losses")
    if np.any(lr <= 0) or len(np.unique(lr)) != len(lr):
        raise FitError(f"learning rates must be distinct and > 0, got {lr.tolist()}")
    order = np.argsort(lr)
    lr, loss = lr[order], loss[order]
    sig = None if sigma is None else np.asarray(sigma, dtype=float).ravel()[order]
    finite = np.isfinite(loss)
    if len(lr) < 3:
        raise FitError(f"scaling.lr_grid has {len(lr)} learning rate(s) {lr.tolist()}: a "
                       "parabola in log lr needs at least 3; add learning rates around it")
    if finite.sum() < 3:
        raise FitError(f"only {int(finite.sum())} finite losses over learning rates "
                       f"{lr.tolist()}: a parabola needs 3; the others diverged. Add smaller "
                       "learning rates to scaling.lr_grid")
    i = int(np.argmin(np.where(finite, loss, np.inf)))
    if i == 0:
        raise FitError(f"the best learning rate {lr[0]:.3g} is the smallest in the grid, so "
                       "the optimum may lie below it; extend scaling.lr_grid downwards "
                       f"(e.g. add {lr[0] / 3:.1e})")
    if i == len(lr) - 1:
        raise FitError(f"the best learning rate {lr[-1]:.3g} is the largest in the grid, so "
                       "the optimum may lie above it; extend scaling.lr_grid upwards "
                       f"(e.g. add {lr[-1] * 3:.1e})")
    near = sorted(np.flatnonzero(finite), key=lambda j: (abs(j - i), j))
    window = np.sort(near[:2 * neighbours + 1])
    x, y = np.log10(lr[window]), loss[window]
    design = np.vander(x, 3)
    p, *_ = np.linalg.lstsq(design, y, rcond=None)
    p2, p1, p0 = (float(v) for v in p)
    if p2 <= 0:
        raise FitError(f"the losses at learning rates {lr[window].tolist()} are not "
                       "bowl-shaped (the parabola in log lr opens downwards), so there is no "
                       "lr*; the pilots are too noisy for this grid: raise scaling.seeds or "
                       "scaling.n_tokens")
    x_star = -p1 / (2 * p2)
    if not x.min() <= x_star <= x.max():
        raise FitError(f"the parabola's minimum lr = {10 ** x_star:.3g} lies outside the "
                       f"learning rates it was fitted on [{10 ** x.min():.3g}, "
                       f"{10 ** x.max():.3g}]; refine scaling.lr_grid around the best learning "
                       "rate (or lower scaling.parabola_neighbours)")
    yhat = design @ p
    dof = len(x) - 3
    resid_sd = loss_se = None
    if dof > 0:
        resid_sd = math.sqrt(float(np.sum((y - yhat) ** 2)) / dof)
    if sig is not None and np.all(np.isfinite(sig[window])):
        loss_se = math.sqrt(float(np.mean(sig[window] ** 2)))
    noise = loss_se if loss_se is not None else resid_sd
    se = None
    if noise is not None:
        # Delta method on x* = -p1 / (2 p2).
        cov = noise ** 2 * np.linalg.inv(design.T @ design)
        grad = np.array([p1 / (2 * p2 ** 2), -1 / (2 * p2), 0.0])
        se = math.sqrt(max(float(grad @ cov @ grad), 0.0))
    info = {
        "coef": [p2, p1, p0],
        "window_lrs": lr[window].tolist(),
        "log10_lr_star": x_star,
        "loss_at_lr_star": p2 * x_star ** 2 + p1 * x_star + p0,
        "best_grid_lr": float(lr[i]),
        "best_grid_loss": float(loss[i]),
        "r2": _r2(y, yhat, 3),
        "resid_sd": resid_sd,
        "loss_se": loss_se,
        "log10_lr_star_se": se,
        "dropped_nonfinite_lrs": lr[~finite].tolist(),
    }
    return float(10 ** x_star), info
