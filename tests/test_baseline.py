"""`saelab baseline` (the end of `make run`): commits dvc.lock and the outputs DVC leaves to
git, so queued experiments start from a commit that records the store."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from saelab.core.baseline import commit_baseline
from saelab.core.errors import SaelabError

REPO = Path(__file__).resolve().parents[1]
DVC_YAML = """stages:
  make:
    cmd: python make.py
    deps: [make.py]
    outs: [big]
    metrics:
      - m.json:
          cache: false
"""
MAKE = "import json, pathlib\npathlib.Path('big').write_text('x')\n" \
       "pathlib.Path('m.json').write_text(json.dumps({'v': 1}))\n"


def _run(cmd, cwd):
    env = {**os.environ, "DVC_NO_ANALYTICS": "true", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@example.com", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@example.com",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    for k, v in {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@example.com",
                 "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@example.com"}.items():
        monkeypatch.setenv(k, v)
    _run(["git", "init", "-q", "-b", "main"], tmp_path)
    _run(["dvc", "init", "-q"], tmp_path)
    (tmp_path / "dvc.yaml").write_text(DVC_YAML)
    (tmp_path / "make.py").write_text(MAKE)
    _run(["git", "add", "-A"], tmp_path)
    _run(["git", "commit", "-qm", "init"], tmp_path)
    return tmp_path


def test_make_run_ends_with_the_baseline():
    recipe = re.search(r"^run:.*\n((?:\t.*\n)+)", (REPO / "Makefile").read_text(), re.M)[1]
    lines = [line.strip() for line in recipe.splitlines()]
    assert lines[0].endswith("dvc repro") and lines[-1].endswith("saelab baseline")


def test_baseline_commits_the_lock_and_git_tracked_outputs(repo):
    with pytest.raises(SaelabError, match=r"not up to date \(make\).*dvc repro"):
        commit_baseline(repo)
    _run(["dvc", "repro"], repo)
    sha = commit_baseline(repo)
    assert sha and _run(["git", "rev-parse", "--short", "HEAD"], repo).strip() == sha
    committed = set(_run(["git", "show", "--name-only", "--format=", "HEAD"], repo).split())
    assert committed == {"dvc.lock", "m.json", ".gitignore"}  # `big` is in the DVC cache
    assert _run(["git", "status", "--porcelain"], repo) == ""
    assert commit_baseline(repo) is None  # HEAD has it already


def test_baseline_refuses_with_other_uncommitted_changes(repo):
    _run(["dvc", "repro"], repo)
    (repo / "notes.txt").write_text("a")
    _run(["git", "add", "notes.txt"], repo)
    with pytest.raises(SaelabError, match=r"uncommitted changes to notes\.txt"):
        commit_baseline(repo)
