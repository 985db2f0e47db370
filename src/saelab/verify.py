"""`saelab verify`: check the activation store and the exported SAE, naming every problem.

The store is checked by `ActivationStore.verify` (manifest.json's seal, sha256 and size of
every file against it, shapes, dtype, NaN/Inf, token-id range), the SAE export by
`sae.export_check.sae_problems` (the same checks its reader makes). A missing or
unreadable file is a problem line, never a traceback; so are the temp files a killed
writer left.
"""
from __future__ import annotations

from pathlib import Path

from .core.errors import SaelabError


def verify_all(store_dir: Path, sae_dir: Path) -> list[str]:
    """Problems of the store in `store_dir` and the SAE in `sae_dir`; [] when both are sound."""
    return verify_store(Path(store_dir)) + verify_sae(Path(sae_dir))


def verify_store(store_dir: Path) -> list[str]:
    from .activations.store import ActivationStore

    where = f"activation store {store_dir}"
    if not store_dir.is_dir():
        return [f"{where}: missing; run `dvc repro extract_mlp8` (or `dvc pull`)"]
    leftovers = [f"{where}: {name}: left by an interrupted run"
                 for name in _temp_files(store_dir)]
    try:
        problems = ActivationStore(store_dir).verify()
    except SaelabError as e:
        return [str(e)] + leftovers
    except (KeyError, TypeError, ValueError) as e:
        return [f"{where}: manifest.json is malformed ({type(e).__name__}: {e}); "
                "rerun `dvc repro extract_mlp8`"] + leftovers
    return [f"{where}: {p}" for p in problems] + leftovers


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def verify_sae(sae_dir: Path) -> list[str]:
    from .sae.export_check import sae_problems

    where = f"SAE {sae_dir}"
    if not sae_dir.is_dir():
        return [f"{where}: missing; run `dvc repro train_sae` (or `dvc pull`)"]
    problems = sae_problems(sae_dir)
    problems += [f"{name}: left by an interrupted run" for name in _temp_files(sae_dir)]
    return [f"{where}: {p}" for p in problems]
