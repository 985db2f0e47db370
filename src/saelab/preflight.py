"""Checks every stage entry point (stages/*.py) makes before the stage's own work, for itself and the stages after it, so a
sweep stops in seconds, not after hours of extraction and training:

- preconditions: the OpenAI key interpret will need, the Hub token the model or corpus
  needs, the free disk the activation store needs;
- the override rule (README, Sweeps): conf/ is the only lasting source of parameters.
  params.yaml is conf/ composed with the overrides (`-S`) of the experiment running now,
  and nothing else. Outside `dvc exp run` it must equal conf/ (an override left behind by
  a workspace experiment stops `dvc repro`); inside one, an override of the previous
  experiment that this one does not repeat is named in a warning (DVC recomposes
  params.yaml from conf/ on every `-S`, so it would otherwise vanish silently).
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

from .core import paths
from .core.config import ConfigError, Params, flatten, load_params
from .core.errors import SaelabError
from .core.runtime import setup_logging

log = logging.getLogger(__name__)

# dvc.yaml's stages in run order: a stage checks its own preconditions and its successors'.
STAGES = ("fetch_model", "fetch_oscar", "extract_mlp8", "fit_scaling_laws", "train_sae",
          "interpret")


def _from(stage: str) -> tuple[str, ...]:
    return STAGES[STAGES.index(stage):] if stage in STAGES else ()


def preconditions(params: Params, stage: str = STAGES[0], root: Path = Path(".")) -> None:
    """Raise SaelabError for the first unmet precondition of `stage` or a later stage."""
    from .activations.store import check_disk, estimate_bytes
    from .core.hub_access import model_token, oscar_token

    later = _from(stage)
    if "fetch_model" in later:
        model_token(params.model)
    if "fetch_oscar" in later and params.data.source == "oscar":
        oscar_token(params.data)
    if "extract_mlp8" in later and stage != "extract_mlp8":  # extract checks its own, exactly
        ex = params.extract
        # A changed store is built beside the finished one (.next/): the full size is needed.
        check_disk(root / paths.ACTIVATIONS_DIR,
                   estimate_bytes(ex.n_tokens, params.model.hidden_size, ex.store_dtype,
                                  ex.context_len))
    if "interpret" in later:
        from .interpret.stage import preconditions as interpret_preconditions

        interpret_preconditions(params.interpret)


def compose_conf(root: Path = Path(".")) -> dict[str, Any] | None:
    """conf/ composed as `saelab params` (and DVC) compose it, or None without a conf/."""
    if not (root / "conf" / "config.yaml").is_file():
        return None
    try:
        from .cli import compose_params
        import dvc.utils.hydra  # noqa: F401  (compose_params needs it)
    except ImportError as e:  # a GPU image without DVC runs stages by hand (bench/gpu.py)
        log.warning("conf/ cannot be composed here (%s): the override rule is not checked", e)
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = compose_params(root=root, output=Path(tmp) / "params.yaml")
        return yaml.safe_load(out.read_text(encoding="utf-8"))


def _value(v: Any) -> Any:
    """A number written as a string (YAML 1.1 reads dvc.lock's `1e-08` so) as the number."""
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def _flat(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _value(v) for k, v in flatten(d).items()}


def _differences(a: dict[str, Any], b: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    fa, fb = _flat(a), _flat(b)
    return {k: (fa.get(k), fb.get(k)) for k in sorted(set(fa) | set(fb))
            if fa.get(k) != fb.get(k)}


def _locked_params(root: Path) -> dict[str, Any]:
    """Every param value the last run recorded in dvc.lock, flattened."""
    try:
        lock = yaml.safe_load((root / "dvc.lock").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    out: dict[str, Any] = {}
    for stage in (lock.get("stages") or {}).values():
        for key, value in ((stage.get("params") or {}).get("params.yaml") or {}).items():
            out.update(_flat({key: value}))
    return out


def _fmt(diffs: dict[str, tuple[Any, Any]], limit: int = 5) -> str:
    shown = ", ".join(f"{k} (params.yaml: {a!r}, conf/: {b!r})"
                      for k, (a, b) in list(diffs.items())[:limit])
    return shown + (f" and {len(diffs) - limit} more" if len(diffs) > limit else "")


def check_overrides(params_path: Path = Path("params.yaml"), root: Path = Path(".")) -> list[str]:
    """Apply the override rule; returns the overrides of the running experiment."""
    conf = compose_conf(root)
    if conf is None:
        return []
    current = yaml.safe_load(Path(params_path).read_text(encoding="utf-8")) or {}
    diffs = _differences(current, conf)
    if not os.environ.get("DVC_EXP_NAME"):
        if diffs:
            raise SaelabError(
                f"params.yaml differs from conf/ at {_fmt(diffs)}: an override left behind "
                "by a workspace `dvc exp run -S` (overrides last one experiment). Keep it by "
                "writing it into conf/, or drop it; then run `saelab params` to regenerate "
                "params.yaml")
        return []
    flat_conf, flat_now = _flat(conf), _flat(current)
    dropped = {k: v for k, v in _locked_params(root).items()
               if k in flat_conf and v != flat_conf[k] and flat_now.get(k) == flat_conf[k]}
    if dropped:
        log.warning("this experiment does not repeat the previous one's override(s) %s: "
                    "each `dvc exp run -S` starts again from conf/, so they are back at "
                    "conf/'s values. To keep one, pass it again (-S key=value) or write it "
                    "into conf/", ", ".join(f"{k}={v!r}" for k, v in dropped.items()))
    overrides = [f"{k}={a!r}" for k, (a, _) in diffs.items()]
    if overrides:
        log.info("experiment %s: overrides of conf/: %s", os.environ["DVC_EXP_NAME"],
                 ", ".join(overrides))
    return overrides


def preflight(params: Params, stage: str, params_path: Path = Path("params.yaml"),
              root: Path = Path(".")) -> None:
    """Everything above, for `stage` and the stages after it; pipeline stages only (saelab
    pareto runs on a params file of its own)."""
    if stage not in STAGES:
        return
    check_overrides(params_path, root)
    preconditions(params, stage, root)


def main(stage: str, params_path: str = "params.yaml") -> None:
    """What stages/*.py call first: an unmet check exits 2 with one ERROR line, as the
    stage itself would (core.stage.run_stage), before the stage imports its own work."""
    setup_logging()
    try:
        preflight(load_params(params_path), stage, Path(params_path))
    except (ConfigError, SaelabError) as e:
        log.error("%s failed: %s", stage, e)
        sys.exit(2)
