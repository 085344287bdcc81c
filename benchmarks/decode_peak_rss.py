"""Peak memory and time of the worst untrusted images: the decode gate, ``tumorseg prepare`` and
``tumorseg predict`` (issue 20).

    python benchmarks/decode_peak_rss.py [--before OLD_SRC] [--only CASE ...]

Each input is made here in a few KB: an RLE BMP declaring 20000x20000, PNG/TIFF/JPEG headers
declaring huge dimensions, PNGs of 16-bit RGBA zeros (485 KB on disk for 7900x7900) and a deflate
bomb of 8-bit zeros. Every measurement runs in a fresh subprocess and reads its peak resident set
size (``os.wait4``'s ``ru_maxrss``, the process tree's high-water mark):

* gate: ``tumorseg.images.decode_image`` on the bytes (predict's defaults); baseline = the same
  process's peak just before the call (imports done, bytes read).
* prepare: ``tumorseg prepare`` on a folder of two valid pairs plus the case; baseline = the same
  folder without the case.
* predict: ``tumorseg predict`` (a tiny untrained U-Net) on a valid slice plus the case; baseline =
  the valid slice alone.

``--before OLD_SRC`` also runs everything against another checkout's ``src`` (e.g. ``git archive
<commit> src | tar -x -C /tmp/old``) to show what the gate changed. Results go to
``benchmarks/results/decode_peak_rss.json`` with the machine they were measured on.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import zlib
from importlib import metadata
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import RESULTS_DIR, ForeignCpu, cli_command, env_for_subprocess, log, machine_info, save_model_in_subprocess  # noqa: E402

TIMEOUT_S = 300  # per command (why this much: benchmarks/results/README.md, "decode_peak_rss")


# --------------------------------------------------------------------------------------------
# The worst inputs (also used by tests/test_reliability_images.py)
# --------------------------------------------------------------------------------------------


def rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP (BI_RLE8) of ``width`` x ``height`` whose pixel data is just "end of
    bitmap": ~1 KB on disk whatever the dimensions (OpenCV allocates the whole image for it)."""
    palette = b"".join(bytes((v, v, v, 0)) for v in range(256))
    pixels = b"\x00\x01"  # RLE8 end of bitmap
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    offset = 14 + len(info) + len(palette)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def png_of_zeros(width: int, height: int, *, bit_depth: int = 16, colour_type: int = 6, rows: int | None = None) -> bytes:
    """A PNG of zeros, compressed row by row (never held decoded here). ``colour_type`` 6 = RGBA,
    0 = gray. ``rows``: how many rows to actually store (fewer than ``height``: a header-only bomb)."""
    channels = {0: 1, 2: 3, 6: 4}[colour_type]
    row = b"\0" * (1 + width * channels * bit_depth // 8)
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(height if rows is None else rows)) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")


def tiff_header(width: int, height: int) -> bytes:
    """A little-endian 8-bit gray TIFF declaring ``width`` x ``height`` with 16 bytes of pixel data."""
    tags = [(256, 4, width), (257, 4, height), (258, 3, 8), (259, 3, 1), (262, 3, 1), (273, 4, 0), (277, 3, 1), (278, 4, height), (279, 4, 16)]
    ifd_offset = 8
    data_offset = ifd_offset + 2 + 12 * len(tags) + 4
    entries = b"".join(struct.pack("<HHII", tag, kind, 1, data_offset if tag == 273 else value) for tag, kind, value in tags)
    return b"II*\x00" + struct.pack("<I", ifd_offset) + struct.pack("<H", len(tags)) + entries + b"\0\0\0\0" + b"\0" * 16


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF0 header is patched to declare ``width`` x ``height``."""
    import cv2
    import numpy as np

    data = bytearray(cv2.imencode(".jpg", np.full((16, 16), 128, np.uint8))[1].tobytes())
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


# name -> (file name, what it is, how to make it)
CASES: dict[str, tuple[str, str, Any]] = {
    "rle_bmp": ("bomb.bmp", "RLE8 BMP declaring 20000x20000 (1 KB)", lambda: rle_bmp(20_000, 20_000)),
    "rgba16_png_62mp": ("rgba16.png", "16-bit RGBA PNG of zeros, 7900x7900 = 62 MP (under prepare's 64 MP)", lambda: png_of_zeros(7900, 7900)),
    "rgba16_png_39mp": (
        "rgba16.png",
        "16-bit RGBA PNG of zeros, 6300x6300 = 39.7 MP (under predict's 40 MP, over the decode budget)",
        lambda: png_of_zeros(6300, 6300),
    ),
    "rgba16_png_21mp": ("rgba16.png", "16-bit RGBA PNG of zeros, 4600x4600 = 21 MP (inside the decode budget)", lambda: png_of_zeros(4600, 4600)),
    "png_header_3600mp": (
        "huge.png",
        "8-bit PNG header declaring 60000x60000, 10 rows of data",
        lambda: png_of_zeros(60_000, 60_000, bit_depth=8, colour_type=0, rows=10),
    ),
    "tiff_header_81mp": ("big.tif", "8-bit TIFF header declaring 9000x9000, 16 bytes of data", lambda: tiff_header(9_000, 9_000)),
    "tiff_header_10gp": ("huge.tif", "8-bit TIFF header declaring 100000x100000", lambda: tiff_header(100_000, 100_000)),
    "jpeg_header_81mp": ("big.jpg", "16x16 JPEG with SOF0 patched to 9000x9000", lambda: jpeg_declaring(9_000, 9_000)),
    "jpeg_header_3600mp": ("huge.jpg", "16x16 JPEG with SOF0 patched to 60000x60000", lambda: jpeg_declaring(60_000, 60_000)),
    "deflate_bomb_64mp": (
        "zeros.png",
        "8-bit gray PNG of zeros, 7999x7999 = 64 MP (deflate ~1000:1)",
        lambda: png_of_zeros(7999, 7999, bit_depth=8, colour_type=0),
    ),
}

# --------------------------------------------------------------------------------------------
# Measuring one command in a fresh process
# --------------------------------------------------------------------------------------------

GATE = """
import json, resource, sys, time
from pathlib import Path
import PIL.Image  # the gate's header reader, imported lazily: part of the baseline, not of the call
try:
    from tumorseg.images import InputImageError, decode_image
except ImportError:  # a checkout from before the gate module
    from tumorseg.inference import InputImageError, decode_image
data = Path(sys.argv[1]).read_bytes()
baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
try:
    outcome = "decoded %dx%d" % decode_image(data, Path(sys.argv[1]).name).shape[::-1]
except InputImageError as exc:
    outcome = "refused: " + str(exc).split(": ", 1)[1]
seconds = time.perf_counter() - started
print(json.dumps({"outcome": outcome, "seconds": seconds, "baseline_kib": baseline}))
"""


def measure(command: list[str], cwd: Path, env: dict[str, str]) -> dict[str, Any]:
    """Run ``command``; its exit code, wall seconds, peak RSS (MiB) and output."""
    started = time.perf_counter()
    with tempfile.TemporaryFile() as output:
        child = subprocess.Popen(command, cwd=cwd, env=env, stdout=output, stderr=subprocess.STDOUT)
        try:
            _, status, usage = os.wait4(child.pid, 0)
        except KeyboardInterrupt:
            child.kill()
            raise
        output.seek(0)
        text = output.read().decode(errors="replace")
    return {
        "exit_code": os.waitstatus_to_exitcode(status),
        "seconds": time.perf_counter() - started,
        "peak_rss_mib": usage.ru_maxrss / 1024,
        "output": text,
    }


def _timed_env(src: Path | None) -> dict[str, str]:
    env = env_for_subprocess(CI="true")
    if src is not None:
        env["PYTHONPATH"] = f"{src}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def _with_timeout(command: list[str]) -> list[str]:
    return ["timeout", "--kill-after=5", str(TIMEOUT_S), *command]


def _row(case: str, what: str, result: dict[str, Any], baseline_mib: float, baseline_s: float, outcome: str) -> dict[str, Any]:
    timed_out = result["exit_code"] in (124, 137)
    return {
        "case": case,
        "command": what,
        "outcome": f"killed after {TIMEOUT_S} s" if timed_out else outcome,
        "peak_rss_mib": round(result["peak_rss_mib"], 1),
        "baseline_rss_mib": round(baseline_mib, 1),
        "delta_rss_mib": round(result["peak_rss_mib"] - baseline_mib, 1),
        "seconds": round(result["seconds"], 2),
        "delta_seconds": round(result["seconds"] - baseline_s, 2),
        "exit_code": result["exit_code"],
    }


def run_gate(case: str, file: Path, env: dict[str, str], work: Path) -> dict[str, Any]:
    result = measure(_with_timeout([sys.executable, "-c", GATE, str(file)]), work, env)
    try:
        answer = json.loads(result["output"].strip().splitlines()[-1])
    except (ValueError, IndexError):
        return _row(case, "gate", result, 0.0, 0.0, f"crashed: {result['output'].strip()[-200:]}")
    baseline_mib = answer["baseline_kib"] / 1024
    row = _row(case, "gate", result, baseline_mib, 0.0, answer["outcome"])
    row["seconds"] = row["delta_seconds"] = round(answer["seconds"], 3)  # the call alone, not the imports
    return row


def _prepare_outcome(out: Path, name: str, result: dict[str, Any]) -> str:
    try:
        report = json.loads((out / "report.json").read_text())
    except (OSError, ValueError):
        return f"exit {result['exit_code']}: {result['output'].strip().splitlines()[-1][:200] if result['output'].strip() else ''}"
    for item in report["skipped"]:
        if item["file"] == name:
            return f"skipped {item['reason']}: {item['detail'].split(': ', 2)[-1][:160]}"
    return "kept"


def _predict_outcome(out: Path, name: str, result: dict[str, Any]) -> str:
    try:
        with (out / "predictions.csv").open(newline="") as handle:
            rows = {Path(row["file"]).name: row for row in csv.DictReader(handle)}
    except OSError:
        return f"exit {result['exit_code']}: {result['output'].strip().splitlines()[-1][:200] if result['output'].strip() else ''}"
    row = rows.get(name)
    return "missing from predictions.csv" if row is None else f"{row['status']}: {row['reason'][:160]}" if row["reason"] else row["status"]


def run_case(case: str, work: Path, env: dict[str, str], model: Path, baselines: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    name, _, make = CASES[case]
    folder = work / case
    shutil.rmtree(folder, ignore_errors=True)
    for kind in ("images", "masks", "predict"):
        (folder / kind).mkdir(parents=True)
    _valid_pairs(folder)
    data = make()
    (folder / "images" / name).write_bytes(data)
    (folder / "predict" / name).write_bytes(data)
    (folder / "predict" / "good.png").write_bytes((folder / "images" / "1.png").read_bytes())
    (folder / "masks" / f"{Path(name).stem}.png").write_bytes((folder / "masks" / "1.png").read_bytes())
    rows = [run_gate(case, folder / "images" / name, env, work)]
    prepare = measure(
        _with_timeout(
            cli_command(
                "prepare",
                "--images", str(folder / "images"),
                "--masks", str(folder / "masks"),
                "--out", str(folder / "prepared"),
                "--size", "32",
                "--mask-suffix", "",
            )  # fmt: skip
        ),
        work,
        env,
    )
    base = baselines["prepare"]
    rows.append(_row(case, "prepare", prepare, base["peak_rss_mib"], base["seconds"], _prepare_outcome(folder / "prepared", name, prepare)))
    predict = measure(_with_timeout(cli_command("predict", str(folder / "predict"), "--model", str(model), "--out", str(folder / "predicted"))), work, env)
    base = baselines["predict"]
    rows.append(_row(case, "predict", predict, base["peak_rss_mib"], base["seconds"], _predict_outcome(folder / "predicted", name, predict)))
    shutil.rmtree(folder, ignore_errors=True)
    return rows


def _valid_pairs(folder: Path) -> None:
    """Two valid 64x64 pairs, so that prepare has something to keep whatever the case does."""
    import cv2
    import numpy as np

    for index in (1, 2):
        image = np.full((64, 64), 40 + index, np.uint8)
        mask = np.zeros((64, 64), np.uint8)
        cv2.circle(mask, (20 + 10 * index, 32), 8, 255, -1)
        image[mask > 0] = 200
        cv2.imwrite(str(folder / "images" / f"{index}.png"), image)
        cv2.imwrite(str(folder / "masks" / f"{index}.png"), mask)


def measure_baselines(work: Path, env: dict[str, str], model: Path) -> dict[str, dict[str, Any]]:
    """The same commands on the valid data alone: what every case's peak is compared with."""
    folder = work / "baseline"
    for kind in ("images", "masks", "predict"):
        (folder / kind).mkdir(parents=True, exist_ok=True)
    _valid_pairs(folder)
    (folder / "predict" / "good.png").write_bytes((folder / "images" / "1.png").read_bytes())
    prepare = measure(
        cli_command(
            "prepare",
            "--images", str(folder / "images"),
            "--masks", str(folder / "masks"),
            "--out", str(folder / "prepared"),
            "--size", "32",
            "--mask-suffix", "",
        ),  # fmt: skip
        work,
        env,
    )
    predict = measure(cli_command("predict", str(folder / "predict"), "--model", str(model), "--out", str(folder / "predicted")), work, env)
    for what, result in (("prepare", prepare), ("predict", predict)):
        if result["exit_code"] != 0:
            raise RuntimeError(f"the baseline {what} failed:\n{result['output'][-3000:]}")
    shutil.rmtree(folder, ignore_errors=True)
    return {"prepare": prepare, "predict": predict}


def tiny_model(path: Path, env: dict[str, str]) -> Path:
    return save_model_in_subprocess(path, "unet", 32, {"base_filters": 4, "depth": 2, "use_caspp": False}, env=env)


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| code | case | command | outcome | peak RSS MiB (baseline) | Δ MiB | s |", "| --- | --- | --- | --- | ---: | ---: | ---: |"]
    for row in rows:
        lines.append(
            f"| {row['code']} | {row['case']} | {row['command']} | {row['outcome']} | {row['peak_rss_mib']:.0f} ({row['baseline_rss_mib']:.0f}) "
            f"| {row['delta_rss_mib']:.0f} | {row['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before", type=Path, default=None, help="also measure this older checkout's src folder (PYTHONPATH)")
    parser.add_argument("--only", nargs="+", choices=list(CASES), default=None, help="run only these cases")
    parser.add_argument("--results", type=Path, default=RESULTS_DIR / "decode_peak_rss.json")
    args = parser.parse_args(argv)

    machine = machine_info()
    machine["versions"]["pillow"] = metadata.version("pillow")  # the gate's header reader
    codes = [("after", None)] + ([("before", args.before.resolve())] if args.before else [])
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch, ForeignCpu() as foreign:
        work = Path(scratch)
        model = tiny_model(work / "tiny.keras", _timed_env(None))
        for code, src in codes:
            env = _timed_env(src)
            baselines = measure_baselines(work, env, model)
            log(f"{code}: baselines prepare {baselines['prepare']['peak_rss_mib']:.0f} MiB, predict {baselines['predict']['peak_rss_mib']:.0f} MiB")
            for case in args.only or list(CASES):
                for row in run_case(case, work, env, model, baselines):
                    rows.append({"code": code, **row})
                    log(
                        f"{code} {case} {row['command']}: {row['outcome'][:90]} | "
                        f"{row['peak_rss_mib']:.0f} MiB (Δ {row['delta_rss_mib']:.0f}) {row['seconds']:.2f} s"
                    )
    from tumorseg.data.prepare import MAX_PIXELS as PREPARE_MAX_PIXELS
    from tumorseg.images import DEFAULT_MAX_PIXELS, MAX_DECODE_BYTES

    result = {
        "benchmark": "decode_peak_rss",
        "machine": machine,
        "foreign_cpu_fraction": foreign.fraction,
        "quiet_machine": foreign.quiet,
        "limits": {"max_pixels_predict": DEFAULT_MAX_PIXELS, "max_pixels_prepare": PREPARE_MAX_PIXELS, "max_decode_bytes": MAX_DECODE_BYTES},
        "cases": {case: {"file": CASES[case][0], "what": CASES[case][1]} for case in args.only or CASES},
        "rows": rows,
        "note": "peak RSS = ru_maxrss of the command's process tree; baseline = gate: the same process before the call; "
        "prepare/predict: the same command on the valid files alone. seconds: gate = the call alone, commands = wall time.",
    }
    from tumorseg.io import atomic_write_json

    atomic_write_json(args.results, result)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
