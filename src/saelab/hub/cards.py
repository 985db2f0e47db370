"""Hub cards: README.md of the activation dataset repo and of the SAE model repo.

Both start with the YAML metadata the Hub reads (licence, language, size and task
categories, `configs:` for the dataset viewer, `library_name: saelens` for SAEs) and then
say in prose what the files are, where they came from and how to load them with public
libraries only (`datasets`, SAELens): saelab is not on PyPI.

Licences follow the Hub convention: a licence the Hub knows by id goes in `license:`;
any other (the Llama 3.2 Community License) is `license: other` with `license_name` and
`license_link`. Activations and an SAE trained on them carry both the corpus's licence
and the model's. A model with random weights has no licence of its own and no learned
features: the cards flag it in the metadata (`random-weights` tag) and in the text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class License:
    id: str                 # a Hub licence id, or "other"
    title: str              # how the text names it
    name: str | None = None  # license_name, with id "other"
    link: str | None = None  # license_link, with id "other"


LLAMA_3_2 = License("other", "Llama 3.2 Community License", "llama3.2",
                    "https://huggingface.co/meta-llama/Llama-3.2-1B/blob/main/LICENSE.txt")
APACHE_2 = License("apache-2.0", "Apache License 2.0")
UNKNOWN = License("other", "unknown: check the model's own licence before publishing",
                  "unknown")


@dataclass(frozen=True)
class Corpus:
    title: str
    link: str
    license: License
    hub_id: str | None = None  # a Hub dataset id (source_datasets)


CORPORA = {
    "sample": Corpus("Corpus de novelas de la Edad de Plata (CLiGS textbox, ed. José Calvo "
                     "Tello, 2017), the sample shipped with saelab",
                     "https://github.com/cligs/textbox/tree/master/spanish/novela-espanola",
                     License("cc-by-4.0", "CC BY 4.0")),
    "oscar": Corpus("OSCAR `unshuffled_deduplicated_es` (parquet export)",
                    "https://huggingface.co/datasets/oscar-corpus/oscar",
                    License("cc0-1.0", "CC0 1.0 (OSCAR's packaging; the texts keep their "
                            "own rights)"), "oscar-corpus/oscar"),
    "fineweb2": Corpus("FineWeb-2 `spa_Latn`",
                       "https://huggingface.co/datasets/HuggingFaceFW/fineweb-2",
                       License("odc-by", "ODC-By 1.0"), "HuggingFaceFW/fineweb-2"),
}
LOCAL_CORPUS = Corpus("local text files", "", UNKNOWN)
NO_CORPUS = Corpus("not recorded (no data/corpus/manifest.json)", "", UNKNOWN)
# Models saelab fetches whose origin and licence it knows, by models/base.json "name".
MODELS = {"smollm2-135m-instruct": ("HuggingFaceTB/SmolLM2-135M-Instruct", APACHE_2)}
RANDOM_SOURCES = ("tiny", "random")
# Hub size_categories bins, by number of rows (examples).
_SIZE_BINS = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"),
              (1_000_000, "100K<n<1M"), (10_000_000, "1M<n<10M"),
              (100_000_000, "10M<n<100M"), (1_000_000_000, "100M<n<1B"))


@dataclass(frozen=True)
class ModelFacts:
    """What a card says about the base model, from models/base.json."""
    name: str
    revision: str
    hub_id: str | None       # the Hub repo the weights come from (base_model), if any
    license: License | None  # None: random weights, nothing to license
    random_weights: bool
    weights: str             # how saelab got the weights, in words

    @property
    def ref(self) -> str:
        return f"[{self.hub_id}](https://huggingface.co/{self.hub_id})" if self.hub_id \
            else f"`{self.name}`"


def model_facts(model_json: dict[str, Any], fallback: dict[str, Any]) -> ModelFacts:
    """From models/base.json; `fallback` (the store's or SAE's own record) fills in name and
    revision when base.json is absent."""
    name = model_json.get("name") or fallback.get("name") or "?"
    revision = str(model_json.get("revision") or fallback.get("revision") or "?")
    source = model_json.get("source")
    if source in RANDOM_SOURCES:
        return ModelFacts(name, revision, None, None, True, "random (seeded) initialisation")
    hub_id = model_json.get("hf_repo")
    if hub_id:
        lic = LLAMA_3_2 if hub_id.lower().startswith("meta-llama/llama-3.2") else UNKNOWN
        return ModelFacts(hub_id, revision, hub_id, lic, False,
                          f"downloaded from the Hub at revision `{revision}`")
    hub_id, lic = MODELS.get(name, (None, UNKNOWN))
    quant = (model_json.get("quantization") or {}).get("file_type")
    origin = Path(str(model_json.get("source_path") or "?")).name
    weights = (f"dequantised from the {quant} GGUF file `{origin}` (sha256 `{revision}`)"
               if quant else f"from `{origin}` ({source})")
    return ModelFacts(name, revision, hub_id, lic, False, weights)


def corpus_facts(corpus_manifest: dict[str, Any]) -> Corpus:
    if not corpus_manifest:
        return NO_CORPUS
    return CORPORA.get(corpus_manifest.get("source", ""), LOCAL_CORPUS)


def _y(value: Any) -> str:
    """A YAML scalar: JSON strings and numbers are valid YAML."""
    return json.dumps(value, ensure_ascii=False)


def _license_yaml(licenses: list[License]) -> list[str]:
    """`license:` lines for the licences that apply together (at most one non-Hub one)."""
    others = [lic for lic in licenses if lic.id == "other"]
    if others:
        lines = ["license: other", f"license_name: {_y(others[0].name)}"]
        return lines + ([f"license_link: {_y(others[0].link)}"] if others[0].link else [])
    ids = list(dict.fromkeys(lic.id for lic in licenses))
    return [f"license: {ids[0]}"] if len(ids) == 1 else ["license:", *(f"  - {i}" for i in ids)]


def _license_text(model: ModelFacts, corpus: Corpus, what: str) -> str:
    corpus_link = f" ({corpus.link})" if corpus.link else ""
    lines = [f"- The text: {corpus.title}{corpus_link}, licence {corpus.license.title}."]
    if model.license is None:
        lines.append(f"- The model `{model.name}` has random weights: no model licence "
                     "applies. Its tokenizer is Llama 3.2's, under the Llama 3.2 Community "
                     f"License ({LLAMA_3_2.link}).")
    else:
        link = f" ({model.license.link})" if model.license.link else ""
        lines.append(f"- The model {model.ref}: {model.license.title}{link}; {what} "
                     "derive from the model's outputs, so its terms apply to them as well.")
        if model.license is LLAMA_3_2:  # the licence asks derived works to say so
            lines.append("- Built with Llama.")
    return "\n".join(lines)


def _random_warning(model: ModelFacts) -> str:
    if not model.random_weights:
        return ""
    return (f"\n> **Random weights.** `{model.name}` is a randomly initialised model "
            "(seeded), not a trained one: these numbers carry no learned features and LM "
            "metrics on it are meaningless. Use this repo to test pipelines, not to study "
            "a language model.\n")


def _tags(base: list[str], model: ModelFacts) -> list[str]:
    return ["  - " + t for t in base + (["random-weights"] if model.random_weights else [])]


def size_category(n_rows: int) -> str:
    for bound, label in _SIZE_BINS:
        if n_rows < bound:
            return label
    return "n>1B"


def corpus_line(corpus_manifest: dict[str, Any]) -> str:
    """The corpus as the cards print it: title, link, revision, files (never a list repr)."""
    corpus = corpus_facts(corpus_manifest)
    text = f"[{corpus.title}]({corpus.link})" if corpus.link else corpus.title
    revs = [r for r in dict.fromkeys((corpus_manifest.get("revision"),
                                      corpus_manifest.get("revision_sha"))) if r]
    if revs:
        text += ", revision " + " at ".join(f"`{r}`" for r in revs)
    files = corpus_manifest.get("files")
    if isinstance(files, list) and files:
        text += ", files " + ", ".join(f"`{f}`" for f in files)
    docs = corpus_manifest.get("docs") or {}
    if docs:
        text += (f"; {docs.get('train', '?')} training documents, {docs.get('heldout', '?')} "
                 "held out")
    return text


def saelens_snippet(repo: str, info: dict[str, Any]) -> str:
    """Python that streams shuffled training batches of the dataset through SAELens."""
    return f"""import torch
from huggingface_hub import snapshot_download
from sae_lens.training.activations_store import ActivationsStore

path = snapshot_download("{repo}", repo_type="dataset")
store = ActivationsStore(
    model=None, dataset=None, cached_activations_path=path, streaming=False,
    hook_name="{info['hook_name']}", hook_head_index=None, context_size={info['seq_len']},
    d_in={info['d']}, total_training_tokens={info['n_tokens']}, n_batches_in_buffer=8,
    store_batch_size_prompts=8, train_batch_size_tokens=4096, prepend_bos=True,
    normalize_activations="none", device=torch.device("cpu"),
    dtype="float32")
x = next(store)  # float32 [4096, {info['d']}]: one batch for sae_lens's SAETrainer
"""


def dataset_card(info: dict[str, Any], model_json: dict[str, Any],
                 corpus_manifest: dict[str, Any], repo_id: str | None = None) -> str:
    """README.md of the activation dataset (the export `info` of hub.hf_dataset)."""
    model = model_facts(model_json, {"name": info.get("model"), "revision": info.get("revision")})
    corpus = corpus_facts(corpus_manifest)
    hook_name, layer, hook = info["hook_name"], info["layer"], info["hook"]
    d, seq_len, n_rows = info["d"], info["seq_len"], info["n_rows"]
    repo = repo_id or "<this repo>"
    licenses = [corpus.license] + ([model.license] if model.license else [])
    header = [
        "---",
        *_license_yaml(licenses),
        "language:",
        "  - es",
        f"pretty_name: {_y(f'{model.name} layer {layer} {hook} activations')}",
        "size_categories:",
        f"  - {size_category(n_rows)}",
        "task_categories:",
        "  - feature-extraction",
        "tags:",
        *_tags(["sparse-autoencoder", "interpretability", "activations", "saelens",
                "saelab"], model),
        *(["source_datasets:", f"  - {corpus.hub_id}"] if corpus.hub_id else []),
        "configs:",
        "  - config_name: default",
        "    data_files:",
        "      - split: train",
        "        path: \"data-*.arrow\"",
        "saelab:",
        f"  model: {_y(model.name)}",
        f"  revision: {_y(model.revision)}",
        f"  random_weights: {str(model.random_weights).lower()}",
        f"  layer: {layer}",
        f"  hook: {_y(hook)}",
        f"  hook_name: {_y(hook_name)}",
        f"  d: {d}",
        f"  seq_len: {seq_len}",
        f"  n_rows: {n_rows}",
        f"  n_tokens: {info['n_tokens']}",
        f"  store_dtype: {_y(info['store_dtype'])}",
        f"  scale: {info['scale']!r}",
        f"  corpus: {_y(corpus_manifest.get('source', 'unknown'))}",
        "---",
    ]
    body = f"""
# {model.name}: layer {layer} `{hook}` activations
{_random_warning(model)}
Activation vectors of {model.ref} (revision `{model.revision}`) at `{hook_name}`, on
Spanish text, written by saelab to train and study sparse autoencoders. The layout is SAELens's cached-activations dataset: one column named by the
hook point holding `[{seq_len}, {d}]` float32 vectors per row, and `token_ids`
(int32 `[{seq_len}]`) beside it.

| | |
|---|---|
| model | {model.ref} |
| weights | {model.weights} |
| revision | `{model.revision}` |
| layer / hook | {layer} / `{hook}` (`{hook_name}`) |
| width (d) | {d} |
| rows x tokens per row | {n_rows:,} x {seq_len} = {info['n_tokens']:,} tokens |
| values | float32, raw (not normalised); stored as `{info['store_dtype']}` |
| normalisation scalar | {info['scale']!r} (multiply by it for E‖x‖² = 1) |
| corpus | {corpus_line(corpus_manifest)} |

Documents were tokenized, concatenated with BOS at each row start and cut into context
windows of {info['context_len']} tokens (no padding). BOS and EOS positions are not
stored, so a row here is {seq_len} consecutive stored tokens, not a model context window:
positions within a row are not token positions. `saelab_export.json` holds the store's
norm statistics and what was excluded.

## Use

```python
from datasets import load_dataset

ds = load_dataset("{repo}", split="train").with_format("torch")
x = ds[0]["{hook_name}"]        # float32 [{seq_len}, {d}]
ids = ds[0]["token_ids"]          # int32 [{seq_len}]
```

Train an SAE on it with SAELens: its cached-activations loader opens the downloaded
folder with `datasets.load_from_disk`, no language model needed (the same folder is
`cached_activations_path` with `use_cached_activations=True` in a runner config).

```python
{saelens_snippet(repo, info)}```

## License

{_license_text(model, corpus, "the activations")}
"""
    return "\n".join(header) + "\n" + body


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, bool) or value is None:
        return "not measured" if value is None else str(value)
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def sae_card(cfg: dict[str, Any], metrics: dict[str, Any], model_json: dict[str, Any],
             corpus_manifest: dict[str, Any], *, repo_id: str, sae_id: str,
             dataset_repo: str | None, run: dict[str, str | None]) -> str:
    """README.md of the SAE model repo: what it is, how well it reconstructs, provenance."""
    meta = cfg.get("metadata", {})
    model = model_facts(model_json, {"name": meta.get("model_name"),
                                     "revision": meta.get("model_revision")})
    corpus = corpus_facts(corpus_manifest)
    hook_name = meta.get("hook_name", "?")
    arch = cfg.get("architecture", "?")
    licenses = [corpus.license] + ([model.license] if model.license else [])
    lm_ok = metrics.get("lm_metrics_meaningful")
    lm_note = "" if lm_ok else (" (not meaningful: the model has random weights)"
                                if model.random_weights else " (not measured)")
    rows = [
        ("model", model.ref), ("weights", model.weights),
        ("revision", f"`{model.revision}`"),
        ("hook", f"`{hook_name}` (layer {meta.get('layer', '?')}, `{meta.get('hook', '?')}`)"),
        ("d_in", _fmt(cfg.get("d_in"))), ("d_sae", _fmt(cfg.get("d_sae"))),
        ("architecture", f"`{arch}`" + (f", k = {cfg['k']}" if "k" in cfg else "")),
        ("L0", _fmt(metrics.get("l0"))), ("FVU", _fmt(metrics.get("fvu"))),
        ("delta LM loss (nats)", _fmt(metrics.get("delta_lm_loss")) + lm_note),
        ("CE loss recovered", _fmt(metrics.get("ce_loss_recovered")) + lm_note),
        ("dead fraction", _fmt(metrics.get("dead_fraction"))),
        ("training tokens", _fmt(metrics.get("tokens", meta.get("training_tokens")))),
        ("learning rate", f"{_fmt(meta.get('lr'))} (from {meta.get('lr_source', '?')})"),
        ("activations", f"[{dataset_repo}](https://huggingface.co/datasets/{dataset_repo})"
         if dataset_repo else "streamed from the model, not stored"
         if meta.get("data_source") == "stream" else "saelab's activation store (not on "
         "the Hub)"),
        ("corpus", corpus_line(corpus_manifest)),
        ("git commit", f"`{run.get('git_commit') or 'not recorded'}`"),
        ("MLflow run id", f"`{run.get('run_id') or 'not recorded'}`"),
    ]
    header = [
        "---",
        "library_name: saelens",
        *_license_yaml(licenses),
        "language:",
        "  - es",
        *([f"base_model: {_y(model.hub_id)}"] if model.hub_id else []),
        *(["datasets:", f"  - {dataset_repo}"] if dataset_repo else []),
        "tags:",
        *_tags(["sparse-autoencoder", "saelens", arch, "interpretability", "saelab"], model),
        "saelab:",
        f"  sae_id: {_y(sae_id)}",
        f"  hook_name: {_y(hook_name)}",
        f"  random_weights: {str(model.random_weights).lower()}",
        *(f"  {k}: {_y(metrics[k])}" for k in ("l0", "fvu", "delta_lm_loss",
                                               "ce_loss_recovered", "dead_fraction", "tokens")
          if isinstance(metrics.get(k), (int, float)) and not isinstance(metrics[k], bool)),
        f"  git_commit: {_y(run.get('git_commit'))}",
        f"  mlflow_run_id: {_y(run.get('run_id'))}",
        "---",
    ]
    table = "\n".join(f"| {k} | {v} |" for k, v in rows)
    evaluated = (metrics.get("sources") or {}).get("eval", "activations from the store")
    body = f"""
# {arch} SAE on {model.name} `{hook_name}`
{_random_warning(model)}
A sparse autoencoder with {_fmt(cfg.get('d_sae'))} latents over the {_fmt(cfg.get('d_in'))}-wide
`{hook_name}` activations of {model.ref}, trained by saelab (Gemma Scope JumpReLU recipe)
on Spanish text. It takes raw activations: the training normalisation is folded into the
weights (`normalize_activations: none`).

| | |
|---|---|
{table}

FVU, L0 and the dead fraction are measured on {evaluated}; delta LM loss is the
next-token cross-entropy with the SAE's reconstruction spliced in minus the clean one, and
CE loss recovered compares it with zero-ablating the hook, on held-out documents.

## Use

```python
from sae_lens import SAE

sae = SAE.from_pretrained("{repo_id}", "{sae_id}")
```

The files are `{sae_id}/cfg.json` and `{sae_id}/sae_weights.safetensors` (SAELens's
layout: `W_enc`, `W_dec`, `b_enc`, `b_dec`{', `threshold`' if arch == 'jumprelu' else ''}).

## License

{_license_text(model, corpus, "the SAE's weights")}
"""
    return "\n".join(header) + "\n" + body
