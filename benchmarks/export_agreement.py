"""How closely each export (TFLite, ONNX; float and quantised) reproduces a trained Keras model.

Runs ``tumorseg.export.export_model`` for every format x quantisation with the gate disabled
(``min_dice=0``) and collects the check results: mask Dice against the Keras model (mean, min,
pooled), tumour/no-tumour disagreements, file size and ms/image. These measurements are what the
Dice bounds in ``tumorseg.export.DICE_BOUNDS`` are chosen from (with a margin).

    python benchmarks/export_agreement.py --model models/unet.keras --calibration data/prepared/test/images

Writes ``benchmarks/results/export_agreement.json`` (one row per export; ``--out`` to change).
Use a *trained* model: an untrained one has most pixels near the threshold and says nothing.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, load_average, machine_info, quiet_environment  # noqa: E402

quiet_environment()

VARIANTS = [("tflite", "none"), ("tflite", "float16"), ("tflite", "dynamic"), ("tflite", "int8"), ("onnx", "none"), ("onnx", "dynamic"), ("onnx", "int8")]
KEEP = (
    "format",
    "quantize",
    "images",
    "dice_mean",
    "dice_min",
    "dice_pooled",
    "tumour_call_disagreements",
    "max_abs_probability_difference",
    "size_mb",
    "ms_per_image_export",
    "ms_per_image_keras",
    "sample_images",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, action="append", help="a trained .keras file (repeat for several)")
    parser.add_argument("--calibration", default=None, help="folder of sample images (default: synthetic phantoms)")
    parser.add_argument("--samples", type=int, default=32, help="sample images (default: %(default)s)")
    parser.add_argument("--only", nargs="+", default=None, help="FORMAT:QUANTIZE variants to run, e.g. tflite:int8")
    parser.add_argument("--out", default=str(RESULTS_DIR / "export_agreement.json"))
    args = parser.parse_args(argv)

    from tumorseg.export import DICE_BOUNDS, export_model
    from tumorseg.io import atomic_write_json

    variants = [tuple(v.split(":")) for v in args.only] if args.only else VARIANTS
    load_start, rows = load_average(), []
    with tempfile.TemporaryDirectory(prefix="tumorseg-agreement-") as scratch:
        for model in args.model:
            for fmt, quantize in variants:
                started = time.perf_counter()
                result = export_model(
                    model,
                    fmt,
                    Path(scratch) / f"{Path(model).stem}-{quantize}.{fmt}",
                    quantize=quantize,
                    calibration_dir=args.calibration,
                    sample_count=args.samples,
                    min_dice=0.0,
                )
                row = {"model": model, **{key: result.check[key] for key in KEEP}, "current_bound": DICE_BOUNDS[quantize]}
                rows.append(row)
                print(f"{Path(model).name} {fmt:6s} {quantize:8s} Dice mean {row['dice_mean']:.4f} min {row['dice_min']:.4f} "
                      f"pooled {row['dice_pooled']:.4f}  {row['size_mb']:.2f} MB  {row['ms_per_image_export']:.1f} ms/image "
                      f"({time.perf_counter() - started:.0f} s)", flush=True)
    atomic_write_json(
        args.out,
        {"benchmark": "export_agreement", "load_avg_start": load_start, "load_avg_end": load_average(), "machine": machine_info(), "rows": rows},
    )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
