"""`saelab` command line: helpers around the DVC pipeline (the stages themselves run via dvc)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .core.config import ConfigError, load_params
from .core.errors import SaelabError
from .preflight import STAGES as PIPELINE_STAGES


def compose_params(overrides: list[str] | None = None, root: Path = Path("."),
                   output: Path | None = None) -> Path:
    """Regenerate params.yaml from conf/ exactly as `dvc exp run` does (DVC's own Hydra dump)."""
    from dvc.utils.hydra import compose_and_dump

    root = root.resolve()
    output = output or root / "params.yaml"
    profiles = sorted(p.stem for p in (root / "conf" / "profile").glob("*.yaml"))
    for o in overrides or []:
        name, _, value = o.partition("=")
        if name.lstrip("+~") == "profile" and value not in profiles:
            raise ConfigError(f"unknown profile {value!r}; choose one of {profiles} (the files "
                              "in conf/profile/)")
    compose_and_dump(output, str(root / "conf"), None, "config", str(root), overrides or [])
    return output


def _cmd_params(args) -> int:
    out = compose_params(args.overrides, output=Path(args.output) if args.output else None)
    load_params(out)  # fail here, not in a stage, if conf/ composes to something invalid
    print(f"wrote {out}")
    return 0


def _cmd_budget(args) -> int:
    from .scaling.budget import budget_cli

    print(budget_cli(args.params, args.results))
    return 0


def _cmd_plan(args) -> int:
    from .scaling.plan import make_plan, plan_text

    print(plan_text(make_plan(load_params(args.params), gpu=args.gpu,
                              results=Path(args.results))), end="")
    return 0


def _cmd_verify(args) -> int:
    from .verify import verify_all

    problems = verify_all(Path(args.store), Path(args.sae))
    for p in problems:
        print(f"PROBLEM: {p}")
    if problems:
        print(f"{len(problems)} problem(s) found")
        return 1
    print("store and SAE match their manifests")
    return 0


def _cmd_export_store(args) -> int:
    from .hub.hf_dataset import export_hf

    info = export_hf(Path(args.store), Path(args.dir), seq_len=args.seq_len)
    print(f"wrote {args.dir}: {info['n_rows']} rows x {info['seq_len']} tokens of "
          f"{info['hook_name']} ({info['left_out_tokens']} tokens left out); open it with "
          "datasets.load_from_disk")
    return 0


def _cmd_upload_store(args) -> int:
    import tempfile

    from .hub.hf_dataset import export_hf
    from .hub.share import upload_store

    if args.export:
        url = upload_store(Path(args.export), args.repo_id, private=not args.public)
    else:  # export next to the store (same disk), upload, and drop the copy
        store = Path(args.store)
        with tempfile.TemporaryDirectory(prefix=".hf-export-", dir=store.parent) as tmp:
            export_hf(store, Path(tmp) / "hf")
            url = upload_store(Path(tmp) / "hf", args.repo_id, private=not args.public)
    print(f"uploaded to {url}")
    return 0


def _cmd_upload_sae(args) -> int:
    from .hub.share import upload_sae
    from .verify import verify_sae

    # Never publish a damaged export: the same checks as `saelab verify`.
    problems = verify_sae(Path(args.sae))
    if problems:
        raise SaelabError(f"{'; '.join(problems[:3])}; fix the export (`dvc repro train_sae`) "
                          "before uploading")
    url = upload_sae(Path(args.sae), args.repo_id, private=not args.public, sae_id=args.sae_id,
                     dataset_repo=args.dataset, run_id=args.mlflow_run)
    print(f"uploaded to {url}")
    return 0


def _cmd_baseline(args) -> int:
    from .core.baseline import commit_baseline

    sha = commit_baseline()
    print(f"committed the baseline as {sha}" if sha else
          "the baseline is committed already (HEAD holds this dvc.lock and outputs)")
    return 0


def _cmd_preflight(args) -> int:
    from .preflight import preflight

    preflight(load_params(args.params), args.stage, Path(args.params))
    later = PIPELINE_STAGES[PIPELINE_STAGES.index(args.stage):]
    print(f"preflight passed: {', '.join(later)} can start")
    return 0


def _cmd_pareto(args) -> int:
    from .sae.pareto import main as pareto_main

    pareto_main(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="saelab", description=__doc__)
    sub = parser.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("params", help="regenerate params.yaml from conf/ (Hydra)")
    p.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. profile=llama-3.2-1b")
    p.add_argument("--output", help="write here instead of params.yaml")
    p.set_defaults(func=_cmd_params)

    p = sub.add_parser("baseline", help="commit dvc.lock and the pipeline's git-tracked "
                       "outputs after `dvc repro` (what queued experiments start from)")
    p.set_defaults(func=_cmd_baseline)

    p = sub.add_parser("preflight", help="check params.yaml against conf/ and the API key, "
                       "Hub token and disk the stages will need, without running anything")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--stage", default="fetch_model", choices=PIPELINE_STAGES,
                   help="check this stage and the later ones")
    p.set_defaults(func=_cmd_preflight)

    p = sub.add_parser("budget", help="print the token, FLOP and GPU-hour budget")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--results", default="bench/results.json",
                   help="bench/gpu.py's results: hours at its measured rates (when present)")
    p.set_defaults(func=_cmd_budget)

    p = sub.add_parser("plan", help="tokens, FLOPs, disk, memory and hours of a run of the "
                                    "current params, before anything runs")
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--gpu", default="H100", help="the GPU to plan for (RTX 4090, A100, H100, H200)")
    p.add_argument("--results", default="bench/results.json",
                   help="bench/gpu.py's results: hours at its measured rates (when present)")
    p.set_defaults(func=_cmd_plan)

    p = sub.add_parser("verify", help="check the activation store and SAE export against their manifests")
    p.add_argument("--store", default="data/activations")
    p.add_argument("--sae", default="models/sae")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("export-store", help="write the activation store as a Hugging Face "
                       "datasets dataset (SAELens's cached-activations layout)")
    p.add_argument("dir", help="new directory to write (datasets.load_from_disk opens it)")
    p.add_argument("--format", choices=["hf"], default="hf")
    p.add_argument("--store", default="data/activations")
    p.add_argument("--seq-len", type=int, default=None,
                   help="tokens per row (SAELens's context_size); default: the store's")
    p.set_defaults(func=_cmd_export_store)

    # Both uploads: a repo id, private unless --public (HF_TOKEN from the environment).
    p = sub.add_parser("upload-store", help="upload the activations, as a datasets dataset, "
                       "to a Hugging Face dataset repo (private unless --public)")
    p.add_argument("--store", default="data/activations")
    p.add_argument("--export", help="upload this `export-store` directory instead of "
                   "exporting the store to a temporary one")
    p.set_defaults(func=_cmd_upload_store)
    uploads = [p]

    p = sub.add_parser("upload-sae", help="upload the exported SAE (SAELens layout) and a "
                       "model card to a Hugging Face model repo (private unless --public)")
    p.add_argument("--sae", default="models/sae")
    p.add_argument("--sae-id", help="folder in the repo, SAELens's from_pretrained(repo, "
                   "sae_id); default: the hook name")
    p.add_argument("--dataset", help="the Hub dataset repo of the activations it trained on")
    p.add_argument("--mlflow-run", help="the train_sae MLflow run id (default: found by its "
                   "final metrics)")
    p.set_defaults(func=_cmd_upload_sae)
    for p in uploads + [p]:
        p.add_argument("repo_id")
        p.add_argument("--public", action="store_true")

    p = sub.add_parser("pareto", help="train target L0s x seeds on the store; plot FVU and "
                       "delta LM loss vs L0 with 95%% intervals (reports/pareto)")
    p.add_argument("--targets", default="8,16,32,64,128", help="comma-separated target L0s")
    p.add_argument("--seeds", type=int, default=3, help="seeds run.seed, run.seed + 1, ...")
    p.add_argument("--archs", default="jumprelu,topk,batchtopk",
                   help="comma-separated: jumprelu (L0 controller), topk, batchtopk (k = target)")
    p.add_argument("--tokens", type=int, help="training tokens per SAE (default: train_sae's)")
    p.add_argument("--out", default="reports/pareto")
    p.add_argument("--params", default="params.yaml")
    p.set_defaults(func=_cmd_pareto)

    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ConfigError, SaelabError) as e:
        print(f"ERROR: saelab {args.cmd}: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
