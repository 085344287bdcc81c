"""DVC stage `prepare`: pair-validate, resize and split data/raw into data/prepared."""

import argparse
import sys
from pathlib import Path

from tumorseg.config import load_config
from tumorseg.console import friendly_errors, setup_logging, show_progress
from tumorseg.pipeline.prepare import prepare_from_raw, write_prepare_metrics


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--raw", type=Path, default=Path("data/raw"))
    parser.add_argument("--out", type=Path, default=Path("data/prepared"))
    parser.add_argument("--metrics", type=Path, default=Path("metrics/prepare.json"), help="the numbers of report.json, for dvc metrics show")
    args = parser.parse_args()
    report = prepare_from_raw(load_config(args.params), args.raw, args.out, progress=show_progress())
    write_prepare_metrics(report, args.metrics)
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
