"""Data-stage throughput: ``prepare`` and ``augment`` pairs/s vs the obvious one-by-one loop.

The reference for each stage is the script a user would write without this project: read each
pair with ``cv2.imread``, resize (or augment), write it with ``cv2.imwrite``, one pair after the
other in one process. Ours does more per pair (validation, hashing, atomic output, a split), so a
ratio above 1 has to come from doing the shared work faster and from using every core.
"""

from __future__ import annotations

import cProfile
import io
import pstats
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common import cores, log, ratio

PREPARE_TARGET = 5.0  # x the naive loop, on 2 cores
AUGMENT_TARGET = 5.0


# --------------------------------------------------------------------------------------------
# The naive loops (the reference)
# --------------------------------------------------------------------------------------------


def naive_prepare(images: Path, masks: Path, out: Path, size: int) -> int:
    """Read, resize (area for the image, nearest for the mask), write; one pair at a time."""
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir(parents=True)
    count = 0
    for path in sorted(images.iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(masks / path.name), cv2.IMREAD_GRAYSCALE)
        cv2.imwrite(str(out / "images" / path.name), cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA))
        cv2.imwrite(str(out / "masks" / path.name), cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST))
        count += 1
    return count


def naive_augment(train_dir: Path, out: Path, settings, copies: int, seed: int) -> int:
    """The same albumentations Compose, applied in a plain loop and written with cv2.imwrite."""
    from tumorseg.data.augment import build_augmentation

    pipeline = build_augmentation(settings, seed)
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir(parents=True)
    count = 0
    for path in sorted((train_dir / "images").iterdir()):
        image = cv2.imread(str(path), cv2.IMREAD_GRAYSCALE)
        mask = cv2.imread(str(train_dir / "masks" / path.name), cv2.IMREAD_GRAYSCALE)
        for copy in range(copies):
            result = pipeline(image=image, mask=mask)
            name = f"{path.stem}__aug{copy + 1}.png"
            cv2.imwrite(str(out / "images" / name), result["image"])
            cv2.imwrite(str(out / "masks" / name), result["mask"])
            count += 1
    return count


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _rate(fn, count_fn=None) -> tuple[float, Any]:
    started = time.perf_counter()
    value = fn()
    seconds = time.perf_counter() - started
    count = count_fn(value) if count_fn else value
    return count / seconds, value


def synthetic_pairs(root: Path, count: int, size: int, *, progress: bool = False) -> tuple[Path, Path]:
    """``count`` synthetic phantom pairs at ``size``² under ``root`` (seed 0): the images and masks folders."""
    from tumorseg.data.synthetic import write_synthetic_dataset

    write_synthetic_dataset(root, count=count, size=size, seed=0, progress=progress)
    return root / "images", root / "masks"


def prepare_rate(images: Path, masks: Path, out: Path, size: int, workers: int) -> float:
    """Pairs/s of our prepare stage with ``workers`` processes, writing ``out``."""
    from tumorseg.data.prepare import prepare_dataset

    return _rate(lambda: prepare_dataset(images, masks, out, size=size, workers=workers, progress=False), lambda report: report.valid_pairs)[0]


def _profile_top(fn, limit: int = 10) -> list[dict[str, Any]]:
    """cProfile's top functions by own time: where a pair's time goes."""
    profiler = cProfile.Profile()
    profiler.enable()
    fn()
    profiler.disable()
    stats = pstats.Stats(profiler, stream=io.StringIO())
    total = sum(row[2] for row in stats.stats.values())
    rows = sorted(stats.stats.items(), key=lambda item: item[1][2], reverse=True)[:limit]
    return [
        {"function": f"{Path(file).name}:{line}({func})" if file != "~" else func, "calls": calls, "own_s": round(own, 3), "share": round(own / total, 3)}
        for (file, line, func), (_, calls, own, _cum, _) in rows
    ]


def _same_pixels(a: Path, b: Path) -> float:
    """Fraction of files under ``a`` whose decoded pixels equal the same-named file under ``b``."""
    names = sorted(p.name for p in a.iterdir())
    equal = 0
    for name in names:
        x = cv2.imread(str(a / name), cv2.IMREAD_UNCHANGED)
        y = cv2.imread(str(b / name), cv2.IMREAD_UNCHANGED)
        equal += int(x is not None and y is not None and np.array_equal(x, y))
    return equal / max(1, len(names))


def _summarise_rates(rates: dict[str, list[float]]) -> tuple[dict[str, float], dict[str, list[float]]]:
    """Per side: the median rate, and every repeat's (both rounded to 0.1)."""
    return {k: round(float(np.median(v)), 1) for k, v in rates.items()}, {k: [round(x, 1) for x in v] for k, v in rates.items()}


def codec_options(images: Path, out_size: int, limit: int = 50) -> dict[str, Any]:
    """Two shortcuts checked on the benchmark's own inputs, numbers beside the verdict.

    * ``cv2.IMREAD_REDUCED_GRAYSCALE_2`` for an exact 2x downscale: equal to INTER_AREA pixel for
      pixel? and is it faster? (verdict: benchmarks/results/README.md, "prepare")
    * PNG compression level: OpenCV's default (no flag) vs explicit levels 0, 1, 3.
    """
    paths = sorted(images.iterdir())[:limit]
    blobs = [np.frombuffer(p.read_bytes(), np.uint8) for p in paths]

    def ms(fn, items) -> tuple[float, list]:  # best of 3 passes: the quieter moment of a noisy machine
        best = float("inf")
        for _ in range(3):
            started = time.perf_counter()
            out = [fn(x) for x in items]
            best = min(best, time.perf_counter() - started)
        return 1000.0 * best / len(items), out

    full_ms, full = ms(lambda b: cv2.imdecode(b, cv2.IMREAD_GRAYSCALE), blobs)
    resize_ms, area = ms(lambda a: cv2.resize(a, (out_size, out_size), interpolation=cv2.INTER_AREA), full)
    result: dict[str, Any] = {"images": len(paths), "decode_full_ms": round(full_ms, 3), "resize_area_ms": round(resize_ms, 3)}
    if all(a.shape == (2 * out_size, 2 * out_size) for a in full):
        reduced_ms, reduced = ms(lambda b: cv2.imdecode(b, cv2.IMREAD_REDUCED_GRAYSCALE_2), blobs)
        result["reduced_2_decode_ms"] = round(reduced_ms, 3)
        result["reduced_2_equals_area"] = sum(np.array_equal(a, r) for a, r in zip(area, reduced)) / len(area)
        result["reduced_2_max_abs_difference"] = int(max(np.abs(a.astype(int) - r).max() for a, r in zip(area, reduced)))
    encode = {}
    for label, flags in (
        ("default", []),
        ("level 0", [cv2.IMWRITE_PNG_COMPRESSION, 0]),
        ("level 1", [cv2.IMWRITE_PNG_COMPRESSION, 1]),
        ("level 3", [cv2.IMWRITE_PNG_COMPRESSION, 3]),
    ):
        t, encoded = ms(lambda a, flags=flags: cv2.imencode(".png", a, flags)[1], area)
        encode[label] = {"ms": round(t, 3), "kib": round(float(np.mean([len(e) for e in encoded])) / 1024, 1)}
    result["png_encode"] = encode
    return result


# --------------------------------------------------------------------------------------------
# The benchmarks
# --------------------------------------------------------------------------------------------


def prepare_benchmark(*, quick: bool, count: int | None = None, in_size: int = 512, out_size: int = 256, repeats: int | None = None) -> dict[str, Any]:
    """Our prepare stage (all cores, and one process) vs the naive loop on synthetic 512² pairs."""
    from tumorseg.data.prepare import prepare_dataset

    count = count or (120 if quick else 1000)
    repeats = repeats or (1 if quick else 3)
    workers = cores()
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as scratch:
        started = time.perf_counter()
        images, masks = synthetic_pairs(Path(scratch) / "input", count, in_size)
        setup_s = time.perf_counter() - started
        log(f"prepare: {count} synthetic {in_size}² pairs written in {setup_s:.1f} s")
        rates: dict[str, list[float]] = {"naive": [], "ours_all_cores": [], "ours_one_process": []}
        for rep in range(repeats):  # interleaved, so a drift in machine speed hits every side alike
            naive_out = Path(scratch) / f"naive{rep}"
            rates["naive"].append(_rate(lambda naive_out=naive_out: naive_prepare(images, masks, naive_out, out_size))[0])
            for label, n in (("ours_all_cores", workers), ("ours_one_process", 1)):
                rates[label].append(prepare_rate(images, masks, Path(scratch) / f"{label}{rep}", out_size, n))
            log(f"prepare rep {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} pairs/s" for k, v in rates.items()))
        # Correctness beside speed: our resized pixels must equal the naive loop's.
        ours_all = Path(scratch) / "ours_all_cores0"
        merged = Path(scratch) / "ours_merged"
        for kind in ("images", "masks"):
            (merged / kind).mkdir(parents=True)
            for split in ("train", "val", "test"):
                for path in (ours_all / split / kind).iterdir():
                    shutil.copy(path, merged / kind / path.name)
        identical = {kind: _same_pixels(merged / kind, Path(scratch) / "naive0" / kind) for kind in ("images", "masks")}
        profile = _profile_top(lambda: prepare_dataset(images, masks, Path(scratch) / "profiled", size=out_size, workers=1, progress=False))
        codecs = codec_options(images, out_size)

    med, every = _summarise_rates(rates)
    return {
        "data": f"{count} synthetic phantom pairs (tumorseg.data.synthetic), {in_size}x{in_size} -> {out_size}x{out_size}",
        "reference": "naive loop: cv2.imread -> cv2.resize (area / nearest) -> cv2.imwrite, one pair at a time, one process",
        "workers": workers,
        "repeats": repeats,
        "setup_seconds": round(setup_s, 1),
        "pairs_per_s": med,
        "pairs_per_s_all_repeats": every,
        "outputs_identical_to_naive": identical,
        "profile_one_process_top": profile,
        "codec_options": codecs,
        "table": {
            "columns": ["", "pairs/s (median)"],
            "rows": [
                ["naive loop (1 process)", med["naive"]],
                [f"ours, {workers} processes", med["ours_all_cores"]],
                ["ours, 1 process", med["ours_one_process"]],
            ],
        },
        "notes": [
            f"our outputs have the same pixels as the naive loop's: images {identical['images']:.0%}, masks {identical['masks']:.0%}",
            f"per image: PNG decode {codecs['decode_full_ms']} ms at {in_size}², area resize {codecs['resize_area_ms']} ms, "
            f"PNG encode {codecs['png_encode']['default']['ms']} ms at {out_size}² "
            "(both sides pay the decode and encode; ours adds validation, hashing and the split)",
            *(
                [f"IMREAD_REDUCED_GRAYSCALE_2 equals INTER_AREA on {codecs['reduced_2_equals_area']:.0%} of images "
                 f"(max difference {codecs['reduced_2_max_abs_difference']}) "
                 f"but decodes in {codecs['reduced_2_decode_ms']} ms vs {codecs['decode_full_ms']} ms (PNG has no reduced decode): not used"]
                if "reduced_2_decode_ms" in codecs else []
            ),
            "PNG encode ms / KiB by compression: " + ", ".join(f"{k} {v['ms']} ms / {v['kib']} KiB" for k, v in codecs["png_encode"].items()),
        ],
        "ratios": [
            ratio(f"prepare, ours ({workers} processes) / naive loop", med["ours_all_cores"] / med["naive"], target=PREPARE_TARGET),
            ratio("prepare, ours (1 process) / naive loop", med["ours_one_process"] / med["naive"]),
        ],
    }


def augment_benchmark(*, quick: bool, count: int | None = None, size: int = 256, copies: int = 2, repeats: int | None = None) -> dict[str, Any]:
    """Our augment stage vs the same albumentations Compose in a plain loop (params.yaml settings)."""
    from tumorseg.config import Config
    from tumorseg.data.augment import augment_dataset

    count = count or (60 if quick else 300)
    repeats = repeats or (1 if quick else 3)
    settings = Config().augment
    with tempfile.TemporaryDirectory(prefix="bench-augment-") as scratch:
        train = Path(scratch) / "train"
        synthetic_pairs(train, count, size)
        rates: dict[str, list[float]] = {"naive": [], "ours": []}
        for rep in range(repeats):
            rates["naive"].append(_rate(lambda rep=rep: naive_augment(train, Path(scratch) / f"naive{rep}", settings, copies, 42))[0])
            rates["ours"].append(
                _rate(
                    lambda rep=rep: augment_dataset(train, Path(scratch) / f"ours{rep}", settings=settings, copies_per_image=copies, seed=42, progress=False),
                    lambda r: r.augmented_pairs,
                )[0]
            )
            log(f"augment rep {rep + 1}/{repeats}: " + ", ".join(f"{k} {v[-1]:.0f} pairs/s" for k, v in rates.items()))
        profile = _profile_top(lambda: augment_dataset(train, Path(scratch) / "profiled", settings=settings, copies_per_image=copies, seed=42, progress=False))
    med, every = _summarise_rates(rates)
    return {
        "data": f"{count} synthetic phantom pairs at {size}x{size}, {copies} augmented copies each (params.yaml augment settings)",
        "reference": "naive loop: cv2.imread -> the same albumentations Compose -> cv2.imwrite, one pair at a time, one process",
        "repeats": repeats,
        "augmented_pairs_per_s": med,
        "augmented_pairs_per_s_all_repeats": every,
        "profile_top": profile,
        "table": {"columns": ["", "augmented pairs/s (median)"], "rows": [["naive loop (1 process)", med["naive"]], ["ours", med["ours"]]]},
        "ratios": [ratio("augment, ours / naive loop", med["ours"] / med["naive"], target=AUGMENT_TARGET)],
    }
