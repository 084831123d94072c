"""The ``redrec`` command line. Every subcommand is a thin shell over the library."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import yaml


def _setup_env() -> None:
    os.environ.setdefault("BENTOML_DO_NOT_TRACK", "True")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", str(Path("build/torch_extensions").resolve()))


def _load_yaml(path: str | None) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.exists():
        raise SystemExit(f"--config: file {path} does not exist")
    return yaml.safe_load(p.read_text()) or {}


def _experiment_config(args) -> "ExperimentConfig":
    from pydantic import ValidationError

    from redrec.experiment import ExperimentConfig

    raw = _load_yaml(args.config)
    if args.dataset:
        raw["dataset"] = args.dataset
    if getattr(args, "epochs", None):
        raw.setdefault("train", {})["epochs"] = args.epochs
    if getattr(args, "variants", None):
        raw["variants"] = args.variants.split(",")
    if getattr(args, "out_dir", None):
        raw["out_dir"] = args.out_dir
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as e:
        raise SystemExit(f"invalid configuration ({args.config or 'defaults'}):\n{e}") from None


def cmd_describe(args) -> int:
    from redrec.data import load_dataset

    data = load_dataset(args.dataset)
    print(json.dumps(data.describe(), indent=2))
    for r in data.reports:
        print(r.summary())
    return 0


def cmd_quality(args) -> int:
    from redrec.experiment import run_experiment

    cfg = _experiment_config(args)
    out = run_experiment(cfg)
    for name, p in out["protocols"].items():
        print(f"\n{name} ({p['protocol']}):\n{p['table']}")
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(json.dumps(out, indent=2))
        print(f"results written to {args.output}")
    return 0


def cmd_train(args) -> int:
    from redrec.data import chronological_split, encode, load_dataset
    from redrec.evaluate import evaluate_model, format_table
    from redrec.experiment import train_variant, training_record
    from redrec.model.checkpoint import export_checkpoint

    cfg = _experiment_config(args)
    meta = json.loads(Path(args.meta).read_text()) if args.meta else {"dataset": cfg.dataset}
    data = load_dataset(cfg.dataset, **cfg.dataset_args)
    enc = encode(data)
    split = chronological_split(enc, cfg.test_events, cfg.valid_events)
    variant = cfg.variants[-1]
    trainer, fit = train_variant(cfg, variant, data, enc, split, cfg.out_dir / variant)
    if trainer.rank == 0:
        meta.update(variant=variant, **training_record(trainer, fit, enc, split))
        if not args.meta:  # a standalone run reports its test numbers; a pipeline's evaluate step scores them
            res = evaluate_model(trainer.module, trainer.builder, enc, split)
            print(format_table({variant: res}, enc.scenarios))
            meta["metrics"] = res.as_dict()
        export_checkpoint(trainer.module, cfg.out_dir / variant / "model", enc.item_ids, meta)
        print(f"checkpoint: {cfg.out_dir / variant / 'model'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="redrec", description="RED-Rec: cross-scenario recommender platform")
    sub = p.add_subparsers(dest="command", required=True)

    d = sub.add_parser("data", help="inspect datasets")
    dsub = d.add_subparsers(dest="data_command", required=True)
    dd = dsub.add_parser("describe", help="load a dataset and print its size and load report")
    dd.add_argument("--dataset", default="movielens-1m")
    dd.set_defaults(func=cmd_describe)

    for name, func, hlp in (
        ("quality", cmd_quality, "train RED-Rec and the baselines, print the full-ranking table"),
        ("train", cmd_train, "train one variant (the last in --variants) and export a serving checkpoint"),
    ):
        q = sub.add_parser(name, help=hlp)
        q.add_argument("--config", help="YAML with ExperimentConfig fields (dataset, model, train, ...)")
        q.add_argument("--dataset")
        q.add_argument("--epochs", type=int)
        q.add_argument("--variants", help="comma-separated: sasrec,single-scenario,redrec")
        q.add_argument("--out-dir", dest="out_dir")
        if name == "quality":
            q.add_argument("--output", help="write the results JSON here")
        else:
            q.add_argument("--meta", help="JSON file merged into the checkpoint's config.json (a pipeline's version "
                                          "and lineage: a TrainJob's checkpoint then has the in-process layout)")
        q.set_defaults(func=func)
    _register_plugins(sub)
    return p


# Platform subcommands live next to the code they drive; each module exposes register(subparsers).
_PLUGIN_MODULES = (
    "redrec.features.cli",
    "redrec.index.cli",
    "redrec.serving.cli",
    "redrec.experiments.cli",
    "redrec.drift.cli",
    "redrec.pipeline.cli",
    "redrec.release.cli",
    "redrec.items.cli",
)


def _register_plugins(sub) -> None:
    import importlib

    for name in _PLUGIN_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that part of the platform is not installed in this checkout
            raise
        mod.register(sub)


def main(argv: list[str] | None = None) -> int:
    _setup_env()
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
