"""MLflow bookkeeping: one run per stage execution, tagged so runs map back to DVC.

`SAELAB_TRACKING=off` runs a stage without MLflow (a GPU image or cluster that lacks it,
as bench/gpu.py's torchrun smoke does); the stage says so in its log. Every helper
below is then a no-op.

The tracking URI is `MLFLOW_TRACKING_URI` when set, else an absolute sqlite URI in
the *user's* repository root. `dvc exp run --queue` executes in a copy under
`.dvc/tmp/exps/`; a relative or copy-local URI would lose those runs, so the root
is resolved back through that directory.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import subprocess
from pathlib import Path
from typing import Any, Iterator

from filelock import FileLock

from .config import Params, flatten, to_dict

log = logging.getLogger(__name__)

EXPERIMENT = "saelab"
_SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")
# MLflow 3 contacts its telemetry host when imported unless told not to: stages run
# offline (tests, air-gapped clusters) and must not. A user may still opt in.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow caps a param value's length; longer values are truncated, not rejected.
_MAX_PARAM_LEN = 500


def enabled() -> bool:
    return os.environ.get("SAELAB_TRACKING", "on").strip().lower() not in ("off", "0", "false")


def _mlflow():
    """The mlflow module, or one clear error naming both ways out."""
    try:
        import mlflow
    except ImportError as e:
        from .errors import SaelabError
        raise SaelabError(f"MLflow cannot be imported ({e}); install the project's "
                          "requirements (`make install`), or set SAELAB_TRACKING=off to run "
                          "this stage without tracking") from None
    return mlflow


def repo_root(start: Path | None = None) -> Path:
    """The user's repository root, also from inside a DVC temp-dir executor."""
    here = Path(os.environ.get("DVC_ROOT") or start or Path.cwd()).resolve()
    text = str(here)
    marker = f"{os.sep}.dvc{os.sep}tmp{os.sep}exps{os.sep}"
    if marker in text:
        return Path(text.split(marker)[0])
    for p in (here, *here.parents):
        if (p / "dvc.yaml").exists():
            return p
    return here


def tracking_uri() -> str:
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{repo_root() / 'mlflow.db'}"


def _git_commit(root: Path) -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10)
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


def scrub(value: Any) -> Any:
    """Replace any secret from the environment found inside a string value."""
    if not isinstance(value, str):
        return value
    for name in _SECRET_ENV:
        secret = os.environ.get(name)
        if secret and len(secret) >= 4 and secret in value:
            value = value.replace(secret, f"<{name}>")
    return value


def setup() -> str:
    """Point MLflow at the project store and make sure the experiment exists.

    A lock serialises the first sqlite migration: parallel queue workers that each
    create a fresh database race otherwise.
    """
    mlflow = _mlflow()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    lock_path = None
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        db.parent.mkdir(parents=True, exist_ok=True)
        lock_path = str(db) + ".lock"
    with FileLock(lock_path) if lock_path else contextlib.nullcontext():
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            artifacts = (repo_root() / "mlartifacts").as_uri() if lock_path else None
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts)
            except mlflow.exceptions.MlflowException:
                pass  # created by a concurrent worker between the check and the call
        mlflow.set_experiment(EXPERIMENT)
    return uri


def stage_tags(stage: str, params: Params) -> dict[str, str]:
    root = repo_root()
    return {
        "dvc.stage": stage,
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "git.commit": _git_commit(Path.cwd()) or _git_commit(root),
        "profile": params.profile,
        "mlflow.source.name": f"stages/{stage}.py",
    }


def _clean_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow param values: secrets scrubbed, cut to MLflow's length limit."""
    return {k: str(scrub(v))[:_MAX_PARAM_LEN] for k, v in params.items()}


@contextlib.contextmanager
def stage_run(stage: str, params: Params, run_name: str | None = None) -> Iterator[Any]:
    """One MLflow run for one stage execution; logs every param and the DVC tags."""
    if not enabled():
        log.warning("SAELAB_TRACKING=off: this %s run is not recorded in MLflow", stage)
        yield None
        return
    mlflow = _mlflow()
    setup()
    exp = os.environ.get("DVC_EXP_NAME", "")
    name = run_name or (f"{stage}:{exp}" if exp else stage)
    with mlflow.start_run(run_name=name, tags=stage_tags(stage, params)) as run:
        mlflow.log_params(_clean_params(flatten(to_dict(params))))
        yield run


@contextlib.contextmanager
def nested_run(name: str, params: dict[str, Any], tags: dict[str, str] | None = None):
    if not enabled():
        yield None
        return
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags=tags or {}) as run:
        mlflow.log_params(_clean_params(params))
        yield run


def _active():
    """The active MLflow run, or None (no run, or tracking off)."""
    if not enabled():
        return None
    import mlflow

    return mlflow.active_run()


def log_params(params: dict[str, Any]) -> None:
    if _active() is not None:
        import mlflow

        mlflow.log_params(_clean_params(params))


def set_tags(tags: dict[str, Any]) -> None:
    if _active() is not None:
        import mlflow

        mlflow.set_tags({k: scrub(str(v)) for k, v in tags.items()})


_METRIC_KEY = re.compile(r"[^0-9A-Za-z_\-. /]")


def log_metrics(metrics: dict[str, Any], step: int | None = None) -> None:
    """Log the finite numeric entries of a (possibly nested) metrics dict."""
    import math

    if _active() is None:
        return
    import mlflow

    flat = flatten(metrics)
    clean = {}
    for k, v in flat.items():
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if math.isfinite(v):
            clean[_METRIC_KEY.sub("_", k)] = float(v)
    if clean:
        mlflow.log_metrics(clean, step=step)


def log_artifact(path: str | Path, artifact_path: str | None = None) -> None:
    path = Path(path)
    if _active() is None or not path.exists():
        return
    import mlflow

    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)
