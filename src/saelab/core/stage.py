"""Shared body of every stage entry point: params, logging, one MLflow run, clean errors."""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
from typing import Callable

from . import metrics
from .config import ConfigError, Params, load_params
from .errors import SaelabError
from .runtime import setup_logging, setup_threads
from .tracking import stage_run

log = logging.getLogger("saelab")


def run_stage(stage: str, body: Callable[[Params], None], params_path: str = "params.yaml") -> None:
    """Run `body(params)` inside the stage's MLflow run; user errors exit 2 with one clear line."""
    setup_logging()
    try:
        params = load_params(params_path)
        setup_threads(params)
        # Under torchrun only rank 0 records the run; the others just compute.
        rank0 = int(os.environ.get("RANK", "0")) == 0
        with stage_run(stage, params) if rank0 else contextlib.nullcontext():
            body(params)
            if rank0:
                metrics.write_views(stage)
    except (ConfigError, SaelabError) as e:
        log.error("%s failed: %s", stage, e)
        sys.exit(2)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            log.error("%s failed: the disk is full writing %s. Free space or point the output "
                      "elsewhere, then rerun; finished shards/checkpoints are kept.",
                      stage, e.filename or "the output")
            sys.exit(3)
        if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            log.error("%s failed: cannot write %s (%s). Make it writable (permissions, "
                      "read-only mounts), then rerun; finished shards/checkpoints are kept.",
                      stage, e.filename or "the output", e.strerror)
            sys.exit(4)
        raise
