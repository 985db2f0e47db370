"""MLflow bookkeeping: what `mlflow ui` shows for this repository.

- One experiment, `saelab`, tagged `mlflow.experimentKind = custom_model_development`:
  MLflow 3 opens an experiment without a kind in its GenAI view (traces, prompts).
- One parent run per DVC invocation: a `dvc repro`, a `dvc exp run`, each experiment of a
  queue. DVC runs every stage as its own process, so the stages find their common parent
  by a run-group key (`saelab.run_group`): the DVC process that launched them (the nearest
  ancestor process whose environment lacks DVC_STAGE, which DVC sets for stage commands
  only) and the DVC experiment name. `SAELAB_RUN_GROUP` replaces the process part (a
  scheduler that runs stage commands itself). A stage run outside DVC (`python
  stages/x.py`, `saelab pareto`) has no parent.
- One run per stage execution, nested under that parent, tagged `dvc.stage`,
  `dvc.exp_name`, `dvc.baseline_rev`, the git commit and the profile; nested runs inside a
  stage (the scaling pilots) carry the same tags. A stage run logs only the params its
  dvc.yaml stage declares. A null param means "derived at run time" and is not logged as
  null: the code that derives it logs the value used under the same key (sae.lr).
- System metrics (CPU, memory, disk, network; NVIDIA GPUs through nvidia-ml-py) every
  SYSTEM_METRICS_INTERVAL_S seconds (`MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL` overrides).
- The corpus and the activation store a stage reads (its dvc.yaml deps) are its dataset
  inputs, with their fingerprints as digests.

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
import hashlib
import json
import logging
import os
import re
import socket
import subprocess
from pathlib import Path
from typing import Any, Iterator

import yaml
from filelock import FileLock

from . import paths
from .config import Params, flatten, to_dict

log = logging.getLogger(__name__)

EXPERIMENT = "saelab"
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}
RUN_GROUP_TAG = "saelab.run_group"
# MLflow samples every 10 s by default and logs nothing for a run shorter than one
# interval: 5 s still covers the tiny profile's stages at ~0.2 row/s per metric.
SYSTEM_METRICS_INTERVAL_S = 5
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


def _store_lock() -> contextlib.AbstractContextManager:
    """Serialises first-time set-up on a sqlite store: parallel queue workers that each
    create the database (or the experiment, or a parent run) race otherwise."""
    uri = tracking_uri()
    if not uri.startswith("sqlite:///"):
        return contextlib.nullcontext()
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(db) + ".lock")


def setup() -> str:
    """Point MLflow at the project store, make sure the experiment exists with its kind,
    and make it the active one; returns the experiment id."""
    mlflow = _mlflow()
    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    with _store_lock():
        exp = mlflow.get_experiment_by_name(EXPERIMENT)
        if exp is None:
            artifacts = (repo_root() / "mlartifacts").as_uri() if uri.startswith("sqlite:") \
                else None
            try:
                mlflow.create_experiment(EXPERIMENT, artifact_location=artifacts,
                                         tags=EXPERIMENT_KIND)
            except mlflow.exceptions.MlflowException:
                pass  # created by a concurrent worker between the check and the call
            exp = mlflow.get_experiment_by_name(EXPERIMENT)
        # A store made before the kind was set (an older checkout's mlflow.db) gets it now.
        for key, value in EXPERIMENT_KIND.items():
            if exp.tags.get(key) != value:
                mlflow.MlflowClient().set_experiment_tag(exp.experiment_id, key, value)
        mlflow.set_experiment(experiment_id=exp.experiment_id)
    return exp.experiment_id


def stage_tags(stage: str, params: Params) -> dict[str, str]:
    return {**_dvc_tags(params), "dvc.stage": stage, "mlflow.source.name": f"stages/{stage}.py"}


def _dvc_tags(params: Params) -> dict[str, str]:
    """What ties a run to DVC and git: shared by the parent run and its stage runs."""
    return {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", ""),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", ""),
        "git.commit": _git_commit(Path.cwd()) or _git_commit(repo_root()),
        "profile": params.profile,
    }


def _clean_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow param values: secrets scrubbed, cut to MLflow's length limit."""
    return {k: str(scrub(v))[:_MAX_PARAM_LEN] for k, v in params.items()}


# --- what a stage declares in dvc.yaml -------------------------------------------------

def _dvc_stage(stage: str) -> dict[str, Any] | None:
    """The stage's entry in ./dvc.yaml (stages run from the repository, or experiment
    copy, that holds it), or None: no dvc.yaml, or a command that is not a DVC stage."""
    try:
        doc = yaml.safe_load(Path("dvc.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return None
    entry = ((doc or {}).get("stages") or {}).get(stage) if isinstance(doc, dict) else None
    return entry if isinstance(entry, dict) else None


def _declared_params(entry: dict[str, Any]) -> list[str]:
    """The params.yaml keys (or whole sections) a dvc.yaml stage lists under `params:`."""
    keys: list[str] = []
    for item in entry.get("params") or []:
        if isinstance(item, str):
            keys.append(item)
        elif isinstance(item, dict):  # the long form, {params.yaml: [keys]}
            keys += [k for f, ks in item.items() if Path(f).name == "params.yaml"
                     for k in (ks or [])]
    return keys


def stage_params(entry: dict[str, Any] | None, params: Params) -> dict[str, Any]:
    """The params a stage's run logs: those its dvc.yaml `entry` declares (every param for
    a command outside dvc.yaml, entry None), less the nulls (derived values, logged by
    their deriver)."""
    flat = flatten(to_dict(params))
    if entry is not None:
        keys = _declared_params(entry)
        flat = {k: v for k, v in flat.items()
                if any(k == p or k.startswith(p + ".") for p in keys)}
    return {k: v for k, v in flat.items() if v is not None}


def _dataset_inputs(entry: dict[str, Any]) -> list[tuple[Any, dict[str, str]]]:
    """(dataset, tags) for the corpus and activation store among a stage's deps.

    Digests are fingerprints cut to MLflow's 36-character limit; the whole one is a tag.
    The store's is its resume fingerprint (model, corpus, extract config); the corpus's is
    the sha256 of its manifest, the identity the store records for it.
    """
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    deps = {Path(d).as_posix() for d in entry.get("deps") or [] if isinstance(d, str)}
    out = []
    for directory in (paths.CORPUS_DIR, paths.ACTIVATIONS_DIR):
        manifest = directory / "manifest.json"
        if directory.as_posix() not in deps or not manifest.is_file():
            continue
        raw = manifest.read_bytes()
        m = json.loads(raw)
        if directory == paths.ACTIVATIONS_DIR:
            fp = m.get("fingerprint")
            if not fp:  # not a finished store: the stage's own check names the problem
                continue
            name = f"{m.get('model')} layer {m.get('layer')} {m.get('hook')} activations"
            tags = {"saelab.tokens": str(m.get("n_tokens")), "saelab.d": str(m.get("d")),
                    "saelab.dtype": str(m.get("dtype"))}
        else:
            fp = hashlib.sha256(raw).hexdigest()
            name = f"{m.get('source')} corpus"
            tags = {"saelab.docs": json.dumps(m.get("docs")),
                    "saelab.tokens_estimate": json.dumps(m.get("tokens_estimate"))}
        source = LocalArtifactDatasetSource(str((repo_root() / directory).resolve()))
        out.append((MetaDataset(source, name=name, digest=fp[:32]),
                    {"saelab.fingerprint": fp, **tags}))
    return out


# --- one parent run per DVC invocation -------------------------------------------------

def _dvc_process() -> str | None:
    """host:pid:start-time of the DVC process running this stage, or None (not under DVC).

    DVC puts DVC_STAGE in its stage commands' environment only, so the nearest ancestor
    without it is DVC itself, through any shell or torchrun between.
    """
    if "DVC_STAGE" not in os.environ:
        return None
    import psutil

    try:
        for proc in psutil.Process().parents():
            if "DVC_STAGE" not in proc.environ():
                return f"{socket.gethostname()}:{proc.pid}:{proc.create_time():.2f}"
    except psutil.Error as e:
        log.warning("cannot read the process tree (%s): this stage run has no parent run", e)
    return None


def run_group() -> str | None:
    """The key the stage runs of one DVC invocation share, or None (no parent run)."""
    invocation = os.environ.get("SAELAB_RUN_GROUP") or _dvc_process()
    if not invocation:
        return None
    exp = os.environ.get("DVC_EXP_NAME", "")
    # A quote would end the search filter's string literal that finds the parent.
    return (f"{invocation}|{exp}" if exp else invocation).replace("'", "_")


def _parent_run(client, experiment_id: str, group: str, params: Params) -> str:
    """The parent run of this run group: found by its tag, else created."""
    found = client.search_runs([experiment_id], max_results=1,
                               filter_string=f"tags.`{RUN_GROUP_TAG}` = '{group}'")
    if found:
        return found[0].info.run_id
    tags = _dvc_tags(params)
    exp = tags["dvc.exp_name"]
    name = exp or f"repro {tags['git.commit'][:7] or 'no-git'}"
    tags.update({RUN_GROUP_TAG: group,
                 "mlflow.source.name": "dvc exp run" if exp else "dvc repro",
                 "mlflow.note.content": "One DVC run of the pipeline: the runs of the stages "
                                        "it executed are nested under this one."})
    return client.create_run(experiment_id, run_name=name, tags=tags).info.run_id


_stage_tags: dict[str, str] = {}  # the running stage's tags, for the runs nested in it


@contextlib.contextmanager
def stage_run(stage: str, params: Params, run_name: str | None = None) -> Iterator[Any]:
    """One MLflow run for one stage execution, nested under its DVC invocation's parent
    run; logs the stage's params, its dataset inputs and system metrics."""
    global _stage_tags
    if not enabled():
        log.warning("SAELAB_TRACKING=off: this %s run is not recorded in MLflow", stage)
        yield None
        return
    mlflow = _mlflow()
    experiment_id = setup()
    client = mlflow.MlflowClient()
    group = run_group()
    parent = None
    if group:
        with _store_lock():
            parent = _parent_run(client, experiment_id, group, params)
        client.update_run(parent, status="RUNNING")
    exp = os.environ.get("DVC_EXP_NAME", "")
    name = run_name or (f"{stage}:{exp}" if exp else stage)
    tags = stage_tags(stage, params)
    entry = _dvc_stage(stage)
    # The stage's run samples the machine (its nested runs do not): on unless the user
    # turned it off with MLflow's own switch.
    system_metrics = os.environ.get("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "true").strip() \
        .lower() in ("true", "1")
    os.environ.setdefault("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL",
                          str(SYSTEM_METRICS_INTERVAL_S))
    status = "FAILED"
    try:
        with mlflow.start_run(run_name=name, tags=tags, parent_run_id=parent,
                              log_system_metrics=system_metrics) as run:
            mlflow.log_params(_clean_params(stage_params(entry, params)))
            # The context names the stage that read the dataset.
            for dataset, input_tags in _dataset_inputs(entry) if entry else []:
                mlflow.log_input(dataset, context=stage, tags=input_tags)
            _stage_tags = tags
            try:
                yield run
            finally:
                _stage_tags = {}
        status = "FINISHED"
    finally:
        if parent:
            # The parent's status and end time follow its latest stage: a failed stage
            # leaves it FAILED, the last one to finish closes it.
            client.set_terminated(parent, status=status)


@contextlib.contextmanager
def nested_run(name: str, params: dict[str, Any], tags: dict[str, str] | None = None):
    """A run nested in the active (stage) run, tagged like its stage plus `tags`."""
    if not enabled():
        yield None
        return
    import mlflow

    with mlflow.start_run(run_name=name, nested=True, tags={**_stage_tags, **(tags or {})},
                          log_system_metrics=False) as run:
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
