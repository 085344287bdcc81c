"""DVC stage `evaluate`: score every trained model, and their ensemble, on the untouched test split."""

import argparse
import sys
from pathlib import Path

from tumorseg.config import MODEL_NAMES, load_config
from tumorseg.console import friendly_errors, setup_logging
from tumorseg.pipeline.evaluate import evaluate_step


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--raw", type=Path, default=Path("data/raw"), help="raw data (original masks, labels.csv)")
    parser.add_argument("--models-dir", type=Path, default=Path("models"))
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"))
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"))
    args = parser.parse_args()
    evaluate_step(
        load_config(args.params),
        args.models,
        prepared_dir=args.prepared,
        models_dir=args.models_dir,
        metrics_dir=args.metrics_dir,
        reports_dir=args.reports_dir,
        raw_dir=args.raw,
        params_path=args.params,
    )
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
