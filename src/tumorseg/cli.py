"""The ``tumorseg`` command: one entry point, one sub-command per user-facing operation.

Sub-commands call the same functions as the DVC stages (``tumorseg.pipeline``); settings not given
on the command line come from ``params.yaml`` (``--params``), or the documented defaults when the
file is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tumorseg import __version__
from tumorseg.config import DEFAULT_PARAMS, Config, load_config
from tumorseg.console import friendly_errors, setup_logging, show_progress


def _config(args: argparse.Namespace) -> Config:
    path = Path(args.params)
    if not path.exists() and args.params == str(DEFAULT_PARAMS):
        return Config()  # outside a project: the documented defaults (identical to params.yaml's)
    return load_config(path)


def cmd_synth(args: argparse.Namespace) -> int:
    from tumorseg.data.sources import write_synthetic_source

    info = write_synthetic_source(args.out, count=args.count, size=args.size, seed=args.seed, progress=show_progress())
    print(f"wrote {info.n_images} synthetic image/mask pairs to {args.out} (hash {info.data_hash[:12]})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from tumorseg.pipeline import download_step

    download_step(_config(args), Path(args.out), progress=show_progress())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tumorseg.pipeline import prepare_step

    report = prepare_step(
        _config(args),
        Path(args.images),
        Path(args.masks),
        Path(args.out),
        progress=show_progress(),
        size=args.size,
        on_error=args.on_error,
        mask_suffix=args.mask_suffix,
    )
    print(f"{report.valid_pairs} valid pairs, {len(report.skipped)} skipped -> {args.out}")
    for item in report.skipped[:20]:
        print(f"  skipped {item['file']}: {item['reason']} ({item['detail']})")
    if len(report.skipped) > 20:
        print(f"  ... {len(report.skipped) - 20} more in {Path(args.out) / 'report.json'}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from tumorseg.pipeline import augment_step

    augment_step(_config(args), Path(args.prepared), Path(args.out), Path(args.preview), progress=show_progress())
    return 0


def cmd_check_metrics(args: argparse.Namespace) -> int:
    from tumorseg.gates import check_metrics, format_checks

    cfg = _config(args)
    baseline = args.baseline or cfg.ci.baseline_dir
    checks = check_metrics(
        Path(args.metrics_dir),
        models=args.models,
        profile=cfg.profile,
        min_dice=cfg.ci.min_dice,
        baseline_dir=Path(baseline) if baseline else None,
        max_regression=cfg.ci.max_regression,
    )
    print(format_checks(checks))
    failed = [c for c in checks if not c.passed]
    print(f"\nmetric gate: {'FAILED (' + str(len(failed)) + ' check(s))' if failed else 'passed'} (profile {cfg.profile})")
    return 1 if failed else 0


def cmd_study(args: argparse.Namespace) -> int:
    from tumorseg.study import select_runs, write_study
    from tumorseg.tracking import study_runs

    runs = select_runs(study_runs(args.tracking_uri), data_source=args.data_source, model=args.model)
    if not runs:
        print("no finished training runs in the MLflow store match (see --data-source / --model)", file=sys.stderr)
        return 1
    label = {"real": "real MRI", "synthetic": "SYNTHETIC phantoms"}.get(args.data_source or "", "all data")
    chart, table = write_study(runs, Path(args.out), title=f"Study: {len(runs)} training runs on {label}")
    print(f"{len(runs)} runs -> {table}, {chart}")
    return 0


def cmd_config(args: argparse.Namespace) -> int:
    cfg = _config(args)
    for key, value in cfg.flat().items():
        print(f"{key} = {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tumorseg", description="Brain-tumour MRI segmentation: data, models, pipeline.")
    parser.add_argument("--version", action="version", version=f"tumorseg {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add(name: str, func, help_text: str, params: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        if params:
            p.add_argument("--params", default=str(DEFAULT_PARAMS), help="params file (default: %(default)s)")
        p.set_defaults(func=func)
        return p

    p = add("synth", cmd_synth, "write synthetic MRI-like phantoms: DIR/images/*.png and DIR/masks/*.png", params=False)
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--count", type=int, default=100, help="number of pairs (default: %(default)s)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default: %(default)s)")
    p.add_argument("--seed", type=int, default=42, help="random seed (default: %(default)s)")

    p = add("download", cmd_download, "fetch raw pairs from the source in params (data.source) into a folder")
    p.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")

    p = add("prepare", cmd_prepare, "pair-validate, resize and split image/mask pairs")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks (same file names)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=None, help="output side in pixels (default: image_size from params)")
    p.add_argument("--on-error", choices=("skip", "fail"), default=None, help="skip bad pairs (default) or stop at the first")
    p.add_argument("--mask-suffix", default=None, help="mask name = image stem + suffix (default: data.mask_suffix)")

    p = add("augment", cmd_augment, "write augmented copies of the training split and a preview grid")
    p.add_argument("--prepared", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="data/augmented", help="output folder (default: %(default)s)")
    p.add_argument("--preview", default="reports/augment_preview.png", help="preview grid PNG (default: %(default)s)")

    p = add("check-metrics", cmd_check_metrics, "gate: evaluate metrics vs ci thresholds in params.yaml and an optional baseline")
    p.add_argument("--metrics-dir", default="metrics", help="folder with evaluate_<model>.json (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=["unet", "umobilenetv2"])
    p.add_argument("--baseline", default=None, help="baseline folder with evaluate_<model>.json (default: ci.baseline_dir)")

    p = add("study", cmd_study, "all tracked runs: validation-Dice curves on one chart and an ablation table", params=False)
    p.add_argument("--out", default="reports/study", help="output folder (default: %(default)s)")
    p.add_argument("--data-source", choices=("real", "synthetic"), default=None, help="only runs on this kind of data")
    p.add_argument("--model", choices=("unet", "umobilenetv2"), default=None, help="only this model's runs")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")

    add("config", cmd_config, "validate params.yaml and print the resolved settings (profile applied)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    if args.command == "synth":
        for name, value, low, high in (("--count", args.count, 1, 1_000_000), ("--size", args.size, 16, 8192)):
            if not low <= value <= high:
                print(f"error: {name} must be between {low} and {high}, got {value}", file=sys.stderr)
                return 2
    return friendly_errors(args.func)(args)


if __name__ == "__main__":
    sys.exit(main())
