"""Workspaces with a tiny params.yaml, and stage runs in them through the fork server."""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml

from saelab.core.config import load_params, parse_params, to_dict

REPO = Path(__file__).resolve().parents[2]
SAMPLE = REPO / "data" / "sample" / "spanish_novels_cligs.jsonl"

# Small enough that a stage's work takes about a second on one busy core, big enough that
# every stage has several shards / checkpoints / requests to be killed between.
TINY: dict[str, dict[str, Any]] = {
    "run": {"device": "cpu", "num_threads": 1, "seed": 0},
    # 150 records reach three novels of the sample: whole works are held out (DESIGN §4).
    "data": {"max_docs": 150, "shard_docs": 10},
    "extract": {"context_len": 32, "n_tokens": 8192, "batch_tokens": 512, "shard_tokens": 1024},
    # 200 steps over a store of 16 batches: 12.5 passes, allowed explicitly.
    "sae": {"d_sae": 64, "lr": 1.0e-3, "n_tokens": 512 * 200, "batch_size": 512,
            "checkpoint_every": 20, "log_every": 20, "eval_tokens": 1024,
            "lr_warmup_steps": 10, "l0_warmup_steps": 50, "max_epochs": 12.5},
    "interpret": {"n_latents": 8, "window": 8, "n_top": 6, "n_explain": 4, "n_quantiles": 2,
                  "n_per_quantile": 2, "n_random": 4, "min_activations": 3,
                  "examples_per_prompt": 4, "concurrency": 4, "max_retries": 3,
                  "retry_base_s": 0.001, "timeout_s": 20.0},
}
# Where each stage writes (DESIGN §3): no temporary file may be left there.
OUTPUTS = {
    "extract_mlp8": ["data/activations"],
    "train_sae": ["models/sae", "reports/train"],
    "interpret": ["reports/interpret", "reports/interpret_metrics.json"],
}
SECRET_ENV = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "OPENAI_API_KEY")


def merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def tiny_params(**sections: dict) -> dict:
    """The repository's params.yaml (tiny profile) shrunk by TINY, plus `sections`."""
    base = json.loads(json.dumps(to_dict(load_params(REPO / "params.yaml"))))
    return merge(merge(base, TINY), sections)


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def tree(root: Path) -> dict[str, str]:
    """relative path -> sha256 of every file under `root` (or of `root` itself)."""
    root = Path(root)
    if root.is_file():
        return {root.name: sha256(root)}
    return {p.relative_to(root).as_posix(): sha256(p)
            for p in sorted(root.rglob("*")) if p.is_file()}


def temp_names(root: Path) -> list[str]:
    """Files whose names say they were never finished (*.tmp, .tmp*, *.partial*)."""
    root = Path(root)
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                  if ".tmp" in p.name or ".partial" in p.name or p.name.startswith(".filler"))


def without(d: dict, keys) -> dict:
    return {k: v for k, v in d.items() if k not in keys}


def _json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))


# What two runs of a stage may differ in by nature: what a resumed interpret run paid for
# (its cost block and the index page that prints it). Store and training outputs carry no
# timings, so a resumed run must match an uninterrupted one byte for byte.
def store_signature(root: Path) -> dict:
    return tree(Path(root) / "data/activations")


def train_signature(root: Path) -> dict:
    root = Path(root)
    return {"sae": tree(root / "models/sae"), "curves": tree(root / "reports/train/curves.csv"),
            "metrics": tree(root / "reports/train/metrics.json")}


def resumed_shards(run: "Run") -> int:
    """How many finished shards an extract_mlp8 run kept (its log says; 0 if it started over)."""
    found = re.search(r"resuming \S+ after (\d+) complete shard", run.stderr)
    return int(found.group(1)) if found else 0


def interpret_signature(root: Path) -> dict:
    root = Path(root)
    return {"files": without(tree(root / "reports/interpret"), ["index.html"]),
            "metrics": without(_json(root / "reports/interpret_metrics.json"), ["cost"])}


def base_env(home: Path) -> dict[str, str]:
    """A clean environment: offline, no secrets, caches under `home`."""
    env = {k: v for k, v in os.environ.items()
           if k not in SECRET_ENV and not k.startswith(("MLFLOW_", "DVC_", "PYTEST_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(home / "hf"),
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1",
               GIT_CEILING_DIRECTORIES=str(home.parent))
    return env


@dataclass
class Run:
    status: int
    stdout: str
    stderr: str
    events: dict[str, int] = field(default_factory=dict)
    note: str = ""
    network: str = ""

    @property
    def killed(self) -> bool:
        return self.status == -signal.SIGKILL

    def ok(self) -> "Run":
        assert self.status == 0, f"exit {self.status}\n{self.stderr[-6000:]}"
        return self


class ForkServer:
    """The client side of forkserver.py: one job at a time."""

    def __init__(self, env: dict[str, str], cwd: Path):
        script = Path(__file__).with_name("forkserver.py")
        self.proc = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, env=env, cwd=cwd, text=True,
                                     bufsize=1)
        assert self._read(300).get("ready"), "fork server did not start"

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"no answer from the fork server in {timeout} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fork server died (exit {self.proc.wait()})")
        return json.loads(line)

    def run(self, job: dict, timeout: float) -> int:
        self.proc.stdin.write(json.dumps(job) + "\n")
        self.proc.stdin.flush()
        pid = self._read(30)["pid"]
        try:
            return self._read(timeout)["status"]
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(30)
            raise

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Workspace:
    """A directory laid out like the repository (stages/, dvc.yaml, the sample, params.yaml)
    that the stages run in; its own mlflow.db unless a tracking URI is given."""

    def __init__(self, root: Path, server: ForkServer, env: dict[str, str]):
        self.root, self.server, self.env = Path(root), server, dict(env)
        self.runs = 0
        self.reference: Run | None = None  # the uninterrupted run, where a fixture made one

    @classmethod
    def create(cls, root: Path, server: ForkServer, env: dict[str, str],
               params: dict) -> "Workspace":
        root = Path(root)
        (root / "data" / "sample").mkdir(parents=True)
        os.symlink(REPO / "stages", root / "stages")
        os.symlink(SAMPLE, root / "data" / "sample" / SAMPLE.name)
        shutil.copy2(REPO / "dvc.yaml", root / "dvc.yaml")
        ws = cls(root, server, env)
        ws.write_params(params)
        return ws

    def clone(self, root: Path, *inputs: str, env: dict[str, str] | None = None) -> "Workspace":
        """A new workspace with this one's params and hard links to its `inputs`."""
        ws = Workspace.create(root, self.server, env or self.env, self.params())
        ws.link(self, *inputs)
        return ws

    def link(self, other: "Workspace", *inputs: str) -> None:
        """Hard links to `other`'s files: the stages replace files, never write into them,
        so an input shared this way cannot be changed by a run here."""
        for rel in inputs:
            src, dst = other.root / rel, self.root / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, copy_function=os.link)
            else:
                os.link(src, dst)

    def params(self) -> dict:
        return json.loads(json.dumps(to_dict(load_params(self.root / "params.yaml"))))

    def write_params(self, params: dict, validate: bool = True) -> None:
        if validate:
            parse_params(params)
        (self.root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False),
                                               encoding="utf-8")

    def update_params(self, **sections: dict) -> None:
        self.write_params(merge(self.params(), sections))

    def run(self, stage: str, *, env: dict[str, str] | None = None, events=(),
            fault: dict | None = None, no_network: bool = False, timeout: float = 180) -> Run:
        self.runs += 1
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        stem = logs / f"{self.runs:02d}-{stage}"
        job = {"script": f"stages/{stage}.py", "cwd": str(self.root),
               "env": {**self.env, **(env or {})},
               "stdout": f"{stem}.out", "stderr": f"{stem}.err",
               "events": list(events), "fault": fault,
               "events_file": f"{stem}.events.json", "note_file": f"{stem}.note",
               "net_file": f"{stem}.net" if no_network else None}
        job["env"] = {k: v for k, v in job["env"].items() if v is not None}
        status = self.server.run(job, timeout)
        return Run(status, _read(job["stdout"]), _read(job["stderr"]),
                   json.loads(_read(job["events_file"]) or "{}"), _read(job["note_file"]),
                   _read(job["net_file"]) if no_network else "")


def _read(path: str | None) -> str:
    return Path(path).read_text(errors="replace") if path and Path(path).exists() else ""


def _mount(*args: str) -> None:
    out = subprocess.run(["mount", *args], capture_output=True, text=True)
    if out.returncode:
        reason = f"cannot mount here ({out.stderr.strip()}); needs root with CAP_SYS_ADMIN"
        if os.environ.get("CI"):
            pytest.fail(reason)  # CI runs as root: a skip there would hide a lost check
        pytest.skip(reason)


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A small file system of `size` mounted at `path` for the duration."""
    path.mkdir(parents=True, exist_ok=True)
    _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path))
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` read-only for everyone: a read-only bind mount as root (root ignores file
    modes), chmod otherwise."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        mode = path.stat().st_mode
        path.chmod(0o555)
        try:
            yield path
        finally:
            path.chmod(mode)
        return
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=True)
