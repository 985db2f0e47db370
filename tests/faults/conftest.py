"""Session fixtures of the fault suite: a fork server, a fake OpenAI server, and the
reference (uninterrupted) runs of extract_mlp8, train_sae and interpret in tiny workspaces."""
from __future__ import annotations

import importlib.util
import json
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from .harness import REPO, ForkServer, Workspace, base_env, tiny_params

sys.path.insert(0, str(REPO / "tests" / "interpret"))
from fake_openai import FakeOpenAI, body_hash  # noqa: E402


def _interpret_helpers():
    """tests/interpret/conftest.py, for its answer-giving responder (not its fixtures)."""
    spec = importlib.util.spec_from_file_location("_interpret_conftest",
                                                  REPO / "tests" / "interpret" / "conftest.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


labelling_responder = _interpret_helpers().labelling_responder

OPENAI_KEY = "sk-faults-Secret0123456789"
EXTRACT_EVENTS = ("npy_put", "replace", "json_write")
TRAIN_EVENTS = ("step", "torch_save", "fsync", "replace", "safetensors_save", "write_text")
INTERPRET_EVENTS = ("cache_put", "replace", "write_text")


class CountingServer(FakeOpenAI):
    """The test OpenAI server, counting only answers it could deliver.

    A client killed while its request waits in `delay` is gone when the answer is due: such
    a request is not answered (so not paid), as a real API stops work for a closed
    connection only at best; counting it would blame the client for the server's choice.
    `delivered` maps each answer's id to its request, to tell which answers a killed
    client had cached. `inject(body, attempt)` returns an error status to inject, or None.
    """

    def __init__(self, responder):
        self._local = threading.local()
        self.auth: set[str | None] = set()  # Authorization headers seen
        super().__init__(responder)
        self.delivered: dict[str, str] = {}
        self.inject = lambda body, attempt: None
        self.fail = self._fail

    def _handler(self):
        base, local, auth = super()._handler(), self._local, self.auth

        class Handler(base):
            def do_POST(self):
                local.conn = self.connection
                auth.add(self.headers.get("Authorization"))
                super().do_POST()

        return Handler

    def _client_gone(self) -> bool:
        conn = getattr(self._local, "conn", None)
        try:
            return conn is not None and conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except BlockingIOError:
            return False
        except OSError:
            return True

    def _fail(self, body: dict, attempt: int):
        return 499 if self._client_gone() else self.inject(body, attempt)

    def settle(self, timeout: float = 10.0) -> None:
        """Wait until no request is being served (a killed client's may still be)."""
        deadline = time.monotonic() + timeout
        while self.in_flight and time.monotonic() < deadline:
            time.sleep(0.01)

    def complete(self, body: dict) -> dict:
        out = super().complete(body)
        with self._lock:
            self.delivered[out["id"]] = body_hash(body)
        return out


@pytest.fixture(scope="session")
def faults_home(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("faults")


@pytest.fixture(scope="session")
def stage_env(faults_home) -> dict[str, str]:
    """Stage runs share one MLflow database (created once: migrations cost seconds)."""
    return {**base_env(faults_home), "OPENAI_API_KEY": OPENAI_KEY,
            "MLFLOW_TRACKING_URI": f"sqlite:///{faults_home / 'mlflow.db'}"}


@pytest.fixture(scope="session")
def forkserver(faults_home, stage_env):
    server = ForkServer(stage_env, faults_home)
    yield server
    server.close()


@pytest.fixture(scope="session")
def openai_server():
    with CountingServer(labelling_responder()) as server:
        # Slow answers: a kill finds requests in flight.
        server.delay = lambda body, attempt: 0.02
        yield server


@pytest.fixture(scope="session")
def base(faults_home, forkserver, stage_env, openai_server) -> Workspace:
    """Model, corpus and the reference activation store."""
    ws = Workspace.create(faults_home / "base", forkserver, stage_env, tiny_params(
        interpret={"backend": "openai", "base_url": openai_server.base_url}))
    ws.run("fetch_model").ok()
    ws.run("fetch_oscar").ok()
    ws.reference = ws.run("extract_mlp8", events=EXTRACT_EVENTS).ok()
    return ws


@pytest.fixture(scope="session")
def trained(base, faults_home) -> Workspace:
    """The reference SAE, trained from the store alone (no model: no LM evaluation, fast)."""
    ws = base.clone(faults_home / "train", "data/activations")
    ws.reference = ws.run("train_sae", events=TRAIN_EVENTS).ok()
    return ws


@pytest.fixture(scope="session")
def interpreted(base, trained, faults_home, openai_server) -> Workspace:
    """The reference interpret run against the fake server; `paid` is what it paid for."""
    ws = interpret_workspace(base, trained, faults_home / "interpret")
    before = openai_server.paid.copy()
    ws.reference = ws.run("interpret", events=INTERPRET_EVENTS).ok()
    ws.paid = openai_server.paid - before
    assert ws.paid and max(ws.paid.values()) == 1
    return ws


def interpret_workspace(base: Workspace, trained: Workspace, root: Path,
                        env: dict[str, str] | None = None) -> Workspace:
    """What interpret reads: the tokenizer (models/base), the store and the SAE."""
    ws = base.clone(root, "models/base", "models/base.json", "data/activations", env=env)
    ws.link(trained, "models/sae")
    return ws


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text(encoding="utf-8"))
