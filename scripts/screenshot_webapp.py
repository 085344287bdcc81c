"""Screenshot of the web app with a real result: serve the model on loopback, upload one slice in
headless Chromium, wait for the outline, Grad-CAM and numbers, and save the whole page as a PNG.

    python scripts/screenshot_webapp.py --model models/unet.keras \\
        --image ../shared/data/figshare-256/images/1.png --out docs/images/webapp.png

    --model   a .keras/.tflite/.onnx file or an MLflow URI, as for `tumorseg serve --model`
    --image   the slice to upload (PNG, JPEG, BMP or TIFF)
    --out     where the screenshot goes (default: docs/images/webapp.png), written atomically
    --width   browser window width in CSS pixels (default: 1100)

Needs Debian's chromium (`apt-get install chromium`), driven by Playwright (the dev extra); no
browser is downloaded. Use a trained model: a screenshot of an untrained one shows nothing useful.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path

TIMEOUT_MS = 120_000  # a large model's first prediction on a slow CPU


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        raise FileNotFoundError("no chromium on PATH: install Debian's browser with `sudo apt-get install chromium`")
    return path


def screenshot(model: str, image: Path, out: Path, width: int = 1100) -> Path:
    """Serve ``model``, upload ``image`` in the page, save a full-page screenshot to ``out``."""
    from playwright.sync_api import expect, sync_playwright

    from tumorseg.inference import InputImageError, Predictor
    from tumorseg.io import atomic_write_bytes
    from tumorseg.serve import create_app, serve_in_background

    if not image.is_file():
        raise FileNotFoundError(f"image {image} does not exist")
    executable = chromium_path()
    app = create_app(Predictor.load(model), model_name=Path(model).name)
    with serve_in_background(app) as url, sync_playwright() as playwright:
        args = ["--no-sandbox"] if os.geteuid() == 0 else []  # Chromium refuses to run sandboxed as root
        browser = playwright.chromium.launch(executable_path=executable, headless=True, args=args)
        try:
            page = browser.new_page(viewport={"width": width, "height": 800})
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url)
            expect(page.locator("#model-info")).not_to_be_empty()
            page.set_input_files("#file", image)
            page.wait_for_selector("#result:not([hidden]), #error:not([hidden])")
            if page.is_visible("#error"):
                raise InputImageError(f"the app rejected {image}: {page.text_content('#error')}")
            page.wait_for_function("['overlay', 'gradcam'].every(id => document.getElementById(id).complete)")
            png = page.screenshot(full_page=True, type="png")
        finally:
            browser.close()
    return atomic_write_bytes(out, png)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="a .keras/.tflite/.onnx file or an MLflow URI")
    parser.add_argument("--image", required=True, type=Path, help="the slice to upload")
    parser.add_argument("--out", type=Path, default=Path("docs/images/webapp.png"), help="output PNG (default: %(default)s)")
    parser.add_argument("--width", type=int, default=1100, help="window width in CSS pixels (default: %(default)s)")
    args = parser.parse_args(argv)
    from tumorseg.console import friendly_errors

    @friendly_errors
    def run() -> int:
        print(f"wrote {screenshot(args.model, args.image, args.out, args.width)}")
        return 0

    return run()


if __name__ == "__main__":
    sys.exit(main())
