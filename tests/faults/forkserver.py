"""A fork server for the fault suite: stage runs without paying the imports each time.

One interpreter imports torch, transformers, mlflow, openai and saelab once (10-20 s on a
busy CPU), then runs each job in a fresh fork: `stages/<name>.py` executed as __main__ by
runpy, in the job's directory, with the job's environment and its stdout/stderr in files,
exactly as `python stages/<name>.py` would run it (an exception that escapes prints the
interpreter's traceback and exits 1). The fork is a real, separate process: SIGKILL ends
it at once, with no cleanup.

Fault injection (what a job may ask for, all inside the child):
- `events`: wrap the named functions (see EVENTS) and count their calls; the counts are
  written to `events_file` when the run ends normally.
- `fault`: at the n-th call of one event, before or after it runs, either SIGKILL the
  process (`kill`) or fill the file system holding `path` with a filler file (`fill`,
  another writer taking the last free byte).
- `no_network`: an audit hook records every socket connect / DNS lookup in `net_file`.

Protocol on stdin/stdout, one JSON object per line: job in; `{"pid": ...}`, then
`{"status": ...}` (exit code, or -signal) out.
"""
from __future__ import annotations

import importlib
import json
import os
import runpy
import signal
import sys
import threading
import traceback

# saelab first: what it sets up at import (environment defaults) must precede the
# libraries' own import-time decisions, as in a fresh `python stages/<name>.py`.
PRELOAD = ("saelab.core.stage", "saelab.data.base_model", "saelab.data.corpus", "saelab.activations.extract",
           "saelab.sae.train", "saelab.interpret.stage", "torch", "numpy", "pyarrow.parquet",
           "datasets", "transformers", "safetensors.torch", "mlflow",
           "mlflow.store.tracking.sqlalchemy_store", "openai", "tqdm")

# event name -> (module, attribute path of the function to wrap)
EVENTS = {
    "replace": ("os", "replace"),
    "fsync": ("os", "fsync"),
    "npy_put": ("saelab.activations.store", "NpyStream._put"),
    "json_write": ("saelab.activations.store", "_write_json"),
    "step": ("saelab.sae.train", "lr_factor"),
    "torch_save": ("torch", "save"),
    "safetensors_save": ("saelab.sae.autoencoder", "save_file"),
    "cache_put": ("saelab.interpret.cache", "ResponseCache.put"),
    "write_text": ("pathlib", "Path.write_text"),
}


def _fill(path: str) -> None:
    """Take every free byte of the file system holding `path`."""
    with open(os.path.join(path, ".filler"), "wb", buffering=0) as f:
        block = b"\0" * (1 << 16)
        try:
            while True:
                f.write(block)
        except OSError:
            pass
        try:
            while True:
                f.write(b"\0")
        except OSError:
            pass


class _Faults:
    def __init__(self, job: dict):
        self.counts: dict[str, int] = {}
        self.fault = job.get("fault")
        self.lock = threading.Lock()
        self.note = job.get("note_file")
        for name in set(job.get("events", [])) | ({self.fault["event"]} if self.fault else set()):
            self._wrap(name)

    def _wrap(self, name: str) -> None:
        module, attr = EVENTS[name]
        owner = importlib.import_module(module)
        *path, last = attr.split(".")
        for part in path:
            owner = getattr(owner, part)
        orig = getattr(owner, last)
        faults = self

        def wrapper(*args, **kwargs):
            n = faults.hit(name, "before")
            out = orig(*args, **kwargs)
            faults.hit(name, "after", n)
            return out

        setattr(owner, last, wrapper)

    def hit(self, name: str, when: str, n: int = 0) -> int:
        """Count a call (`before`; returns its ordinal) or its end (`after` call `n`: other
        threads may have started later calls meanwhile); fault when it is the chosen one."""
        with self.lock:
            if when == "before":
                n = self.counts[name] = self.counts.get(name, 0) + 1
            f = self.fault
            if not f or (f["event"], f["n"], f["when"]) != (name, n, when):
                return n
            self.fault = None  # once
            if self.note:
                with open(self.note, "w") as fh:
                    fh.write(f"{f['action']} {when} {name} #{n}\n")
            if f["action"] == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            _fill(f["path"])
            return n


def _no_network(net_file: str) -> None:
    watched = ("socket.connect", "socket.getaddrinfo", "socket.gethostbyname")

    def hook(event, args):
        if event in watched:
            with open(net_file, "a") as fh:
                fh.write(f"{event} {args!r}\n")

    sys.addaudithook(hook)


def _child(job: dict) -> None:
    code = 1
    try:
        os.chdir(job["cwd"])
        os.environ.clear()
        os.environ.update(job["env"])
        for fd, name in ((1, "stdout"), (2, "stderr")):
            out = os.open(job[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(out, fd)
            os.close(out)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        faults = _Faults(job)
        if job.get("net_file"):
            _no_network(job["net_file"])
        script = job["script"]
        sys.argv = [script]
        sys.path[0] = os.path.dirname(os.path.abspath(script))
        try:
            runpy.run_path(script, run_name="__main__")
            code = 0
        except SystemExit as e:
            if e.code is None or isinstance(e.code, int):
                code = e.code or 0
            else:
                print(e.code, file=sys.stderr)
                code = 1
        except BaseException:
            traceback.print_exc()
            code = 1
        if job.get("events_file"):
            with open(job["events_file"], "w") as fh:
                json.dump(faults.counts, fh)
    except BaseException:
        traceback.print_exc()
    finally:
        import atexit

        atexit._run_exitfuncs()  # as the interpreter does at exit (logging, mlflow, ...)
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass
        os._exit(code)


def main() -> None:
    for name in PRELOAD:
        importlib.import_module(name)
    # transformers resolves these lazily; resolve them before forking, once.
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM  # noqa: F401

    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        job = json.loads(line)
        pid = os.fork()
        if pid == 0:
            _child(job)
        print(json.dumps({"pid": pid}), flush=True)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": os.waitstatus_to_exitcode(status)}), flush=True)


if __name__ == "__main__":
    main()
