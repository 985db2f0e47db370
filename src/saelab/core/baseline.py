"""`saelab baseline`: commit a reproduced pipeline (the end of `make run`).

`dvc exp run --queue` runs each experiment in a copy made from a git commit, and takes
the model, corpus and activation store from the DVC cache only when that commit's dvc.lock
records them; `dvc exp show` and `dvc plots diff` compare experiments with it too. So a
sweep needs dvc.lock and the git-tracked outputs (metrics, plot tables, reports)
committed; otherwise every queued experiment rebuilds everything, extraction included.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from .errors import SaelabError

MESSAGE = "saelab baseline: dvc.lock and the pipeline's git-tracked outputs"


def _git(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True)


def tracked_outputs(root: Path) -> list[str]:
    """dvc.lock, each output DVC leaves to git (cache: false), and the .gitignore files DVC
    writes for the cached ones."""
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        stale = repo.status()
        if stale:
            names = sorted(name.rsplit(":", 1)[-1] for name in stale)  # path/dvc.yaml:stage
            raise SaelabError(f"the pipeline is not up to date ({', '.join(names)}); "
                              "run `dvc repro` first")
        outs = [o for stage in repo.index.stages for o in stage.outs]
    rels = ["dvc.lock", *(o.def_path for o in outs if not o.use_cache)]
    ignores = {str(Path(o.def_path).parent / ".gitignore") for o in outs if o.use_cache}
    return rels + sorted(p for p in ignores if (root / p).is_file())


def commit_baseline(root: Path = Path("."), message: str = MESSAGE) -> str | None:
    """Commit the reproduced pipeline; the new commit's sha, or None when HEAD has it already.
    Refuses when other tracked files have uncommitted changes: dvc.lock would then describe
    code or params the commit does not hold, and experiments would rerun everything."""
    root = Path(root).resolve()
    if _git(root, "rev-parse", "--git-dir").returncode != 0:
        raise SaelabError(f"{root} is not a git repository; DVC experiments need one "
                          "(clone the project with git)")
    rels = tracked_outputs(root)
    changed = [line[3:] for line in _git(root, "status", "--porcelain",
                                          "--untracked-files=no").stdout.splitlines()]
    others = sorted(set(changed) - set(rels))
    if others:
        raise SaelabError(f"uncommitted changes to {', '.join(others[:5])}"
                          f"{' and more' if len(others) > 5 else ''}: commit them (or stash) "
                          "first, so the baseline's dvc.lock matches the code and params it "
                          "was made from; then run `saelab baseline`")
    add = _git(root, "add", "--", *rels)
    if add.returncode != 0:
        raise SaelabError(f"git add failed: {add.stderr.strip().splitlines()[-1:]}")
    if _git(root, "diff", "--cached", "--quiet", "--", *rels).returncode == 0:
        return None
    done = _git(root, "commit", "-q", "-m", message, "--", *rels)
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip()).splitlines()[-1:]
        raise SaelabError(f"git commit failed: {' '.join(last)} (a fresh machine needs "
                          "`git config user.name ...` and `git config user.email ...`)")
    return _git(root, "rev-parse", "--short", "HEAD").stdout.strip()
