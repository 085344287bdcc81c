"""Where the raw image/mask pairs come from: Kaggle, a local folder or zip, or synthetic phantoms.

Whatever the source, the download stage leaves the same layout, ``RAW/images/*`` and
``RAW/masks/*``, plus ``RAW/SOURCE.json`` recording which source was used and a content hash.
That record travels into every later metric file and MLflow run, so numbers measured on
synthetic phantoms can never pass for real ones.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import tempfile
import threading
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from tumorseg.errors import SourceError  # noqa: F401 - raised here, defined with the other user errors
from tumorseg.images import IMAGE_SUFFIXES, list_image_files
from tumorseg.io import atomic_directory, atomic_write_json, hash_tree, read_json

log = logging.getLogger(__name__)

KAGGLE_HOST = ("www.kaggle.com", 443)
SOURCE_FILE = "SOURCE.json"

_IMAGE_WORDS = ("image", "img", "mri", "scan")
_MASK_WORDS = ("mask", "label", "seg", "gt", "annotation")


@dataclass(frozen=True)
class SourceInfo:
    """What ``data/raw/SOURCE.json`` holds."""

    source: str  # kaggle | local | synthetic
    kind: str  # real | synthetic
    origin: str  # dataset handle, local path, or generator settings
    data_hash: str
    n_images: int
    n_masks: int
    requested: str  # what params asked for (auto may resolve to synthetic)
    note: str

    @property
    def is_real(self) -> bool:
        return self.kind == "real"


def read_source_info(raw_dir: str | Path) -> SourceInfo:
    path = Path(raw_dir) / SOURCE_FILE
    try:
        return SourceInfo(**read_json(path))
    except FileNotFoundError:
        raise SourceError(f"{path} is missing: run the download stage first (`dvc repro download`)") from None
    except (TypeError, ValueError) as exc:
        raise SourceError(f"{path} is not a valid source record ({exc}); re-run `dvc repro -f download`") from None


def report_fields(info: SourceInfo) -> dict[str, str]:
    """The data fields prepare copies into report.json, so every later metric says what it was measured on."""
    return {"data_source": info.kind, "data_origin": info.origin, "data_hash": info.data_hash}


def folder_record(images: Path, masks: Path) -> dict[str, str]:
    """report.json's data fields for folders given by hand (``tumorseg prepare --images --masks``):
    the SOURCE.json that download or synth wrote beside both folders when it still describes them,
    else kind "unknown", the images folder as origin and the folders' content hash (computed as
    the download stage computes it, so the same files give the same hash)."""
    if not images.is_dir() or not masks.is_dir():
        return {}  # prepare says what is wrong with them
    folders = {images.resolve(), masks.resolve()}
    files = sorted(p for folder in folders for p in folder.iterdir() if p.is_file())
    try:
        content_hash = hash_tree(Path(os.path.commonpath(folders)), files)
    except OSError as exc:  # an unreadable file: prepare skips it and says why; the hash cannot be had
        log.warning("cannot hash the input data (%s): its origin is recorded without a content hash", exc)
        content_hash = "unknown"
    record_file = images.parent / SOURCE_FILE
    if images.parent.resolve() == masks.parent.resolve() and record_file.is_file():
        info = read_source_info(images.parent)
        if info.data_hash == content_hash:
            return report_fields(info)
        log.warning("%s describes other content than %s and %s now (hash differs): recording the data as unknown", record_file, images, masks)
    return {"data_source": "unknown", "data_origin": str(images.resolve()), "data_hash": content_hash}


def data_label(info: SourceInfo) -> str:
    """One line that says what data a number was measured on (used in every report)."""
    return f"{info.kind} data ({info.source}: {info.origin}; hash {info.data_hash[:12]})"


# --------------------------------------------------------------------------------------------
# Kaggle
# --------------------------------------------------------------------------------------------


def kaggle_reachable(timeout_s: float) -> tuple[bool, str]:
    """TCP-connect to Kaggle within ``timeout_s`` seconds, DNS included (run in a thread because
    a hung resolver ignores socket timeouts)."""
    outcome: dict[str, object] = {}

    def probe() -> None:
        try:
            with socket.create_connection(KAGGLE_HOST, timeout=timeout_s):
                outcome["ok"] = True
        except OSError as exc:
            outcome["error"] = f"{type(exc).__name__}: {exc}"

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout_s + 0.5)
    if outcome.get("ok"):
        return True, "reachable"
    return False, str(outcome.get("error", f"no answer within {timeout_s:g} s"))


def kaggle_credentials_hint() -> str | None:
    """Where credentials would come from, or None when none are configured."""
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return "environment (KAGGLE_USERNAME/KAGGLE_KEY)"
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "environment (KAGGLE_API_TOKEN)"
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    for name in ("kaggle.json", "access_token"):
        if (config_dir / name).is_file():
            return str(config_dir / name)
    return None


_KAGGLE_HELP = (
    "To use Kaggle: make https://www.kaggle.com reachable and set KAGGLE_USERNAME and KAGGLE_KEY "
    "(or put kaggle.json in ~/.kaggle). To work offline: set data.source to `local` with "
    "data.local_path pointing to a folder or .zip of images/ and masks/, or to `synthetic`."
)


def fetch_kaggle(dataset: str, timeout_s: float) -> Path:
    """Download (or reuse kagglehub's cache of) the dataset and return its local root folder."""
    reachable, why = kaggle_reachable(timeout_s)
    if not reachable:
        raise SourceError(f"Kaggle is not reachable ({why}). {_KAGGLE_HELP}")
    try:
        import kagglehub
    except ImportError as exc:  # declared in pyproject; only a broken install gets here
        raise SourceError(f"kagglehub is not installed ({exc}); run `pip install -e .`") from None
    try:
        return Path(kagglehub.dataset_download(dataset))
    except Exception as exc:  # kagglehub raises many types; all mean "could not download"
        credentials = kaggle_credentials_hint()
        detail = f"using credentials from {credentials}" if credentials else "no Kaggle credentials found"
        raise SourceError(f"Kaggle download of {dataset!r} failed ({detail}): {exc}. {_KAGGLE_HELP}") from None


# --------------------------------------------------------------------------------------------
# Finding the image and mask folders inside a dataset
# --------------------------------------------------------------------------------------------


def _folders_with_images(root: Path) -> dict[Path, list[Path]]:
    found = {}
    for folder in [root, *sorted(p for p in root.rglob("*") if p.is_dir())]:
        if any(part.startswith(".") or part == "__MACOSX" for part in folder.relative_to(root).parts):
            continue
        files = list_image_files(folder)
        if files:
            found[folder] = files
    return found


def _mask_stem(image_stem: str, mask_suffix: str) -> str:
    return image_stem + mask_suffix


def discover_pair_folders(root: Path, image_dir: str, mask_dir: str, mask_suffix: str) -> tuple[Path, Path]:
    """Find the image folder and the mask folder under ``root``.

    Exact (case-insensitive) names from params win; otherwise the pair of folders whose names look
    like images/masks and whose file stems match best. Raises with the folders seen if none fit.
    """
    folders = _folders_with_images(root)
    if not folders:
        raise SourceError(f"no image files ({', '.join(sorted(IMAGE_SUFFIXES))}) found under {root}")

    def named(name: str) -> list[Path]:
        return [f for f in folders if f.name.lower() == name.lower()]

    images, masks = named(image_dir), named(mask_dir)
    if len(images) == 1 and len(masks) == 1 and images[0] != masks[0]:
        return images[0], masks[0]

    def score(image_folder: Path, mask_folder: Path) -> int:
        stems = {p.stem for p in folders[image_folder]}
        return sum(1 for p in folders[mask_folder] if p.stem.removesuffix(mask_suffix) in stems)

    candidates = []
    for image_folder in folders:
        for mask_folder in folders:
            if image_folder == mask_folder:
                continue
            looks_right = any(w in image_folder.name.lower() for w in _IMAGE_WORDS) and any(
                w in mask_folder.name.lower() for w in _MASK_WORDS
            )
            if looks_right:
                candidates.append((score(image_folder, mask_folder), image_folder, mask_folder))
    candidates.sort(key=lambda c: -c[0])
    if candidates and candidates[0][0] > 0:
        return candidates[0][1], candidates[0][2]
    seen = ", ".join(str(f.relative_to(root)) or "." for f in list(folders)[:10])
    raise SourceError(
        f"could not find an image folder ({image_dir!r}) and a mask folder ({mask_dir!r}) with matching "
        f"file names under {root}; folders with images: {seen}. Set data.image_dir / data.mask_dir "
        f"(and data.mask_suffix if masks are named like NAME{mask_suffix or '_mask'}.png)."
    )


LABELS_FILE = "labels.csv"
CASES_FILE = "cases.csv"


def read_labels(labels: str, raw_dir: Path):
    """``file,tumour_type`` rows keyed by file stem (a DataFrame), or None (``none``, or ``auto``
    without a file). ``labels``: ``evaluate.labels`` (a CSV path, ``auto`` = ``raw_dir/labels.csv``,
    ``none``); prepare copies the types into manifest.csv, evaluate scores per type."""
    import pandas as pd

    if labels == "none":
        return None
    path = raw_dir / LABELS_FILE if labels == "auto" else Path(labels)
    if not path.is_file():
        if labels == "auto":
            return None
        raise FileNotFoundError(f"evaluate.labels: {path} does not exist (a CSV with columns file,tumour_type; or auto / none)")
    table = pd.read_csv(path, dtype=str)
    missing = {"file", "tumour_type"} - set(table.columns)
    if missing:
        raise ValueError(f"evaluate.labels: {path} lacks the column(s) {sorted(missing)} (needs file,tumour_type)")
    table["stem"] = table["file"].map(lambda f: Path(f).stem)
    return table.drop_duplicates("stem").set_index("stem")


def _copy_files(files: list[Path], destination: Path, desc: str, progress: bool) -> None:
    destination.mkdir(parents=True, exist_ok=True)
    for path in tqdm(files, desc=desc, unit="file", disable=not progress, leave=False):
        target = destination / path.name
        if target.exists():
            raise SourceError(f"two input files are both named {path.name!r} (second: {path}); names must be unique")
        try:
            os.link(path, target)  # free on the same disk; the source is never modified
        except OSError:
            shutil.copy2(path, target)


def _import_pairs(root: Path, staging: Path, image_dir: str, mask_dir: str, mask_suffix: str, progress: bool) -> None:
    image_folder, mask_folder = discover_pair_folders(root, image_dir, mask_dir, mask_suffix)
    log.info("images from %s, masks from %s", image_folder, mask_folder)
    _copy_files(list_image_files(image_folder), staging / "images", "images", progress)
    _copy_files(list_image_files(mask_folder), staging / "masks", "masks", progress)
    _copy_tables(root, staging, image_folder.parent)


def _copy_tables(root: Path, staging: Path, data_folder: Path) -> None:
    """Optional tables beside the data: per-image labels (figshare: file,tumour_type,original_size)
    for per-class scores, and per-case records (lgg-256: case,institution,...,sequences)."""
    for table in (LABELS_FILE, CASES_FILE):
        for candidate in (root / table, data_folder / table):
            if candidate.is_file():
                shutil.copy2(candidate, staging / table)
                log.info("%s from %s", table, candidate)
                break


def _extract_zip(archive: Path, destination: Path) -> Path:
    try:
        with zipfile.ZipFile(archive) as bundle:
            for member in bundle.infolist():
                target = (destination / member.filename).resolve()
                if not target.is_relative_to(destination.resolve()):
                    raise SourceError(f"{archive}: member {member.filename!r} would extract outside the folder")
            bundle.extractall(destination)
    except zipfile.BadZipFile as exc:
        raise SourceError(f"{archive} is not a readable zip file ({exc})") from None
    return destination


def _declared_kind(root: Path) -> str:
    """A local folder is real data unless it carries a SOURCE.json saying otherwise (as the
    folders written by `tumorseg synth` do), so phantoms imported as `local` stay labelled."""
    for record in (root / SOURCE_FILE, *root.glob(f"*/{SOURCE_FILE}")):
        try:
            if read_json(record).get("kind") == "synthetic":
                return "synthetic"
        except (OSError, ValueError, AttributeError):
            continue
    return "real"


def write_synthetic_source(
    out_dir: str | Path, *, count: int, size: int, seed: int, sequences: tuple[str, ...] = (), progress: bool = True
) -> SourceInfo:
    """Generate phantoms into ``out_dir`` (images/ and masks/, or one folder per sequence and
    masks/) and label the folder as synthetic.

    Built beside ``out_dir`` and swapped in, like a stage's output: a user's folder is never written into.
    """
    with atomic_directory(out_dir) as staging:
        _write_phantoms(staging, count=count, size=size, seed=seed, sequences=sequences, progress=progress)
        origin = _synthetic_origin(count, size, seed, sequences)
        return _record_source(staging, sequences, source="synthetic", kind="synthetic", origin=origin, requested="synthetic", note="")


def _write_phantoms(staging: Path, *, count: int, size: int, seed: int, sequences: tuple[str, ...], progress: bool) -> None:
    from tumorseg.data.synthetic import write_sequence_dataset, write_synthetic_dataset

    if sequences:
        write_sequence_dataset(staging, count=count, size=size, seed=seed, sequences=sequences, progress=progress)
    else:
        write_synthetic_dataset(staging, count=count, size=size, seed=seed, progress=progress)


def _synthetic_origin(count: int, size: int, seed: int, sequences: tuple[str, ...] = ()) -> str:
    views = f", sequences={'+'.join(sequences)}" if sequences else ""
    return f"tumorseg phantoms (count={count}, size={size}, seed={seed}{views})"


def _record_source(folder: Path, sequences: tuple[str, ...], *, source: str, kind: str, origin: str, requested: str, note: str) -> SourceInfo:
    """Hash the channel folders (images/, or one per sequence) and masks/; write SOURCE.json beside them."""
    channels = [folder / name for name in (sequences or ("images",))]
    images = sorted(p for channel in channels if channel.is_dir() for p in channel.iterdir())
    masks = sorted((folder / "masks").iterdir())
    info = SourceInfo(
        source=source,
        kind=kind,
        origin=origin,
        data_hash=hash_tree(folder, images + masks),
        n_images=len({p.stem for p in images}),  # slices, whatever their number of sequences
        n_masks=len(masks),
        requested=requested,
        note=note,
    )
    atomic_write_json(folder / SOURCE_FILE, asdict(info))
    return info


# --------------------------------------------------------------------------------------------
# The download stage
# --------------------------------------------------------------------------------------------


def download(
    out_dir: str | Path,
    *,
    source: str,
    kaggle_dataset: str,
    network_timeout_s: float,
    local_path: str | None,
    image_dir: str,
    mask_dir: str,
    mask_suffix: str,
    synthetic_count: int,
    synthetic_size: int,
    seed: int,
    sequences: tuple[str, ...] = (),
    layout: str = "auto",
    progress: bool = True,
) -> SourceInfo:
    """Fill ``out_dir`` with ``images/`` (or one folder per sequence), ``masks/`` and ``SOURCE.json``
    from the chosen source (multi-sequence layouts: :mod:`tumorseg.data.layouts`).

    ``auto`` tries Kaggle and falls back to synthetic phantoms, saying so loudly. The folder is
    replaced atomically: an interrupted download leaves the previous data (or nothing).
    """
    out_dir = Path(out_dir)
    requested = source
    note = ""
    if source == "auto":
        reachable, why = kaggle_reachable(network_timeout_s)
        if reachable:
            source = "kaggle"
        else:
            source = "synthetic"
            note = f"data.source=auto fell back to SYNTHETIC phantoms: Kaggle not reachable ({why})"
            log.warning("=" * 78)
            log.warning("%s.", note)
            log.warning("Every metric from this run is on synthetic data, not real MRI.")
            log.warning("=" * 78)

    local_input = [Path(local_path).expanduser()] if source == "local" and local_path else []
    with atomic_directory(out_dir, inputs=local_input) as staging:
        def import_from(root: Path) -> None:
            if sequences:
                from tumorseg.data.layouts import import_dataset

                import_dataset(layout, root, staging, sequences, mask_dir=mask_dir, mask_suffix=mask_suffix, progress=progress)
                _copy_tables(root, staging, root)
            else:
                _import_pairs(root, staging, image_dir, mask_dir, mask_suffix, progress)

        if source == "synthetic":
            _write_phantoms(staging, count=synthetic_count, size=synthetic_size, seed=seed, sequences=sequences, progress=progress)
            origin, kind = _synthetic_origin(synthetic_count, synthetic_size, seed, sequences), "synthetic"
        elif source == "kaggle":
            root = fetch_kaggle(kaggle_dataset, network_timeout_s)
            import_from(root)
            origin, kind = f"kaggle:{kaggle_dataset}", "real"
        elif source == "local":
            if not local_path:
                raise SourceError("data.source is `local` but data.local_path is not set: point it to a folder or .zip")
            path = Path(local_path).expanduser()
            if not path.exists():
                raise SourceError(f"data.local_path {str(path)!r} does not exist")
            if path.is_file():
                with tempfile.TemporaryDirectory(dir=staging) as scratch:
                    root = _extract_zip(path, Path(scratch))
                    import_from(root)
                    kind = _declared_kind(root)
            else:
                import_from(path)
                kind = _declared_kind(path)
            origin = str(path.resolve())
        else:
            raise SourceError(f"data.source must be auto, kaggle, local or synthetic, not {source!r}")

        info = _record_source(staging, sequences, source=source, kind=kind, origin=origin, requested=requested, note=note)
    return info
