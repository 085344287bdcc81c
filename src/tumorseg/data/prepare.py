"""Pair-validate, resize and split image/mask pairs into ``OUT/{train,val,test}/{images,masks}``.

Bad data never crashes the stage: every pair that fails a check is skipped with a named reason
(or, with ``on_error="fail"``, stops the stage with a message naming the file). The split is
grouped (by patient id, or by contiguous blocks of file numbers where neighbouring numbers are
slices of one patient) so no patient — and no duplicate image — lands on both sides.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
from tqdm import tqdm

from tumorseg import images as image_gate  # `images` names image lists here
from tumorseg.errors import NoValidPairs, PrepareError  # noqa: F401 - raised here, defined with the other user errors
from tumorseg.images import InputImageError, list_image_files, to_gray_uint8  # noqa: F401 - to_gray_uint8: prepare's public helper
from tumorseg.io import atomic_directory, atomic_write_json, atomic_write_text, encode_png, write_staged_bytes
from tumorseg.processes import default_workers, worker_pool

# pandas and scikit-learn are imported where the split needs them, not at module level: every
# worker process imports this module, and those two imports cost more CPU than preparing a few
# hundred pairs (benchmarks/bench_data.py).

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
MIN_SPLIT_GROUPS = 5  # fewer groups (patients) in a split and its Dice is mostly luck
MAX_PIXELS = 64_000_000  # larger "images" are almost surely not MRI slices; refused from the header

# Skip reasons (stable strings: they are keys in report.json).
ORPHAN_IMAGE = "orphan_image"
ORPHAN_MASK = "orphan_mask"
AMBIGUOUS_NAME = "ambiguous_name"
EMPTY_FILE = "empty_file"
UNREADABLE = "unreadable"
TOO_LARGE = "too_large"
SIZE_MISMATCH = "size_mismatch"
EMPTY_MASK = "empty_mask"
DUPLICATE_IMAGE = "duplicate_image"
MISSING_SEQUENCE = "missing_sequence"
SINGLE_CHANNEL = "images"  # the channel folder of one grayscale image per slice (config.SINGLE_CHANNEL)
_REASON_BY_KIND = {image_gate.EMPTY: EMPTY_FILE, image_gate.UNREADABLE: UNREADABLE, image_gate.TOO_LARGE: TOO_LARGE}  # the decode gate's refusals


@dataclass
class PairOutcome:
    """The result of checking one pair (computed in a worker process)."""

    name: str
    image_path: str  # the first channel's file (the one image of a single-channel slice)
    mask_path: str
    reason: str | None = None
    detail: str = ""
    sha256: str = ""
    pixel_hash: str = ""
    area_fraction: float = 0.0
    height: int = 0
    width: int = 0
    mask_binarised: bool = False
    channel_paths: dict[str, str] = field(default_factory=dict)  # channel -> file ("" = missing)
    filled: tuple[str, ...] = ()  # sequences missing on disk, stored as zeros (missing_sequences=fill)


@dataclass
class PrepareReport:
    valid_pairs: int
    skipped: list[dict[str, str]]
    skipped_by_reason: dict[str, int]
    masks_binarised: int
    splits: dict[str, int]
    groups: dict[str, int]
    group_by: str
    image_size: int
    seconds: float = field(default=0.0, compare=False)
    warnings: list[str] = field(init=False)  # e.g. a split too small to trust; derived from groups
    # Multi-sequence data only: the sequences in channel order, what was done with a slice missing
    # one, and per case (group) how many slices lacked each sequence.
    sequences: tuple[str, ...] = ()
    missing_sequences: str = "skip"
    missing_by_case: dict[str, dict[str, int]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        warning = small_split_warning(self.groups)
        self.warnings = [warning] if warning else []

    def to_json(self) -> dict:
        payload = asdict(self)
        payload.pop("seconds")  # timing is not a reproducible output; printed, not stored
        if not self.sequences:  # one grayscale channel: report.json as it has always been
            for key in ("sequences", "missing_sequences", "missing_by_case"):
                payload.pop(key)
        return payload


# --------------------------------------------------------------------------------------------
# Pairing by name
# --------------------------------------------------------------------------------------------


def _list_images(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise PrepareError(f"{folder} is not a folder")
    return list_image_files(folder)


def pair_files(images_dir: Path, masks_dir: Path, mask_suffix: str = "") -> tuple[list[tuple[str, Path, Path]], list[PairOutcome]]:
    """Match images to masks by file stem (``stem`` ↔ ``stem + mask_suffix``, any image extension)."""
    slices, problems = pair_slices({SINGLE_CHANNEL: images_dir}, masks_dir, mask_suffix)
    return [(name, paths[SINGLE_CHANNEL], mask) for name, paths, mask in slices], problems


def pair_slices(
    channel_dirs: dict[str, Path], masks_dir: Path, mask_suffix: str = ""
) -> tuple[list[tuple[str, dict[str, Path | None], Path]], list[PairOutcome]]:
    """Match each mask to its slice's file in every channel folder by file stem (``stem`` ↔
    ``stem + mask_suffix``, any image extension). A slice with some but not all channels is
    returned with None for the missing ones (the caller skips or fills it). Without a mask it is
    a problem; so is a mask without an image, except with several channel folders or a named
    sequence, where it is a slice lacking every sequence: still a slice of its patient, so the
    patient split can be drawn the same whichever sequences a study uses."""
    by_channel: dict[str, dict[str, list[Path]]] = {}
    for channel, folder in channel_dirs.items():
        by_channel[channel] = {}
        if len(channel_dirs) > 1 and not folder.exists():
            log.warning("prepare: no %s folder (%s): every slice lacks that sequence", channel, folder)
            continue
        for path in _list_images(folder):
            by_channel[channel].setdefault(path.stem, []).append(path)
    masks: dict[str, list[Path]] = {}
    for path in _list_images(masks_dir):
        stem = path.stem
        if mask_suffix:
            if not stem.endswith(mask_suffix):
                masks.setdefault(f"\0{stem}", []).append(path)  # cannot match any image
                continue
            stem = stem[: -len(mask_suffix)]
        masks.setdefault(stem, []).append(path)

    single = len(channel_dirs) == 1
    sequences_named = SINGLE_CHANNEL not in channel_dirs
    where = next(iter(channel_dirs.values())) if single else "any of " + ", ".join(f"{c}/" for c in channel_dirs)
    stems = set(masks).union(*(set(files) for files in by_channel.values()))
    pairs, problems = [], []
    for stem in sorted(stems):
        files = {channel: found.get(stem, []) for channel, found in by_channel.items()}
        mask_list = masks.get(stem, [])
        present = [paths[0] for paths in files.values() if paths]
        display = stem.lstrip("\0")
        crowded = [path for paths in files.values() if len(paths) > 1 for path in paths]
        if crowded or len(mask_list) > 1:
            names = ", ".join(p.name for p in crowded + (mask_list if len(mask_list) > 1 else present + mask_list))
            first = (crowded or present or mask_list)[0]
            problems.append(PairOutcome(display, str(first), "", AMBIGUOUS_NAME, f"several files share the name {display!r}: {names}"))
        elif not mask_list:
            problems.append(PairOutcome(display, str(present[0]), "", ORPHAN_IMAGE, f"no mask named {display}{mask_suffix}.* in {masks_dir}"))
        elif not present and single and not sequences_named:
            problems.append(PairOutcome(display, "", str(mask_list[0]), ORPHAN_MASK, f"no image named {display}.* in {where}"))
        else:
            pairs.append((display, {channel: (paths[0] if paths else None) for channel, paths in files.items()}, mask_list[0]))
    return pairs, problems


# --------------------------------------------------------------------------------------------
# Checking and resizing one pair (runs in worker processes)
# --------------------------------------------------------------------------------------------


def binarise_mask(mask: np.ndarray, threshold: int) -> tuple[np.ndarray, bool]:
    """Return a {0,255} mask and whether the input held other values (0/1 masks are scaled)."""
    if mask.ndim == 3:
        mask = mask[:, :, :3].max(axis=2)
    # bincount is ~5x faster than np.unique on a uint8 image (it needs no sort)
    values = np.flatnonzero(np.bincount(mask.ravel(), minlength=256)) if mask.dtype == np.uint8 else np.unique(mask)
    if values.size <= 2 and set(values.tolist()) <= {0, 255}:
        return mask.astype(np.uint8), False
    if set(values.tolist()) <= {0, 1}:
        return (mask > 0).astype(np.uint8) * 255, True
    if mask.dtype != np.uint8:
        mask = to_gray_uint8(mask)
    return (mask > threshold).astype(np.uint8) * 255, True


def _read(path: Path) -> tuple[bytes | None, np.ndarray | None, str | None, str]:
    """The file's bytes and decoded pixels through the decode gate, or the skip reason and detail."""
    try:
        data = image_gate.read_file_bytes(path, path.name)
        # Stored orientation (no EXIF turn): image and mask must stay pixel-aligned, as before the gate.
        return data, image_gate.decode_array(data, path.name, max_pixels=MAX_PIXELS, apply_orientation=False), None, ""
    except InputImageError as exc:
        return None, None, _REASON_BY_KIND[exc.kind], str(exc)


def check_pair(
    name: str,
    image_path: Path | dict[str, Path | None],
    mask_path: Path,
    size: int,
    threshold: int,
    empty_masks: str,
    staging: Path,
    missing: str = "skip",
) -> PairOutcome:
    """Validate one slice (one image, or one file per channel) and its mask; on success write the
    resized PNGs to ``staging/all/<channel>/`` and ``staging/all/masks/``. A channel without a file
    is a skip (``missing="skip"``) or stored as zeros (``"fill"``)."""
    paths = image_path if isinstance(image_path, dict) else {SINGLE_CHANNEL: image_path}
    first = next((path for path in paths.values() if path is not None), "")
    outcome = PairOutcome(name, str(first), str(mask_path), channel_paths={c: str(p or "") for c, p in paths.items()})
    absent = tuple(channel for channel, path in paths.items() if path is None)
    if absent and (missing == "skip" or len(absent) == len(paths)):
        # Skipped, but its mask is still read: the split is drawn over every slice of every patient
        # (prepare_dataset), so it does not depend on which sequences a study uses.
        data, decoded, reason, detail = _read(mask_path)
        if reason:
            outcome.reason, outcome.detail = reason, f"mask: {detail}"
            return outcome
        mask, _ = binarise_mask(decoded, threshold)
        outcome.area_fraction = float(np.count_nonzero(mask)) / mask.size
        outcome.reason = MISSING_SEQUENCE
        hint = "" if len(absent) == len(paths) else " (set prepare.missing_sequences: fill to use the slice with zeros there)"
        outcome.detail = f"no {', '.join(absent)} file{hint}"
        return outcome
    outcome.filled = absent

    channels: dict[str, np.ndarray] = {}
    digests = []
    for channel, path in paths.items():
        if path is None:
            continue
        data, decoded, reason, detail = _read(path)
        if reason:
            role = "image" if len(paths) == 1 else channel
            outcome.reason, outcome.detail = reason, f"{role}: {detail}"
            return outcome
        digests.append(hashlib.sha256(data).hexdigest())
        channels[channel] = to_gray_uint8(decoded)
        del data, decoded  # only one decoded file at a time: the gate's memory bound holds per file
    data, decoded, reason, detail = _read(mask_path)
    if reason:
        outcome.reason, outcome.detail = reason, f"mask: {detail}"
        return outcome
    mask, outcome.mask_binarised = binarise_mask(decoded, threshold)
    del data, decoded
    # One channel: the file's hash, as always; several: the hash of the files' hashes in channel order.
    outcome.sha256 = digests[0] if len(paths) == 1 else hashlib.sha256("".join(digests).encode()).hexdigest()
    for channel, image in channels.items():
        if image.shape != mask.shape:
            outcome.reason = SIZE_MISMATCH
            role = "image" if len(paths) == 1 else f"{channel} image"
            outcome.detail = f"{role} is {image.shape[1]}x{image.shape[0]} but mask is {mask.shape[1]}x{mask.shape[0]}"
            return outcome
    outcome.height, outcome.width = mask.shape
    if any(int(image.min()) != int(image.max()) for image in channels.values()):
        pixels = b"".join(channels[c].tobytes() if c in channels else b"-" for c in paths)
        outcome.pixel_hash = hashlib.sha256(pixels + str(mask.shape).encode()).hexdigest()
    # else a blank slice (e.g. a FLAIR slice outside the scanned range): no content that could leak
    # between splits, so it is never a duplicate (dropping it would also change the split's groups)
    outcome.area_fraction = float(np.count_nonzero(mask)) / mask.size
    if outcome.area_fraction == 0.0 and empty_masks == "skip":
        outcome.reason, outcome.detail = EMPTY_MASK, "mask has no tumour pixels (set prepare.empty_masks: keep to use it)"
        return outcome

    # Area interpolation when shrinking (no aliasing), linear when enlarging; masks nearest so they
    # stay exactly {0, 255}.
    shrinking = mask.shape[0] > size or mask.shape[1] > size
    for channel in paths:
        image = channels.get(channel)
        interpolation = cv2.INTER_AREA if shrinking else cv2.INTER_LINEAR
        resized = np.zeros((size, size), np.uint8) if image is None else cv2.resize(image, (size, size), interpolation=interpolation)
        write_staged_bytes(staging / "all" / channel / f"{name}.png", encode_png(resized))
    mask = cv2.resize(mask, (size, size), interpolation=cv2.INTER_NEAREST)
    write_staged_bytes(staging / "all" / "masks" / f"{name}.png", encode_png(mask))
    return outcome


def _worker_init() -> None:
    cv2.setNumThreads(1)  # parallelism comes from processes; nested threads only contend


def _check_star(args: tuple) -> PairOutcome:
    return check_pair(*args)


# --------------------------------------------------------------------------------------------
# Grouping and splitting
# --------------------------------------------------------------------------------------------

_LAST_NUMBER = re.compile(r"(\d+)(?!.*\d)")


def group_ids(names: list[str], group_by: str) -> list[str]:
    """Patient-like group of each file: its own name, a block of numbers, or a regex capture."""
    kind, _, arg = group_by.partition(":")
    groups = []
    for name in names:
        if kind == "block":
            match = _LAST_NUMBER.search(name)
            groups.append(f"block{(int(match.group(1)) - 1) // int(arg)}" if match else f"file:{name}")
        elif kind == "regex":
            match = re.search(arg, name)
            groups.append(f"id:{match.group(1)}" if match else f"file:{name}")
        else:
            groups.append(f"file:{name}")
    return groups


def size_strata(area_fractions: np.ndarray, n_strata: int) -> np.ndarray:
    """Quantile bin (0 = smallest tumours) of each area fraction."""
    if n_strata <= 1 or len(area_fractions) < n_strata:
        return np.zeros(len(area_fractions), dtype=int)
    edges = np.quantile(area_fractions, np.linspace(0, 1, n_strata + 1)[1:-1])
    return np.searchsorted(edges, area_fractions, side="right")


def _split_off(groups: np.ndarray, strata: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split unique groups in two, stratified when every stratum has at least two groups."""
    from sklearn.model_selection import train_test_split

    if fraction <= 0 or len(groups) < 2:
        return groups, groups[:0]
    n_out = max(1, int(round(fraction * len(groups))))
    if n_out >= len(groups):
        n_out = len(groups) - 1
    counts = Counter(strata.tolist())
    stratify = strata if min(counts.values()) >= 2 and n_out >= len(counts) and len(groups) - n_out >= len(counts) else None
    keep, out = train_test_split(groups, test_size=n_out, random_state=seed, stratify=stratify)
    return np.sort(keep), np.sort(out)


def small_split_warning(groups_per_split: dict[str, int]) -> str | None:
    """Say so when a split holds too few groups for its numbers to mean much (13 pairs split 11/1/1)."""
    small = [split for split in SPLITS if groups_per_split.get(split, 0) < MIN_SPLIT_GROUPS]
    if not small:
        return None
    counts = ", ".join(f"{split} {groups_per_split.get(split, 0)}" for split in SPLITS)
    return (
        f"small split: {counts} groups (fewer than {MIN_SPLIT_GROUPS} in {', '.join(small)}); metrics on so few "
        "patients are mostly chance: add data, or check prepare.group_by and the split fractions"
    )


def assign_splits(
    names: list[str],
    area_fractions: list[float],
    *,
    group_by: str,
    n_strata: int,
    val_fraction: float,
    test_fraction: float,
    seed: int,
) -> tuple[list[str], list[str]]:
    """Split pairs into train/val/test by group, stratified by the group's median tumour size.

    Fractions apply to groups; with equal-sized groups they are also the pair fractions.
    Returns (split per pair, group per pair).
    """
    import pandas as pd

    groups = group_ids(names, group_by)
    frame = pd.DataFrame({"group": groups, "area": area_fractions})
    per_group = frame.groupby("group", sort=True)["area"].median()
    unique = per_group.index.to_numpy()
    strata = size_strata(per_group.to_numpy(), n_strata)
    rest, test = _split_off(unique, strata, test_fraction, seed)
    rest_strata = strata[np.isin(unique, rest)]
    remaining = 1.0 - test_fraction
    train, val = _split_off(rest, rest_strata, val_fraction / remaining if remaining > 0 else 0.0, seed + 1)
    lookup = {g: "train" for g in train} | {g: "val" for g in val} | {g: "test" for g in test}
    warning = small_split_warning({"train": len(train), "val": len(val), "test": len(test)})
    if warning:
        log.warning("prepare: %s", warning)
    return [lookup[g] for g in groups], groups


# --------------------------------------------------------------------------------------------
# The prepare stage
# --------------------------------------------------------------------------------------------


def prepare_dataset(
    images_dir: str | Path | dict[str, Path],
    masks_dir: str | Path,
    out_dir: str | Path,
    *,
    size: int,
    on_error: str = "skip",
    mask_threshold: int = 127,
    empty_masks: str = "skip",
    mask_suffix: str = "",
    val_fraction: float = 0.15,
    test_fraction: float = 0.15,
    group_by: str = "block:20",
    n_strata: int = 3,
    seed: int = 42,
    workers: int = 0,
    progress: bool = True,
    report_extra: dict | None = None,
    missing_sequences: str = "skip",
    tumour_types: Mapping[str, str] | None = None,
) -> PrepareReport:
    """Check, resize and split every pair; write the split folders, manifest.csv and report.json.

    ``images_dir`` is one folder of grayscale images, or ``{sequence: folder}`` for multi-sequence
    slices (channel order = the mapping's order; each sequence is checked as an image is, and a
    slice missing one is skipped or filled with zeros as ``missing_sequences`` says). The output
    folder is replaced atomically, so an interrupted or failed run leaves the previous output
    untouched and the inputs are only ever read. ``report_extra`` (e.g. the data source record)
    is added to report.json. ``tumour_types`` ({slice name: type}, the data's labels.csv) becomes
    manifest.csv's ``tumour_type`` column ("" where a slice has none), which class-aware sampling
    (``train.oversample``) reads.
    """
    import pandas as pd

    started = time.perf_counter()
    multi = isinstance(images_dir, dict)
    channel_dirs = {name: Path(folder) for name, folder in images_dir.items()} if multi else {SINGLE_CHANNEL: Path(images_dir)}
    masks_dir, out_dir = Path(masks_dir), Path(out_dir)
    inputs_text = ", ".join(str(folder) for folder in channel_dirs.values())
    slices, problems = pair_slices(channel_dirs, masks_dir, mask_suffix)
    if on_error == "fail" and problems:
        first = problems[0]
        raise PrepareError(f"{first.image_path or first.mask_path}: {first.reason}: {first.detail}")

    workers = workers or default_workers()
    with atomic_directory(out_dir, inputs=(*channel_dirs.values(), masks_dir)) as staging:
        jobs = [
            (name, paths if multi else paths[SINGLE_CHANNEL], msk, size, mask_threshold, empty_masks, staging, missing_sequences)
            for name, paths, msk in slices
        ]
        outcomes = _run_checks(jobs, workers, on_error, progress)
        kept, skipped = _deduplicate(outcomes, problems)
        if not kept:
            raise NoValidPairs(
                f"no valid image/mask pairs in {inputs_text} and {masks_dir} "
                f"({len(slices)} name matches, {len(skipped)} skipped: {dict(Counter(s.reason for s in skipped))})"
            )
        # The patient split is drawn over the kept slices plus those skipped only for a missing
        # sequence: a T1-CE-only study then tests on the same patients as an all-sequence one
        # (minus the patients without T1-CE), and single-image data splits exactly as before.
        lacking = [o for o in skipped if o.reason == MISSING_SEQUENCE and (o.area_fraction > 0 or empty_masks == "keep")]
        pool = kept + lacking
        pool_splits, pool_groups = assign_splits(
            [o.name for o in pool],
            [o.area_fraction for o in pool],
            group_by=group_by,
            n_strata=n_strata,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            seed=seed,
        )
        splits, groups = pool_splits[: len(kept)], pool_groups[: len(kept)]
        folders = (*channel_dirs, "masks")
        for split in SPLITS:
            for kind in folders:
                (staging / split / kind).mkdir(parents=True)
        for outcome, split in zip(kept, splits):
            for kind in folders:
                os.replace(staging / "all" / kind / f"{outcome.name}.png", staging / split / kind / f"{outcome.name}.png")
        shutil.rmtree(staging / "all")

        columns = {
            "id": [o.name for o in kept],
            "split": splits,
            "group": groups,
            "image_path": [o.image_path for o in kept],
            "mask_path": [o.mask_path for o in kept],
            "sha256": [o.sha256 for o in kept],
            "area_fraction": [round(o.area_fraction, 6) for o in kept],
            "original_height": [o.height for o in kept],
            "original_width": [o.width for o in kept],
        }
        if multi:  # each sequence's original file ("" where it was filled with zeros)
            columns |= {f"{channel}_path": [o.channel_paths[channel] for o in kept] for channel in channel_dirs}
            columns["filled"] = [";".join(o.filled) for o in kept]
        if tumour_types:
            columns["tumour_type"] = [tumour_types.get(o.name, "") for o in kept]
        manifest = pd.DataFrame(columns)
        atomic_write_text(staging / "manifest.csv", manifest.to_csv(index=False))
        split_groups = manifest.groupby("split")["group"].nunique()
        report = PrepareReport(
            valid_pairs=len(kept),
            skipped=[{"file": Path(s.image_path or s.mask_path).name, "reason": s.reason, "detail": s.detail} for s in skipped],
            skipped_by_reason=dict(sorted(Counter(s.reason for s in skipped).items())),
            masks_binarised=sum(o.mask_binarised for o in kept),
            splits={split: int((manifest["split"] == split).sum()) for split in SPLITS},
            groups={split: int(split_groups.get(split, 0)) for split in SPLITS},
            group_by=group_by,
            image_size=size,
            sequences=tuple(channel_dirs) if multi else (),
            missing_sequences=missing_sequences,
            missing_by_case=missing_by_case(outcomes, group_by) if multi else {},
        )
        atomic_write_json(staging / "report.json", report.to_json() | (report_extra or {}))
    report.seconds = time.perf_counter() - started
    return report


def _run_checks(jobs: list[tuple], workers: int, on_error: str, progress: bool) -> list[PairOutcome]:
    bar = tqdm(total=len(jobs), desc="prepare", unit="pair", disable=not progress)
    outcomes: list[PairOutcome] = []

    def collect(outcome: PairOutcome) -> None:
        bar.update()
        if outcome.reason and on_error == "fail":
            raise PrepareError(f"{outcome.image_path}: {outcome.reason}: {outcome.detail}")
        outcomes.append(outcome)

    try:
        if workers <= 1 or len(jobs) < 64:
            for job in jobs:
                collect(check_pair(*job))
        else:
            with worker_pool(workers, _worker_init) as pool:
                try:
                    for outcome in pool.map(_check_star, jobs, chunksize=max(1, min(32, len(jobs) // (workers * 8)))):
                        collect(outcome)
                except BaseException:
                    pool.shutdown(wait=True, cancel_futures=True)
                    raise
    finally:
        bar.close()
    return outcomes


def _deduplicate(outcomes: list[PairOutcome], problems: list[PairOutcome]) -> tuple[list[PairOutcome], list[PairOutcome]]:
    """Keep the first (by name) of pixel-identical images so a duplicate can never cross splits."""
    kept, skipped, first_by_hash = [], list(problems), {}
    for outcome in sorted(outcomes, key=lambda o: o.name):
        if outcome.reason:
            skipped.append(outcome)
        elif outcome.pixel_hash and outcome.pixel_hash in first_by_hash:
            outcome.reason = DUPLICATE_IMAGE
            outcome.detail = f"same pixels as {first_by_hash[outcome.pixel_hash]}"
            skipped.append(outcome)
        else:
            first_by_hash[outcome.pixel_hash] = outcome.name
            kept.append(outcome)
    skipped.sort(key=lambda o: (o.reason or "", o.name))
    return kept, skipped


def missing_by_case(outcomes: list[PairOutcome], group_by: str) -> dict[str, dict[str, int]]:
    """Per case (the split's group), how many slices had no file for each sequence (skipped or filled)."""
    counts: dict[str, Counter] = {}
    for outcome, group in zip(outcomes, group_ids([o.name for o in outcomes], group_by)):
        lacking = [channel for channel, path in outcome.channel_paths.items() if not path]
        if lacking:
            counts.setdefault(group.split(":", 1)[-1], Counter()).update(lacking)
    return {case: dict(sorted(counter.items())) for case, counter in sorted(counts.items())}
