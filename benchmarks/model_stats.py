"""Parameters and FLOPs per image of each model (the U-Net ablation variants, the transformer switch) at 256x256.

    python benchmarks/model_stats.py [--size 256]

Uses the model settings in params.yaml; writes benchmarks/results/model_stats.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS_DIR, quiet_environment, untrained_params  # noqa: E402

quiet_environment()

from tumorseg.config import load_config  # noqa: E402
from tumorseg.io import atomic_write_json  # noqa: E402
from tumorseg.models import build_model, model_summary_stats  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "model_stats.json")
    args = parser.parse_args()
    cfg = load_config(args.params)
    unet = untrained_params("unet", cfg=cfg)
    mobile = untrained_params("umobilenetv2", cfg=cfg)
    variants = {
        "unet (HAC + CASPP)": ("unet", unet),
        "unet, HAC only": ("unet", unet | {"use_caspp": False}),
        "unet, CASPP only": ("unet", unet | {"use_hac": False}),
        "unet, plain": ("unet", unet | {"use_hac": False, "use_caspp": False}),
        "unet + 2 transformer layers": ("unet", unet | {"transformer_depth": 2}),
        f"umobilenetv2 (alpha {mobile['alpha']})": ("umobilenetv2", mobile),
        "umobilenetv2 + 2 transformer layers": ("umobilenetv2", mobile | {"transformer_depth": 2}),
    }
    rows = {}
    for label, (name, params) in variants.items():
        stats = model_summary_stats(build_model(name, (args.size, args.size, 1), **params))
        rows[label] = {"params_total": stats["params_total"], "gflops_per_image": round(stats["gflops_per_image"], 3)}
        print(f"{label:32s} {stats['params_total']:>12,d} params  {stats['gflops_per_image']:8.2f} GFLOPs")
    atomic_write_json(args.results, {"input": f"{args.size}x{args.size}x1", "convention": stats["flops_convention"], "models": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
