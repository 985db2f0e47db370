"""fetch_model: seeded tiny build, save/reload, base.json, Hub route without network."""
import json
import os
import shutil

import pytest
import torch

from saelab.data import base_model, tokenizer
from saelab.data.base_model import build_model_config, check_layer, fetch_model, load_model
from saelab.core.config import parse_params
from saelab.core.errors import SaelabError
from saelab.data.tokenizer import load_llama3_tokenizer

HUB = {"source": "hub", "name": "meta-llama/Llama-3.2-1B"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tiny build shared by the tests that only read it."""
    root = tmp_path_factory.mktemp("tiny")
    info = fetch_model(parse_params({}), root / "base", root / "base.json")
    return root, info


def test_tokenizer_is_llama_3_2_1b():
    tok = load_llama3_tokenizer()
    assert (tok.bos_token_id, tok.eos_token_id, len(tok)) == (128000, 128001, 128256)
    ids = tok("Hola, señor <|image|>").input_ids
    assert ids[:5] == [128000, 69112, 11, 55330, 269]  # BOS "Hola" "," " señ" "or"
    assert max(ids) < 128256  # the Vision-only `<|image|>` special is plain text here
    assert tok.decode(ids[1:5]) == "Hola, señor"


def test_missing_tokenizer_package_says_make_install(monkeypatch):
    def missing(name):
        raise ModuleNotFoundError(name)

    monkeypatch.setattr(tokenizer.importlib.resources, "files", missing)
    tokenizer._tokenizer.cache_clear()
    try:
        with pytest.raises(SaelabError, match="make install"):
            load_llama3_tokenizer()
    finally:
        monkeypatch.undo()
        tokenizer._tokenizer.cache_clear()


def test_config_matches_llama_3_2_1b():
    p = parse_params({"model": {"hidden_size": 2048, "intermediate_size": 8192,
                                "num_attention_heads": 32, "num_key_value_heads": 8}})
    c = build_model_config(p.model)
    assert (c.hidden_size, c.num_hidden_layers, c.intermediate_size, c.num_attention_heads,
            c.num_key_value_heads, c.vocab_size, c.head_dim) == (2048, 16, 8192, 32, 8, 128256, 64)
    rope = c.rope_parameters
    assert rope["rope_type"] == "llama3" and rope["factor"] == 32.0
    assert (rope["low_freq_factor"], rope["high_freq_factor"]) == (1.0, 4.0)
    assert rope["original_max_position_embeddings"] == 8192 and rope["rope_theta"] == 500000.0
    assert c.tie_word_embeddings and c.rms_norm_eps == 1e-5


def test_tiny_build_is_seeded_and_reloads_with_identical_logits(tiny, tmp_path):
    root, info = tiny
    again = fetch_model(parse_params({}), tmp_path / "base", tmp_path / "base.json")
    assert again["n_params"] == info["n_params"]
    st = "model.safetensors"
    assert (tmp_path / "base" / st).read_bytes() == (root / "base" / st).read_bytes()
    other = fetch_model(parse_params({"model": {"init_seed": 1}}), tmp_path / "b1",
                        tmp_path / "b1.json")
    assert other["revision"] == "random-seed-1"
    assert (tmp_path / "b1" / st).read_bytes() != (root / "base" / st).read_bytes()

    torch.manual_seed(0)
    built = base_model.LlamaForCausalLM(build_model_config(parse_params({}).model)).eval()
    model, tok = load_model(root / "base", device="cpu", dtype=torch.float32)
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    ids = tok(["El ingenioso hidalgo don Quijote de la Mancha"], return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.equal(model(ids).logits, built(ids).logits)
    assert tok.bos_token_id == 128000 and len(tok) == 128256


def test_base_json_describes_the_model(tiny):
    root, info = tiny
    saved = json.loads((root / "base.json").read_text())
    assert saved == info
    assert saved["name"] == "tiny-llama-16L-64d" and saved["source"] == "tiny"
    assert saved["revision"] == "random-seed-0" and saved["path"] == (root / "base").as_posix()
    assert saved["config"] == {"hidden_size": 64, "num_hidden_layers": 16,
                               "intermediate_size": 256, "num_attention_heads": 4,
                               "num_key_value_heads": 2, "vocab_size": 128256}
    model, _ = load_model(root / "base", device="cpu", dtype=torch.float32)
    assert saved["n_params"] == sum(p.numel() for p in model.parameters())


def test_layer_the_model_lacks_is_a_clear_error(tiny, tmp_path, monkeypatch):
    with pytest.raises(SaelabError, match=r"extract.layer = 8 but model m has 4 layers \(0\.\.3\)"):
        check_layer(4, 8, "m")
    # A Hub checkpoint with fewer layers than params promise is caught after download.
    root, _ = tiny
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    def download(cfg, token, out_dir):
        shutil.copytree(root / "base", out_dir, dirs_exist_ok=True)
        config = json.loads((out_dir / "config.json").read_text())
        config["num_hidden_layers"] = 4
        (out_dir / "config.json").write_text(json.dumps(config))
        return "b" * 40

    monkeypatch.setattr(base_model, "_download", download)
    with pytest.raises(SaelabError, match=r"has 4 layers \(0\.\.3\)"):
        fetch_model(parse_params({"model": HUB}), tmp_path / "base", tmp_path / "base.json")


def test_hub_without_token_fails_before_any_download(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)

    def no_network(*args, **kwargs):
        raise AssertionError("the Hub was contacted")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", no_network)
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", no_network)
    with pytest.raises(SaelabError, match=r"export HF_TOKEN=\.\.\. with access to "
                                          r"meta-llama/Llama-3\.2-1B"):
        fetch_model(parse_params({"model": HUB}), tmp_path / "base", tmp_path / "base.json")
    assert not (tmp_path / "base").exists() and not (tmp_path / "base.json").exists()


def test_gated_model_is_one_clear_line(tmp_path, monkeypatch, gated_repo):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", gated_repo(
        "https://huggingface.co/api/models/meta-llama/Llama-3.2-1B"))
    with pytest.raises(SaelabError, match=r"meta-llama/Llama-3\.2-1B is gated.*"
                                          r"https://huggingface\.co/meta-llama/Llama-3\.2-1B"):
        fetch_model(parse_params({"model": HUB}), tmp_path / "base", tmp_path / "base.json")


def test_hub_route_pins_the_resolved_revision(tiny, tmp_path, monkeypatch):
    """The Hub flow end to end with a local stand-in for the snapshot (no network)."""
    import huggingface_hub

    root, info = tiny
    sha = "c" * 40
    calls = []
    # The HF cache stores symlinks into blobs/; the stage must copy the real files.
    blobs, snap = tmp_path / "cache" / "blobs", tmp_path / "cache" / "snapshots" / sha
    blobs.mkdir(parents=True)
    snap.mkdir(parents=True)
    for f in (root / "base").iterdir():
        shutil.copy(f, blobs / f.name)
        os.symlink(blobs / f.name, snap / f.name)

    class Info:
        pass

    def model_info(self, repo, revision=None, token=None):
        calls.append(("model_info", repo, revision, token))
        i = Info()
        i.sha = sha
        return i

    def snapshot_download(repo, **kwargs):
        calls.append(("snapshot_download", repo, kwargs))
        return str(snap)

    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    got = fetch_model(parse_params({"model": {**HUB, "revision": "main"}}), tmp_path / "base",
                      tmp_path / "base.json")
    assert calls[0] == ("model_info", "meta-llama/Llama-3.2-1B", "main", "hf_test_token")
    assert calls[1][2]["revision"] == sha and calls[1][2]["token"] == "hf_test_token"
    assert "original/*" in calls[1][2]["ignore_patterns"]
    assert got["revision"] == sha and got["requested_revision"] == "main"
    assert got["hf_repo"] == "meta-llama/Llama-3.2-1B" and got["n_params"] == info["n_params"]
    assert not (tmp_path / "base" / "model.safetensors").is_symlink()
    assert "hf_test_token" not in (tmp_path / "base.json").read_text()
    # Params that disagree with the checkpoint are refused: later stages size from params.
    with pytest.raises(SaelabError, match="hidden_size: checkpoint 64, params 128"):
        fetch_model(parse_params({"model": {**HUB, "hidden_size": 128}}), tmp_path / "base",
                    tmp_path / "base.json")


def test_stage_logs_summary_to_mlflow(tmp_path, monkeypatch, isolated_mlflow):
    import mlflow

    from saelab.core import paths
    from saelab.core.tracking import stage_run

    monkeypatch.setattr(paths, "MODEL_DIR", tmp_path / "base")
    monkeypatch.setattr(paths, "MODEL_JSON", tmp_path / "base.json")
    monkeypatch.chdir(tmp_path)
    params = parse_params({})
    with stage_run("fetch_model", params) as run:
        base_model._run(params)
    got = mlflow.get_run(run.info.run_id)
    assert got.data.metrics["base_model.n_params"] == json.loads(
        (tmp_path / "base.json").read_text())["n_params"]
    assert got.data.tags["model.revision"] == "random-seed-0"
