"""DVC stage `augment`: augmented copies of the training split (data/augmented) + preview grid."""

import argparse
import sys
from pathlib import Path

from tumorseg.config import load_config
from tumorseg.console import friendly_errors, setup_logging, show_progress
from tumorseg.pipeline.augment import augment_step


@friendly_errors
def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--prepared", type=Path, default=Path("data/prepared"))
    parser.add_argument("--out", type=Path, default=Path("data/augmented"))
    parser.add_argument("--preview", type=Path, default=Path("reports/augment_preview.png"))
    args = parser.parse_args()
    augment_step(load_config(args.params), args.prepared, args.out, args.preview, progress=show_progress())
    return 0


if __name__ == "__main__":
    setup_logging()
    sys.exit(main())
