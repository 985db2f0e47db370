"""`saelab verify`: check the activation store and the exported SAE, naming every problem.

The store is checked by `ActivationStore.verify` (sha256 and size of every file against
manifest.json, shapes, dtype, NaN/Inf, token-id range). The SAE export (SAELens layout:
cfg.json + sae_weights.safetensors) is checked here: the tensors the architecture needs,
their shapes against cfg's d_in / d_sae, their dtype against cfg's dtype, finiteness, and,
when the export carries a manifest.json, each file's size and sha256 against it.
A missing or unreadable file is a problem line, never a traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .core.errors import SaelabError
from .sae.autoencoder import MANIFEST_FILE

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


def verify_all(store_dir: Path, sae_dir: Path) -> list[str]:
    """Problems of the store in `store_dir` and the SAE in `sae_dir`; [] when both are sound."""
    return verify_store(Path(store_dir)) + verify_sae(Path(sae_dir))


def verify_store(store_dir: Path) -> list[str]:
    from .activations.store import ActivationStore

    where = f"activation store {store_dir}"
    if not store_dir.is_dir():
        return [f"{where}: missing; run `dvc repro extract_mlp8` (or `dvc pull`)"]
    try:
        problems = ActivationStore(store_dir).verify()
    except SaelabError as e:
        return [str(e)]
    except (KeyError, TypeError, ValueError) as e:
        return [f"{where}: manifest.json is malformed ({type(e).__name__}: {e}); "
                "rerun `dvc repro extract_mlp8`"]
    problems += [f"{name}: left by an interrupted run" for name in _temp_files(store_dir)]
    return [f"{where}: {p}" for p in problems]


def _temp_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".tmp" in p.name)


def _expected_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    shapes = {"W_enc": (d_in, d_sae), "W_dec": (d_sae, d_in), "b_enc": (d_sae,),
              "b_dec": (d_in,)}
    if cfg.get("architecture") == "jumprelu":
        shapes["threshold"] = (d_sae,)
    return shapes


def _read_cfg(path: Path) -> tuple[dict[str, Any] | None, list[str]]:
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, [f"{path.name}: unreadable ({e})"]
    if not isinstance(cfg, dict):
        return None, [f"{path.name}: not a JSON object"]
    problems = []
    for key in ("d_in", "d_sae"):
        v = cfg.get(key)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            problems.append(f"{path.name}: {key} = {v!r}, expected a positive integer")
    if cfg.get("architecture") not in ("jumprelu", "topk"):
        problems.append(f"{path.name}: architecture = {cfg.get('architecture')!r}, "
                        "expected jumprelu or topk")
    if cfg.get("dtype", "float32") not in _SAFETENSORS_DTYPES:
        problems.append(f"{path.name}: dtype = {cfg.get('dtype')!r} is not a float dtype")
    return (None if problems else cfg), problems


def _check_tensors(path: Path, cfg: dict[str, Any]) -> list[str]:
    from safetensors import SafetensorError, safe_open

    name = path.name
    problems: list[str] = []
    want = _expected_shapes(cfg)
    want_dtype = _SAFETENSORS_DTYPES[cfg.get("dtype", "float32")]
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            for key in sorted(keys - set(want)):
                problems.append(f"{name}: unexpected tensor {key}")
            for key, shape in want.items():
                if key not in keys:
                    problems.append(f"{name}: tensor {key} missing")
                    continue
                sl = f.get_slice(key)
                got_shape, got_dtype = tuple(sl.get_shape()), sl.get_dtype()
                if got_shape != shape:
                    problems.append(f"{name}: {key} has shape {got_shape}, cfg.json's "
                                    f"d_in/d_sae give {shape}")
                if got_dtype != want_dtype:
                    problems.append(f"{name}: {key} is {got_dtype}, cfg.json says "
                                    f"{cfg.get('dtype', 'float32')}")
                if got_shape == shape:
                    t = f.get_tensor(key)
                    bad = int((~t.float().isfinite()).sum())
                    if bad:
                        problems.append(f"{name}: {key} holds {bad} NaN/Inf value(s)")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        problems.append(f"{name}: unreadable ({e})")
    return problems


def _check_manifest(sae_dir: Path) -> list[str]:
    from .activations.store import file_problem

    path = sae_dir / MANIFEST_FILE
    try:
        files = json.loads(path.read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return [f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})"]
    problems = [file_problem(sae_dir / name, entry, MANIFEST_FILE)
                for name, entry in sorted(files.items())]
    return [p for p in problems if p]


def verify_sae(sae_dir: Path) -> list[str]:
    from .sae.autoencoder import CFG_FILE, WEIGHTS_FILE

    where = f"SAE {sae_dir}"
    if not sae_dir.is_dir():
        return [f"{where}: missing; run `dvc repro train_sae` (or `dvc pull`)"]
    problems: list[str] = []
    if (sae_dir / MANIFEST_FILE).exists():
        problems += _check_manifest(sae_dir)
    cfg_path, weights = sae_dir / CFG_FILE, sae_dir / WEIGHTS_FILE
    cfg = None
    if cfg_path.is_file():
        cfg, cfg_problems = _read_cfg(cfg_path)
        problems += cfg_problems
    else:
        problems.append(f"{CFG_FILE}: missing")
    if not weights.is_file():
        problems.append(f"{WEIGHTS_FILE}: missing")
    elif cfg is not None:
        problems += _check_tensors(weights, cfg)
    problems += [f"{name}: left by an interrupted run" for name in _temp_files(sae_dir)]
    return [f"{where}: {p}" for p in problems]

