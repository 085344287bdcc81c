"""The ``tumorseg`` command: one entry point, one sub-command per user-facing operation.

Sub-commands call the same functions as the DVC stages (``tumorseg.pipeline.*``); settings not given
on the command line come from ``params.yaml`` (``--params``), or the documented defaults when the
file is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from tumorseg import __version__
from tumorseg.config import DEFAULT_PARAMS, MODEL_NAMES, Config, DataConfig, check_image_size, load_config
from tumorseg.console import UsageError, friendly_errors, setup_logging, show_progress


def _config(args: argparse.Namespace) -> Config:
    """The settings, loaded by :func:`main` into ``args.config`` before the command runs."""
    path = Path(args.params)
    if not path.exists() and args.params == str(DEFAULT_PARAMS):
        return Config()  # outside a project: the documented defaults (identical to params.yaml's)
    return load_config(path)


def cmd_synth(args: argparse.Namespace) -> int:
    from tumorseg.data.sources import write_synthetic_source

    sequences = tuple(name for name in (args.sequences or "").split(",") if name)
    if args.nifti:
        from tumorseg.data.synthetic import write_sequence_volumes
        from tumorseg.io import atomic_directory

        with atomic_directory(args.out) as staging:
            cases = write_sequence_volumes(staging, args.count, args.size, args.seed, sequences or ("t1ce",), progress=show_progress())
        print(f"wrote {len(cases)} synthetic NIfTI cases ({', '.join(sequences or ('t1ce',))} and seg) to {args.out}")
        return 0
    info = write_synthetic_source(args.out, count=args.count, size=args.size, seed=args.seed, sequences=sequences, progress=show_progress())
    kind = f"{len(sequences)}-sequence slices ({', '.join(sequences)})" if sequences else "image/mask pairs"
    print(f"wrote {info.n_images} synthetic {kind} to {args.out} (hash {info.data_hash[:12]})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from tumorseg.pipeline.download import download_step

    download_step(args.config, Path(args.out), progress=show_progress())
    return 0


def cmd_prepare(args: argparse.Namespace) -> int:
    from tumorseg.data.sources import folder_record
    from tumorseg.pipeline.prepare import prepare_step

    images, masks = Path(args.images), Path(args.masks)
    report = prepare_step(
        args.config,
        images,
        masks,
        Path(args.out),
        progress=show_progress(),
        size=args.size,
        on_error=args.on_error,
        mask_suffix=args.mask_suffix,
        report_extra=folder_record(images, masks),
    )
    print(f"{report.valid_pairs} valid pairs, {len(report.skipped)} skipped -> {args.out}")
    for item in report.skipped[:20]:
        print(f"  skipped {item['file']}: {item['reason']} ({item['detail']})")
    if len(report.skipped) > 20:
        print(f"  ... {len(report.skipped) - 20} more in {Path(args.out) / 'report.json'}")
    return 0


def cmd_augment(args: argparse.Namespace) -> int:
    from tumorseg.pipeline.augment import augment_step

    augment_step(args.config, Path(args.prepared), Path(args.out), Path(args.preview), progress=show_progress())
    return 0


def cmd_pretrain(args: argparse.Namespace) -> int:
    from tumorseg.pipeline.pretrain import pretrain_step

    cfg = args.config
    out = Path(args.out or f"pretrained/{args.model}.keras")
    summary = pretrain_step(cfg, args.model, prepared_dir=Path(args.prepared), out_path=out, params_path=Path(args.params), progress=show_progress())
    print(
        f"{args.model}: restoration loss (MAE) on validation images {summary['first_val_loss']:.4f} after epoch 1 -> "
        f"{summary['best_val_loss']:.4f} at epoch {summary['best_epoch']} -> {out}\n"
        f"start training from it: dvc exp run -S train.init_from.{args.model}={out}"
    )
    return 0


def cmd_results(args: argparse.Namespace) -> int:
    from tumorseg.experiments import experiment_rows, format_table

    print(format_table(experiment_rows(Path(args.repo), args.models, include_all=args.all_commits)))
    return 0


def cmd_check_metrics(args: argparse.Namespace) -> int:
    from tumorseg.gates import check_metrics, format_checks

    cfg = args.config
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


def cmd_predict(args: argparse.Namespace) -> int:
    from tumorseg.inference import Predictor, list_inputs, predict_files
    from tumorseg.io import check_separate

    if args.batch_size < 1 or args.max_pixels < 1:
        print("error: --batch-size and --max-pixels must be at least 1", file=sys.stderr)
        return 2
    settings = _inference_settings(args, args.model)
    check_separate(args.out, args.inputs, what="--out")  # masks written among the inputs could overwrite them
    predictor = Predictor.load(
        args.model, threshold=settings.threshold, tta=settings.tta, batch_size=args.batch_size, min_component_px=settings.min_component_px
    )
    listing = list_inputs(args.inputs, predictor.sequences)
    if not listing.count and not listing.problems:
        if predictor.sequences:
            wanted = f"slices (images in {', '.join(f'{s}/' for s in predictor.sequences)} sub-folders) or <case>_<sequence>.nii.gz volumes"
        else:
            wanted = "images (PNG, JPEG, BMP, TIFF) or NIfTI volumes"
        print(f"error: no {wanted} found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    report = predict_files(
        predictor, listing, Path(args.out), max_pixels=args.max_pixels, missing_sequences=settings.missing_sequences, progress=show_progress()
    )
    tumours = sum(1 for row in report.rows if row["tumour_present"] is True)
    ignored = f"; {report.ignored} non-image file(s) ignored" if report.ignored else ""
    print(f"{report.succeeded} image(s) segmented, {tumours} with a tumour -> {args.out} ({report.csv_path.name}){ignored}")
    failed = report.failed
    for row in failed[:20]:
        print(f"  skipped {row['file']}: {row['reason']}", file=sys.stderr)
    if len(failed) > 20:
        print(f"  ... {len(failed) - 20} more in {report.csv_path}", file=sys.stderr)
    if failed and not report.succeeded:
        print(f"error: none of the {len(failed)} input(s) could be read (reasons above and in {report.csv_path})", file=sys.stderr)
        return 2
    if failed:
        print(f"error: {len(failed)} of {len(report.rows)} inputs could not be read and were skipped (reasons in {report.csv_path})", file=sys.stderr)
        return 1
    return 0


def _inference_settings(args: argparse.Namespace, models: str | list[str]):
    """Threshold, blob filter, TTA and missing-sequence handling: each flag given on the command
    line, else the model card's value (``<model>.card.json``), else the default."""
    from tumorseg.inference.cards import merge, settings_for

    card, note = settings_for(models if isinstance(models, list) else [models])
    given = {key: getattr(args, key, None) for key in ("threshold", "tta", "min_component_px", "missing_sequences")}
    try:
        chosen = merge(card, **given)
    except ValueError as exc:
        raise UsageError(f"--{str(exc).replace('_', '-')}") from None
    if note:
        overridden = [f"--{key.replace('_', '-')}" for key, value in given.items() if value is not None]
        print(note + (f" ({', '.join(overridden)} from the command line)" if overridden else ""), file=sys.stderr)
    return chosen


def cmd_export(args: argparse.Namespace) -> int:
    from tumorseg.export import export_model

    result = export_model(
        args.model,
        args.format,
        Path(args.out),
        quantize=args.quantize,
        calibration_dir=args.calibration,
        sample_count=args.samples,
        min_dice=args.min_dice,
    )
    c = result.check
    print(
        f"wrote {result.path} ({c['size_mb']:.2f} MB, {args.format}, quantize {args.quantize}): mask Dice vs Keras "
        f"mean {c['dice_mean']:.4f} (min {c['dice_min']:.4f}, bound {c['min_dice']}) on {c['images']} images; "
        f"{c['ms_per_image_export']:.1f} ms/image vs Keras {c['ms_per_image_keras']:.1f}; check -> {result.check_path}"
    )
    return 0


def cmd_register(args: argparse.Namespace) -> int:
    from tumorseg import tracking

    model = None
    if args.model:
        from tumorseg.inference import open_keras_model

        model = open_keras_model(args.model)
    info = tracking.register_model(args.name, run_id=args.run_id, model_id=args.model_id, model=model, uri=args.tracking_uri, alias=args.alias)
    use = info.get("alias_uri", info["model_uri"])
    print(f"registered {info['source']} as {info['name']} version {info['version']}: use --model {use}")
    return 0


def cmd_explain(args: argparse.Namespace) -> int:
    from tumorseg.explain import LayerNotFoundError, explain_files
    from tumorseg.inference import Predictor
    from tumorseg.io import check_separate

    settings = _inference_settings(args, args.model)
    check_separate(args.out, args.inputs, what="--out")
    predictor = Predictor.load(args.model, threshold=settings.threshold, tta=settings.tta, min_component_px=settings.min_component_px)
    if predictor.model is None:
        print(f"error: {args.model}: Grad-CAM needs the Keras model (.keras or an MLflow URI), not an exported file", file=sys.stderr)
        return 1
    try:
        report = explain_files(args.inputs, predictor, Path(args.out), layer=args.layer, missing_sequences=settings.missing_sequences, progress=show_progress())
    except LayerNotFoundError as exc:
        print(f"error: --layer: {exc}", file=sys.stderr)
        return 1
    ignored = f"; {report.ignored} non-image file(s) ignored" if report.ignored else ""
    print(f"{len(report.written)} Grad-CAM panel(s) -> {args.out} (<name>_gradcam.png){ignored}")
    for name, reason in report.skipped[:20]:
        print(f"  skipped {reason if reason.startswith(name) else name + ': ' + reason}", file=sys.stderr)
    if len(report.skipped) > 20:
        print(f"  ... and {len(report.skipped) - 20} more", file=sys.stderr)
    if not report.written:
        print("error: no input could be explained" if report.skipped else f"error: no images found in {' '.join(args.inputs)}", file=sys.stderr)
        return 2
    return 1 if report.skipped else 0


def cmd_serve(args: argparse.Namespace) -> int:
    from tumorseg.explain import LayerNotFoundError
    from tumorseg.inference import Predictor
    from tumorseg.serve import create_app, run_server

    if (
        args.max_upload_mb <= 0
        or not 0 < args.port < 65536
        or min(args.workers, args.retry_after, args.max_pixels) < 1
        or args.queue_limit < 0
    ):
        raise UsageError(
            "--max-upload-mb must be positive, --port in 1..65535, "
            "--workers, --retry-after and --max-pixels at least 1, --queue-limit at least 0"
        )
    settings = _inference_settings(args, args.model)
    predictor = Predictor.load(args.model, threshold=settings.threshold, tta=settings.tta, min_component_px=settings.min_component_px)  # once, for all requests
    try:
        app = create_app(
            predictor, model_name=Path(args.model).name, gradcam_layer=args.layer, max_upload_mb=args.max_upload_mb,
            max_pixels=args.max_pixels, workers=args.workers, queue_limit=args.queue_limit, retry_after_s=args.retry_after,
        )
    except (LayerNotFoundError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"serving {args.model} on http://{args.host}:{args.port}/ (Ctrl-C to stop)", file=sys.stderr)
    run_server(app, host=args.host, port=args.port)
    return 0


def cmd_server(args: argparse.Namespace) -> int:
    from tumorseg import server

    root = Path(args.dir)
    if args.action == "start":
        if (args.port is not None and not 0 < args.port < 65536) or args.workers < 1 or args.timeout <= 0:
            raise UsageError("--port must be in 1..65535, --workers at least 1, --timeout positive")
        warning = server.exposure_warning(args.host)
        if warning:
            print(f"warning: {warning}", file=sys.stderr)
        try:
            started = server.start(root, host=args.host, port=args.port, workers=args.workers, timeout=args.timeout)
        except server.ServerError as exc:
            for line in getattr(exc, "details", []):  # the log's last lines, before the one-line error
                print(f"  | {line}", file=sys.stderr)
            raise
        for note in started.notes:
            print(note, file=sys.stderr)
        found = started.status
        where = server.layout(root)
        print(
            f"MLflow tracking server {'already running' if started.already_running else 'started'}: {started.uri} (pid {found.mlflow_pid}), "
            f"backend PostgreSQL on {server.LOOPBACK}:{found.postgres_port} (pid {found.postgres_pid}, data in {where.pgdata}), "
            f"artifacts in {where.artifacts}, logs in {where.logs}; stop it with: tumorseg server stop",
            file=sys.stderr,
        )
        if args.host in ("0.0.0.0", "::") and not started.already_running:
            print(f"on other machines: export MLFLOW_TRACKING_URI={server.tracking_uri_for(server.host_name(), found.mlflow_port)}", file=sys.stderr)
        print(f"export MLFLOW_TRACKING_URI={started.uri}")  # stdout alone: eval "$(tumorseg server start)"
        return 0
    if args.action == "stop":
        stopped = server.stop(root)
        print(f"stopped {' and '.join(stopped.stopped)}; no process of theirs is left" if stopped.stopped else f"not running (nothing to stop in {root})")
        return 0
    found = server.status(root)
    if found.running:
        print(f"running: {found.uri} (MLflow pid {found.mlflow_pid}; PostgreSQL pid {found.postgres_pid} on {server.LOOPBACK}:{found.postgres_port})")
        print(f"export MLFLOW_TRACKING_URI={found.uri}")
        return 0
    last = f"; last URI {found.uri}" if found.uri else ""
    print(f"not running ({'; '.join(found.problems)}){last}: tumorseg server start")
    return 3


def cmd_config(args: argparse.Namespace) -> int:
    cfg = args.config
    for key, value in cfg.flat().items():
        print(f"{key} = {value}")
    return 0


CARD_DEFAULT = " (default: the model card's, weights/<name>.card.json, else %s)"


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
    p.add_argument("--sequences", default="", metavar="A,B,...", help="multi-sequence phantoms, e.g. t1,flair,t1ce: DIR/<sequence>/*.png + DIR/masks/")
    p.add_argument("--nifti", action="store_true", help="write NIfTI volumes DIR/caseNNN_<sequence>.nii.gz + caseNNN_seg.nii.gz instead")

    p = add("download", cmd_download, "fetch raw pairs from the source in params (data.source) into a folder")
    p.add_argument("--out", default="data/raw", help="output folder (default: %(default)s)")

    p = add("prepare", cmd_prepare, "pair-validate, resize and split image/mask pairs")
    p.add_argument("--images", required=True, help="folder of images")
    p.add_argument("--masks", required=True, help="folder of masks (same file names)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--size", type=int, default=None, help="output side in pixels, a multiple of 32 up to 2048 (default: image_size from params)")
    p.add_argument("--on-error", choices=("skip", "fail"), default=None, help="skip bad pairs (default) or stop at the first")
    p.add_argument("--mask-suffix", default=None, help="mask name = image stem + suffix (default: data.mask_suffix)")

    p = add("augment", cmd_augment, "write augmented copies of the training split and a preview grid")
    p.add_argument("--prepared", default="data/prepared", help="prepared data folder (default: %(default)s)")
    p.add_argument("--out", default="data/augmented", help="output folder (default: %(default)s)")
    p.add_argument("--preview", default="reports/augment_preview.png", help="preview grid PNG (default: %(default)s)")

    p = add(
        "pretrain",
        cmd_pretrain,
        "self-supervised pretraining without ImageNet: restore training images with blanked patches (pretrain.* in params), for train.init_from.<model>",
    )
    p.add_argument("model", choices=MODEL_NAMES, help="the network to pretrain (built from models.<model> in params)")
    p.add_argument("--prepared", default="data/prepared", help="prepared data folder (default: %(default)s); masks are never used")
    p.add_argument("--out", default=None, help="output .keras file (default: pretrained/<model>.keras)")

    p = add("check-metrics", cmd_check_metrics, "gate: evaluate metrics vs ci thresholds in params.yaml and an optional baseline")
    p.add_argument("--metrics-dir", default="metrics", help="folder with evaluate_<model>.json (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    p.add_argument("--baseline", default=None, help="baseline folder with evaluate_<model>.json (default: ci.baseline_dir)")

    p = add("results", cmd_results, "DVC experiments as one table: changed params, each model's test Dice/IoU/HD95, data source", params=False)
    p.add_argument("--repo", default=".", help="the project folder (default: %(default)s)")
    p.add_argument("--models", nargs="+", default=[*MODEL_NAMES, "ensemble"], help="(default: %(default)s)")
    p.add_argument("--all-commits", action="store_true", help="experiments of every commit, not only HEAD's")

    p = add("study", cmd_study, "all tracked runs: validation-Dice curves on one chart and an ablation table", params=False)
    p.add_argument("--out", default="reports/study", help="output folder (default: %(default)s)")
    p.add_argument("--data-source", choices=("real", "synthetic"), default=None, help="only runs on this kind of data")
    p.add_argument("--model", choices=MODEL_NAMES, default=None, help="only this model's runs")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")

    p = add("predict", cmd_predict, "segment images, folders (recursive) or zip archives: <stem>_mask.png, <stem>_overlay.png, predictions.csv", params=False)
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="image files, folders or .zip archives; NIfTI volumes; for a multi-sequence model, folders holding <sequence>/ sub-folders",
    )
    p.add_argument(
        "--model",
        required=True,
        action="append",
        help="a .keras/.tflite/.onnx file, runs:/<run id>/model or models:/<name>/<version>; give --model twice or more to average the models (an ensemble)",
    )
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--threshold", type=float, default=None, help=f"tumour where probability > threshold{CARD_DEFAULT % 0.5}")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=f"flip test-time augmentation (image and mirror){CARD_DEFAULT % 'off'}")
    p.add_argument("--min-component-px", type=int, default=None, help=f"drop predicted blobs smaller than this many pixels{CARD_DEFAULT % 0}")
    p.add_argument("--batch-size", type=int, default=8, help="images per model call (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images (default: %(default)s)")
    p.add_argument(
        "--missing-sequences",
        choices=("skip", "fill"),
        default=None,
        help=f"multi-sequence models: a slice or case without one of the model's sequences is skipped, or predicted with zeros there{CARD_DEFAULT % 'skip'}",
    )

    p = add("export", cmd_export, "export a .keras model to TFLite or ONNX and check it against the Keras model", params=False)
    p.add_argument("--model", required=True, help="a .keras file or an MLflow model URI")
    p.add_argument("--format", required=True, choices=("tflite", "onnx"))
    p.add_argument("--out", required=True, help="output file (the check goes to <out>.check.json)")
    p.add_argument("--quantize", choices=("none", "float16", "dynamic", "int8"), default="none", help="(default: %(default)s; onnx: none, dynamic, int8)")
    p.add_argument("--calibration", default=None, metavar="DIR", help="images for int8 calibration and the check (default: synthetic phantoms)")
    p.add_argument("--samples", type=int, default=16, help="number of sample images (default: %(default)s)")
    p.add_argument("--min-dice", type=float, default=None, help="override the check's Dice bound (default: per quantisation)")

    p = add("register", cmd_register, "register a model version in the MLflow model registry", params=False)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--run-id", default=None, help="a training run whose logged model (runs:/<id>/model) to register")
    source.add_argument("--model-id", default=None, help="a logged model (models:/<id>, the Models tab's id) to register")
    source.add_argument("--model", default=None, help="a .keras file: logged into a new run, then registered")
    p.add_argument("--name", required=True, help="registered model name")
    p.add_argument("--alias", default=None, help="point this alias (e.g. champion) at the version: --model models:/<name>@<alias>")
    p.add_argument("--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI or ./mlflow.db)")

    p = add("explain", cmd_explain, "Seg-Grad-CAM: <stem>_gradcam.png = prediction overlay beside the Grad-CAM heat map", params=False)
    p.add_argument(
        "inputs", nargs="+", metavar="INPUT", help="image files, folders or .zip archives; per-sequence folders for a multi-sequence model (as for predict)"
    )
    p.add_argument("--model", required=True, help="a .keras file, runs:/<run id>/model or models:/<name>/<version>")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--layer", default=None, help="layer to explain (default: the stride-2 decoder stage, see tumorseg.explain); a wrong name lists the choices")
    p.add_argument("--threshold", type=float, default=None, help=f"tumour where probability > threshold{CARD_DEFAULT % 0.5}")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=f"flip test-time augmentation for the mask{CARD_DEFAULT % 'off'}")
    p.add_argument("--min-component-px", type=int, default=None, help=f"as for predict{CARD_DEFAULT % 0}")
    p.add_argument("--missing-sequences", choices=("skip", "fill"), default=None, help=f"as for predict{CARD_DEFAULT % 'skip'}")

    p = add("serve", cmd_serve, "web app and JSON API: upload a slice, see the outline, Grad-CAM, area and confidence", params=False)
    p.add_argument("--model", required=True, help="a .keras/.tflite/.onnx file, runs:/<run id>/model or models:/<name>/<version>")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    p.add_argument("--max-upload-mb", type=float, default=20.0, help="larger uploads get HTTP 413 (default: %(default)s)")
    p.add_argument("--layer", default=None, help="Grad-CAM layer (default: the stride-2 decoder stage, see tumorseg.explain)")
    p.add_argument("--threshold", type=float, default=None, help=f"tumour where probability > threshold{CARD_DEFAULT % 0.5}")
    p.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None, help=f"flip test-time augmentation{CARD_DEFAULT % 'off'}")
    p.add_argument("--min-component-px", type=int, default=None, help=f"as for predict{CARD_DEFAULT % 0}")
    p.add_argument("--workers", type=int, default=1, help="uploads analysed at once (default: %(default)s)")
    p.add_argument("--queue-limit", type=int, default=8, help="uploads waiting beyond those; more get HTTP 503 with Retry-After (default: %(default)s)")
    p.add_argument("--retry-after", type=int, default=5, help="seconds a 503 asks the client to wait (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=40_000_000, help="refuse larger images (default: %(default)s)")

    p = add("server", cmd_server, "a team MLflow tracking server on PostgreSQL in a project folder: start | stop | status", params=False)
    actions = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    folder = argparse.ArgumentParser(add_help=False)
    folder.add_argument("--dir", default=".mlflow-server", help="state folder: pgdata/, artifacts/, logs/, server.json (default: %(default)s)")
    s = actions.add_parser(
        "start", parents=[folder], help="start PostgreSQL and mlflow server (if not running); print the MLFLOW_TRACKING_URI to export",
        description="Start PostgreSQL (loopback, a free port) and mlflow server with it as backend store and DIR/artifacts as served "
        "artifact store; wait for /health; print `export MLFLOW_TRACKING_URI=...` on stdout (eval \"$(tumorseg server start)\").",
    )  # fmt: skip
    s.add_argument("--host", default="127.0.0.1", help="address the MLflow server binds to (default: %(default)s; it has no authentication)")
    s.add_argument("--port", type=int, default=None, help="the MLflow server's port (default: the previous one if free, else a free one)")
    s.add_argument("--workers", type=int, default=2, help="MLflow server worker processes (default: %(default)s)")
    s.add_argument("--timeout", type=float, default=180.0, help="seconds to wait for /health (default: %(default)s)")
    actions.add_parser("stop", parents=[folder], help="stop the MLflow server's process group and PostgreSQL; check nothing is left")
    actions.add_parser("status", parents=[folder], help="running or not, URI and ports (exit code 3 when not running)")

    add("config", cmd_config, "validate params.yaml and print the resolved settings (profile applied)")
    return parser


def _check_arguments(args: argparse.Namespace) -> None:
    """Bad option values, found before any work starts (and before 100000² images fill memory)."""
    if args.command == "synth":
        for name, value, low, high in (("--count", args.count, 1, 1_000_000), ("--size", args.size, 16, 8192)):
            if not low <= value <= high:
                raise UsageError(f"{name} must be between {low} and {high}, got {value}")
        sequences = [name for name in args.sequences.split(",") if name]
        try:
            DataConfig(sequences=sequences)
        except ValueError as exc:
            raise UsageError(f"--sequences {args.sequences!r}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    if args.command == "prepare" and args.size is not None:
        try:
            check_image_size(args.size)
        except ValueError as exc:
            raise UsageError(f"--size {exc}") from None


def _run(args: argparse.Namespace) -> int:
    _check_arguments(args)
    if hasattr(args, "params"):
        args.config = _config(args)  # a bad params file is refused before the command starts
    return args.func(args)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(args.verbose)
    try:
        code = friendly_errors(_run)(args)
        sys.stdout.flush()  # what is still buffered for a reader that left fails here, not at exit
        return code
    except BrokenPipeError:  # `tumorseg config | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 1


if __name__ == "__main__":
    sys.exit(main())
