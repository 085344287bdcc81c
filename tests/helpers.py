"""Shared test helpers: paths, small generated images and models, the optional real data.

Plain functions and constants only; pytest fixtures and hooks live in ``conftest.py``. Test modules
import from here (``from helpers import blob_pair``): ``tests/`` is on ``sys.path`` through
``pythonpath`` in ``[tool.pytest.ini_options]`` (with ``benchmarks/``, whose ``common`` module
holds what tests and benchmarks share), so this works whatever the import mode.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pytest

from common import TINY_UNET, copy_pipeline  # noqa: F401 - benchmarks/common.py: the toy project and model, shared with the benchmarks

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = PROJECT_ROOT.parent / "shared" / "data"


def shared_dataset(name: str, expect: str = "images") -> Path:
    """Path of a ../shared dataset, or skip the test saying why.

    ``expect`` is a folder the dataset must hold (``images`` for the single-channel sets; e.g.
    ``flair`` for lgg-256, ``kaggle_3m`` for lgg-kaggle-sample). Tests that call it carry the
    ``shared`` marker (``pytest -m "not shared"`` leaves them out).
    """
    path = SHARED_DATA / name
    if not (path / expect).is_dir():
        pytest.skip(f"real data not available: {path} is absent (see ../shared/README.md)")
    return path


# The quick profile at toy size: the whole DVC pipeline in a minute or two (40 phantoms, 32x32, 2 epochs).
TINY_PIPELINE = {
    "epochs": 2,
    "image_size": 32,
    "data": {"synthetic_count": 40, "synthetic_size": 64},
    "augment": {"copies_per_image": 1, "preview_pairs": 2},
    "prepare": {"group_by": "none", "workers": 1},
    "models": {
        "unet": {"base_filters": 4, "depth": 2, "caspp_rates": [1, 2]},
        "umobilenetv2": {"alpha": 0.35, "encoder_weights": "none", "decoder_filters": [16, 8, 8, 8, 8]},
    },
    "train": {"deterministic": False, "early_stopping_patience": 0, "seed": 7},
}


def missing_postgres() -> str | None:
    """Why ``tumorseg server`` cannot run PostgreSQL here (one line), or None when it can."""
    from tumorseg import server
    from tumorseg.errors import ServerError

    try:
        server.postgres_bindir()
        server.postgres_account()
    except ServerError as exc:
        return str(exc)
    return None


def train_stage_command(root: Path, model: str = "unet") -> list[str]:
    """The train stage as a subprocess in workspace ``root`` (its params.yaml and data/prepared; no augmented copies)."""
    import sys

    return [
        sys.executable,
        str(PROJECT_ROOT / "stages" / "train.py"),
        "--model", model,
        "--params", str(root / "params.yaml"),
        "--prepared", str(root / "data" / "prepared"),
        "--augmented", str(root / "none"),
    ]  # fmt: skip


def train_tiny_unet(
    prepared: Path,
    out: Path,
    epochs: int,
    *,
    lr: float = 1e-3,
    image_size: int = 32,
    seed: int = 0,
    init_from: str | Path | None = None,
    teacher=None,
    architecture: dict | None = None,
    tumour_types: dict[str, str] | None = None,
    **train_overrides,
):
    """``train_model`` on ``TINY_UNET`` (4 filters, depth 2, no HAC, no CASPP; ``architecture``
    changes some of it), from ``prepared`` (no augmented copies) into ``out``; ``train_overrides``
    replace ``train.*`` of params.yaml (determinism off unless given), ``teacher`` is
    distillation's teacher function, ``tumour_types`` the manifest's types (``train.oversample``)."""
    from tumorseg.config import load_config
    from tumorseg.training import train_model

    cfg = load_config(PROJECT_ROOT / "params.yaml")
    return train_model(
        "unet",
        architecture=cfg.models.unet.model_copy(update=TINY_UNET | (architecture or {})),
        loss=cfg.loss,
        train=cfg.train.model_copy(update={"deterministic": False} | train_overrides),
        augment=cfg.augment,
        init_from=Path(init_from) if init_from is not None else None,
        lr=lr,
        epochs=epochs,
        batch_size=8,
        image_size=image_size,
        seed=seed,
        prepared_dir=prepared,
        augmented_dir=None,
        model_path=out / "unet.keras",
        history_path=out / "history.csv",
        state_dir=out / "state",
        teacher=teacher,
        tumour_types=tumour_types,
        progress=False,
    )


def write_pair(root: Path, name: str, image: np.ndarray, mask: np.ndarray) -> None:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(root / "images" / name), image)
    assert cv2.imwrite(str(root / "masks" / name), mask)


def blob_pair(size: int = 64, seed: int = 0, radius: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """A textured image with one bright disc and its mask (distinct per seed)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    r = radius or int(rng.integers(size // 16 + 1, size // 5))
    centre = tuple(int(v) for v in rng.integers(r + 1, size - r - 1, 2))
    cv2.circle(mask, centre, r, 255, -1)
    image[mask > 0] = 200
    return image, mask


def blob_at(size: int, centre: tuple[int, int], radius: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Like :func:`blob_pair`, with the disc at a chosen ``centre`` (x, y)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(20, 90, (size, size), dtype=np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.circle(mask, centre, radius, 255, -1)
    image[mask > 0] = 200
    return image, mask


def brightness_model(size: int = 32):
    """A fixed-weight model that finds bright discs: p = sigmoid((x + x_left) / 16 - 16).

    Deterministic and non-trivial (the disc, not everything), and deliberately not
    mirror-symmetric (it looks at the left neighbour), so flip TTA has something to fix.
    """
    import keras

    inputs = keras.Input((size, size, 1), name="image")
    conv = keras.layers.Conv2D(1, 3, padding="same", activation="sigmoid", name="mask")
    model = keras.Model(inputs, conv(inputs))
    kernel = np.zeros((3, 3, 1, 1), np.float32)
    kernel[1, 0] = kernel[1, 1] = 1.0 / 16.0
    conv.set_weights([kernel, np.array([-128.0 / 8.0], np.float32)])
    return model


def legacy_unet(input_shape: tuple[int, int, int], **params):
    """A U-Net built as before issue 23, from the legacy ``HACBlock``/``CASPPBlock`` layer classes
    (what older ``models/unet.keras`` files, MLflow models and checkpoints hold): ``build_unet``
    itself, with its block functions swapped for the legacy layers."""
    from unittest import mock

    from tumorseg.models import CASPPBlock, HACBlock, build_model
    from tumorseg.models import unet as unet_module

    def hac(x, filters, name, **options):
        return HACBlock(filters, name=name, **options)(x)

    def caspp(x, filters, name, **options):
        return CASPPBlock(filters, name=name, **options)(x)

    with mock.patch.object(unet_module, "hac_block", hac), mock.patch.object(unet_module, "caspp_block", caspp):
        return build_model("unet", input_shape, **params)


def randomise_batchnorm(model, seed: int = 0) -> None:
    """Give every BatchNormalization non-default statistics and affine weights, so that they matter."""
    rng = np.random.default_rng(seed)
    for variable in model.weights:
        leaf = variable.path.rsplit("/", 1)[-1]
        if leaf == "moving_variance":
            variable.assign(rng.uniform(0.5, 2.0, variable.shape).astype("float32"))
        elif leaf in ("moving_mean", "beta"):
            variable.assign(rng.normal(0.0, 0.3, variable.shape).astype("float32"))
        elif leaf == "gamma":
            variable.assign(rng.uniform(0.5, 1.5, variable.shape).astype("float32"))


# Run by `python -I` in an empty folder, where an import hook refuses tumorseg even when it is
# installed (editable installs included): only Keras can load the files.
# The start of a `python -I -c` script in which `import tumorseg` fails (an import hook: -I alone
# still finds an editable install), and which stops if tumorseg were importable anyway.
_WITHOUT_TUMORSEG_PREAMBLE = """
import importlib.abc, json, sys

class NoTumorseg(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tumorseg":
            raise ModuleNotFoundError(f"No module named {name!r} (blocked)", name=name)

sys.meta_path.insert(0, NoTumorseg())
try:
    import tumorseg
except ImportError:
    pass
else:
    raise SystemExit("tumorseg is importable: the check would prove nothing")
"""

_WITHOUT_TUMORSEG = _WITHOUT_TUMORSEG_PREAMBLE + """
import numpy as np, keras
folder, paths = sys.argv[1], sys.argv[2:]
errors = {}
for index, path in enumerate(paths):
    try:
        model = keras.models.load_model(path)  # safe mode, no custom objects
        np.save(f"{folder}/out{index}.npy", model.predict(np.load(f"{folder}/in{index}.npy"), verbose=0))
    except Exception as exc:
        errors[index] = f"{type(exc).__name__}: {exc}"
with open(f"{folder}/errors.json", "w") as handle:
    json.dump(errors, handle)
"""


def predict_without_tumorseg(runs, scratch: Path) -> list:
    """For each ``(model file, input batch)`` in ``runs``, the file's predictions on the batch by
    plain ``keras.models.load_model`` in a separate Python that cannot import tumorseg; for a file
    that does not load there, the error text instead of an array. One interpreter for all runs."""
    import json
    import subprocess
    import sys

    scratch.mkdir(parents=True, exist_ok=True)
    for index, (_, batch) in enumerate(runs):
        np.save(scratch / f"in{index}.npy", batch)
    paths = [str(Path(path).resolve()) for path, _ in runs]
    result = subprocess.run([sys.executable, "-I", "-c", _WITHOUT_TUMORSEG, str(scratch), *paths], cwd=scratch, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    errors = json.loads((scratch / "errors.json").read_text())
    return [errors[str(i)] if str(i) in errors else np.load(scratch / f"out{i}.npy") for i in range(len(runs))]
