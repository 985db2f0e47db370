"""The exported SAE (SAELens layout: cfg.json + sae_weights.safetensors + our manifest.json),
checked before anything trusts it: `saelab verify` lists every problem, `load_sae` stops at
the first. Checked: manifest.json's own seal, each file's size and sha256 against it, the
tensors the architecture needs, their shapes against cfg's d_in / d_sae, their dtype
against cfg's dtype, finiteness. A missing or unreadable file is a problem line, never a
traceback.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..activations.store import file_problem
from ..core.integrity import seal_problem
from .autoencoder import CFG_FILE, MANIFEST_FILE, WEIGHTS_FILE

_SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16", "float64": "F64"}


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
    path = sae_dir / MANIFEST_FILE
    if not path.is_file():
        # Every export has one: without it a flipped weight byte would go unnoticed.
        return [f"{MANIFEST_FILE}: missing, so the files cannot be checked"]
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
        if problem := seal_problem(manifest, MANIFEST_FILE):
            return [problem]
        files = manifest["files"]
        problems = [file_problem(sae_dir / name, entry, MANIFEST_FILE)
                    for name, entry in sorted(files.items())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        return [f"{MANIFEST_FILE}: unreadable ({type(e).__name__}: {e})"]
    missing = {WEIGHTS_FILE, CFG_FILE} - set(files)
    return [p for p in problems if p] + [f"{n}: not listed in {MANIFEST_FILE}"
                                         for n in sorted(missing)]


def sae_problems(sae_dir: Path) -> list[str]:
    """Every problem of the SAE export in `sae_dir`; [] when it is sound."""
    problems = _check_manifest(sae_dir)
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
    return problems
