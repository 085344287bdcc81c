"""DVC stage `download`: raw image/mask pairs from data.source into data/raw (+ SOURCE.json)."""

import argparse
import sys
from pathlib import Path

from tumorseg.config import load_config
from tumorseg.console import friendly_errors, setup_logging, show_progress
from tumorseg.pipeline.download import download_step


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", type=Path, default=Path("data/raw"))
    args = parser.parse_args()
    download_step(load_config(args.params), args.out, progress=show_progress())
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
