"""DVC stages `train_unet` / `train_umobilenetv2`: train one model, track it in MLflow.

Killed mid-run? Run it again: it resumes from the last completed epoch into the same MLflow run.
"""

import argparse
import sys
from pathlib import Path

from tumorseg.config import MODEL_NAMES, load_config
from tumorseg.console import friendly_errors, setup_logging, show_progress
from tumorseg.pipeline.train import train_step


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", required=True, choices=MODEL_NAMES)
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--augmented", type=Path, default=Path("data/augmented"))
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"))
    args = parser.parse_args()
    train_step(
        load_config(args.params),
        args.model,
        prepared_dir=args.prepared,
        augmented_dir=args.augmented,
        models_dir=args.models_dir,
        metrics_dir=args.metrics_dir,
        params_path=args.params,
        progress=show_progress(),
    )
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
