"""DVC stage `compare`: the comparison report, JSON metric and bar chart of both models and their ensemble."""

import argparse
import sys
from pathlib import Path

from tumorseg.config import MODEL_NAMES
from tumorseg.console import friendly_errors, setup_logging
from tumorseg.pipeline.compare import compare_step


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--models", nargs="+", default=list(MODEL_NAMES))
    parser.add_argument("--metrics-dir", type=Path, default=Path("metrics"))
    parser.add_argument("--reports-dir", type=Path, default=Path("reports"))
    args = parser.parse_args()
    compare_step(args.models, metrics_dir=args.metrics_dir, reports_dir=args.reports_dir)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
