"""params.yaml -> one validated, typed config object.

This is the only module that reads ``params.yaml``. Everything downstream receives plain values
from the :class:`Config` object, so a setting has exactly one source and one default.

A *profile* (``profile: quick``) deep-merges ``profiles.<name>`` over the file's values before
validation, so the reference settings stay written in ``params.yaml`` while demos and CI run small.
"""

from __future__ import annotations

import copy
import logging
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
log = logging.getLogger(__name__)


class ConfigError(ValueError):
    """A bad ``params.yaml``: the message names the key and what is wrong with it."""


class _Strict(BaseModel):
    # forbid: an unknown (e.g. misspelled) key is an error, never silently ignored.
    model_config = ConfigDict(extra="forbid", frozen=True, strict=False)


Probability = Field(ge=0.0, le=1.0)


class DataConfig(_Strict):
    source: Literal["auto", "kaggle", "local", "synthetic"] = "auto"
    kaggle_dataset: str = "divyaiyer123/brain-tumor-segmentation-with-mask"
    network_timeout_s: float = Field(5.0, gt=0, le=120)
    local_path: str | None = None
    image_dir: str = "images"
    mask_dir: str = "masks"
    mask_suffix: str = ""
    synthetic_count: int = Field(600, ge=1, le=1_000_000)
    synthetic_size: int = Field(256, ge=32, le=4096)


class PrepareConfig(_Strict):
    on_error: Literal["skip", "fail"] = "skip"
    mask_threshold: int = Field(127, ge=0, le=254)
    empty_masks: Literal["skip", "keep"] = "skip"
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    group_by: str = "block:20"
    size_strata: int = Field(3, ge=1, le=20)
    workers: int = Field(0, ge=0, le=256)

    @field_validator("group_by")
    @classmethod
    def _check_group_by(cls, value: str) -> str:
        if value == "none":
            return value
        kind, _, arg = value.partition(":")
        if kind == "block":
            if not arg.isdigit() or int(arg) < 1:
                raise ValueError("block:N needs a positive integer N, e.g. block:20")
            return value
        if kind == "regex":
            try:
                pattern = re.compile(arg)
            except re.error as exc:
                raise ValueError(f"invalid regular expression {arg!r}: {exc}") from None
            if pattern.groups < 1:
                raise ValueError("regex:PATTERN needs one capture group holding the patient id")
            return value
        raise ValueError("must be 'none', 'block:N' or 'regex:PATTERN'")

    @model_validator(mode="after")
    def _check_fractions(self) -> "PrepareConfig":
        if self.val_fraction + self.test_fraction >= 1.0:
            raise ValueError("val_fraction + test_fraction must leave room for training (< 1)")
        return self


class _Transform(_Strict):
    p: float = Probability


class LimitTransform(_Transform):
    limit: float = Field(ge=0.0)


class ElasticTransform(_Transform):
    alpha: float = Field(ge=0.0)
    sigma: float = Field(gt=0.0)


class BrightnessContrast(_Transform):
    brightness: float = Field(ge=0.0, le=1.0)
    contrast: float = Field(ge=0.0, le=1.0)


class NoiseTransform(_Transform):
    std: float = Field(ge=0.0, le=1.0)


class AugmentConfig(_Strict):
    copies_per_image: int = Field(2, ge=0, le=100)
    preview_pairs: int = Field(6, ge=1, le=50)
    rotate: LimitTransform = LimitTransform(p=0.5, limit=15)
    translate: LimitTransform = LimitTransform(p=0.5, limit=0.0625)
    scale: LimitTransform = LimitTransform(p=0.5, limit=0.1)
    hflip: _Transform = _Transform(p=0.5)
    vflip: _Transform = _Transform(p=0.2)
    elastic: ElasticTransform = ElasticTransform(p=0.2, alpha=30.0, sigma=6.0)
    brightness_contrast: BrightnessContrast = BrightnessContrast(p=0.5, brightness=0.15, contrast=0.15)
    noise: NoiseTransform = NoiseTransform(p=0.3, std=0.03)
    crop_pad: LimitTransform = LimitTransform(p=0.3, limit=0.08)

    @field_validator("translate", "crop_pad")
    @classmethod
    def _fraction_limit(cls, value: LimitTransform) -> LimitTransform:
        if value.limit >= 0.5:
            raise ValueError("limit is a fraction of the image size and must be < 0.5")
        return value

    @field_validator("scale")
    @classmethod
    def _scale_limit(cls, value: LimitTransform) -> LimitTransform:
        if value.limit >= 1.0:
            raise ValueError("limit is a relative zoom and must be < 1")
        return value


class LossConfig(_Strict):
    """The reference loss: weighted BCE + soft Dice + Tversky (+ an optional focal term)."""

    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)
    tversky_weight: float = Field(1.0, ge=0.0)
    tversky_alpha: float = Field(0.3, ge=0.0, le=1.0)  # weight of false positives
    tversky_beta: float = Field(0.7, ge=0.0, le=1.0)  # weight of false negatives
    smooth: float = Field(1.0, gt=0.0)
    focal_weight: float = Field(0.0, ge=0.0)  # focal BCE term (not in the reference loss)
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)  # down-weighting of easy pixels; 0 = BCE

    @model_validator(mode="after")
    def _some_term(self) -> "LossConfig":
        if self.bce_weight + self.dice_weight + self.tversky_weight + self.focal_weight <= 0:
            raise ValueError("at least one of bce_weight, dice_weight, tversky_weight, focal_weight must be > 0")
        return self


class UNetConfig(_Strict):
    """Base U-Net trained from scratch; HAC and CASPP are switchable for ablations."""

    base_filters: int = Field(32, ge=4, le=256)
    depth: int = Field(4, ge=2, le=5)
    use_hac: bool = True
    use_caspp: bool = True
    caspp_rates: tuple[int, ...] = (1, 2, 4, 6)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    attention_gates: bool = False  # additive attention gates on the skip connections

    @field_validator("caspp_rates")
    @classmethod
    def _positive_rates(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(rate < 1 for rate in value):
            raise ValueError("needs one or more dilation rates >= 1")
        return value


class UMobileNetV2Config(_Strict):
    """MobileNetV2 encoder + U-Net decoder."""

    alpha: float = Field(1.0, gt=0.0, le=1.4)
    encoder_weights: str = "imagenet"  # imagenet | none | path to a .h5/.keras weights file
    decoder_filters: tuple[int, ...] = (256, 128, 64, 32, 16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # keras.applications builds BatchNorm with momentum 0.999; from scratch its moving statistics
    # lag so far behind that inference-mode predictions are empty. 0.9 tracks them.
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    freeze_epochs: int = Field(0, ge=0)
    fine_tune_lr_factor: float = Field(0.1, gt=0.0, le=1.0)
    attention_gates: bool = False  # additive attention gates on the skip connections

    @field_validator("decoder_filters")
    @classmethod
    def _five_stages(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if len(value) != 5 or any(f < 1 for f in value):
            raise ValueError("needs 5 positive filter counts (strides 16, 8, 4, 2, 1)")
        return value


class InitFromConfig(_Strict):
    """Per model: a trained ``.keras`` model of the same architecture to start from, or none."""

    unet: str = "none"
    umobilenetv2: str = "none"


class TrainConfig(_Strict):
    """How both models are trained (the shared settings; lr/epochs/batch are top level)."""

    optimizer: Literal["adam", "adamw"] = "adam"
    lr_scale: float = Field(1.0, gt=0.0, le=1000.0)  # effective lr = lr * lr_scale
    weight_decay: float = Field(0.0, ge=0.0, le=1.0)  # adamw only
    online_augment: bool = False  # albumentations on the fly, on top of the offline copies
    use_augmented: bool = True  # train on data/augmented as well as the original training pairs
    early_stopping_patience: int = Field(10, ge=0)  # epochs without val Dice gain; 0 = off
    reduce_lr_patience: int = Field(4, ge=0)  # 0 = off
    reduce_lr_factor: float = Field(0.5, gt=0.0, lt=1.0)
    min_lr: float = Field(1e-6, ge=0.0)
    # plateau: constant lr, halved by ReduceLROnPlateau; cosine: linear warm-up then cosine decay
    # to min_lr over the planned epochs (a fixed budget is spent better; ReduceLROnPlateau is off).
    lr_schedule: Literal["plateau", "cosine"] = "plateau"
    warmup_epochs: int = Field(1, ge=0)  # cosine only
    # Polyak averaging: >0 keeps an exponential moving average of the weights (Keras use_ema) and
    # validates, checkpoints and ships the average instead of the last step's weights; 0 = off.
    ema_momentum: float = Field(0.0, ge=0.0, lt=1.0)
    # Deep supervision: >0 trains auxiliary mask heads on the coarser decoder stages (a stage at
    # stride s weighs this / s in the loss); the published model has no heads. 0 = off.
    deep_supervision: float = Field(0.0, ge=0.0, le=10.0)
    threads: int = Field(0, ge=0, le=512)  # TensorFlow intra-op threads; 0 = all cores
    deterministic: bool = True  # op determinism: same seed -> same weights (slightly slower)
    jit_compile: bool = False  # XLA; measured 3.7x slower per step on 2 CPU cores
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # Warm start (fine-tuning, progressive resizing: a 128² model continued at 256²). Every weight
    # must fit the model that params.yaml builds; the input size may differ (fully convolutional).
    init_from: InitFromConfig = InitFromConfig()
    # Seed of the training alone (weight init, batch order, online augmentation), so that seeds can
    # be compared on one split; null = the top-level seed, which also draws the split.
    seed: int | None = Field(None, ge=0, le=2**31 - 1)

    def effective_seed(self, split_seed: int) -> int:
        return split_seed if self.seed is None else self.seed


class PretrainConfig(_Strict):
    """`tumorseg pretrain`: self-supervised warm start without ImageNet (restore masked images);
    lr, batch_size, image_size, seed and the optimizer settings are training's."""

    epochs: int = Field(10, ge=1, le=10_000)
    holes: int = Field(8, ge=1, le=1000)  # blanked rectangles per image: 1..holes
    hole_fraction: float = Field(0.125, gt=0.0, le=1.0)  # largest hole side, fraction of the image side
    noise_std: float = Field(0.05, ge=0.0, le=1.0)  # Gaussian noise std, fraction of the intensity range


class EvaluateConfig(_Strict):
    """How the test split is scored (the headline numbers) and post-processed."""

    # original: predictions resized back to each raw mask's size and scored against the raw mask
    # (what a user of the model sees); prepared: scored at image_size against the resized masks.
    resolution: Literal["original", "prepared"] = "original"
    threshold: float = Field(0.5, gt=0.0, lt=1.0)
    tta: bool = False  # flip test-time augmentation: mean of the image and its mirror image
    min_component_px: int = Field(0, ge=0)  # drop predicted blobs smaller than this (scoring resolution)
    # Pick threshold and min_component_px on the VALIDATION split (never the test split).
    tune_on_val: bool = False
    # Per-class Dice: a CSV with columns file,tumour_type (e.g. figshare labels.csv).
    # auto = data/raw/labels.csv when the dataset shipped one; none = skip.
    labels: str = "auto"


class CIConfig(_Strict):
    """The metric gate run by `tumorseg check-metrics` (and CI)."""

    # Minimum per-image test Dice, per profile and model.
    min_dice: dict[str, dict[Literal["unet", "umobilenetv2"], float]] = {
        "quick": {"unet": 0.70, "umobilenetv2": 0.70},
        "full": {"unet": 0.75, "umobilenetv2": 0.80},
    }
    # Largest allowed drop of a metric vs the baseline folder's evaluate_<model>.json (if set).
    baseline_dir: str | None = None
    max_regression: float = Field(0.02, ge=0.0, le=1.0)

    @field_validator("min_dice")
    @classmethod
    def _dice_range(cls, value: dict) -> dict:
        for profile, models in value.items():
            for model, threshold in models.items():
                if not 0.0 <= threshold <= 1.0:
                    raise ValueError(f"min_dice.{profile}.{model} must be in [0, 1], got {threshold}")
        return value


class ModelsConfig(_Strict):
    unet: UNetConfig = UNetConfig()
    umobilenetv2: UMobileNetV2Config = UMobileNetV2Config()


class Config(_Strict):
    """The whole validated configuration (after the profile is applied)."""

    profile: str = "full"
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=4096)
    image_size: int = Field(256, ge=32, le=2048)
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    models: ModelsConfig = ModelsConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    ci: CIConfig = CIConfig()

    @field_validator("image_size")
    @classmethod
    def _divisible_by_32(cls, value: int) -> int:
        if value % 32:
            raise ValueError(f"must be divisible by 32 (the models downsample 5 times), got {value}")
        return value

    def flat(self) -> dict[str, Any]:
        """Dotted-key view (``data.source``), e.g. for logging as MLflow params."""
        return _flatten(self.model_dump(mode="json"))


def _flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _deep_merge(base: dict[str, Any], override: dict[str, Any], path: str = "") -> dict[str, Any]:
    merged = copy.deepcopy(base)
    for key, value in override.items():
        dotted = f"{path}{key}"
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value, dotted + ".")
        elif isinstance(value, dict) and key in merged:
            raise ConfigError(f"params: profiles override `{dotted}` with a section, but it is a value")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply ``profiles[profile]`` over the file's values; drop the ``profiles`` table."""
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError("params: `profiles` must be a mapping of profile name -> overrides")
    name = raw.get("profile", "full")
    if name == "full":
        return raw
    if name not in profiles:
        known = ", ".join(["full", *profiles]) or "full"
        raise ConfigError(f"params: `profile` is {name!r}, which is not defined; use one of: {known}")
    override = profiles[name] or {}
    if not isinstance(override, dict):
        raise ConfigError(f"params: `profiles.{name}` must be a mapping of overrides")
    if "profile" in override or "profiles" in override:
        raise ConfigError(f"params: `profiles.{name}` may not set `profile` or `profiles`")
    _warn_about_shadowed_settings(raw, override, name)
    return _deep_merge(raw, override)


def _warn_about_shadowed_settings(raw: dict[str, Any], override: dict[str, Any], profile: str) -> None:
    """A profile wins over the file's values; say so when it hides a value someone changed
    (e.g. `dvc exp run -S epochs=50` while `profile: quick` is set)."""
    defaults = Config().flat()
    file_values = _flatten({k: v for k, v in raw.items() if k != "profile"})
    for key, value in _flatten(override).items():
        if key in file_values and file_values[key] != defaults.get(key) and file_values[key] != value:
            log.warning(
                "params: profile %r sets %s = %r, hiding %r from params.yaml; set profile: full or edit profiles.%s",
                profile, key, value, file_values[key], profile,
            )


def _format_validation_error(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        message = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            message = "unknown key (misspelled, or not a setting of this version)"
        elif item["type"] != "value_error" and not isinstance(item.get("input"), dict):
            message += f" (got {item.get('input')!r})"
        lines.append(f"  `{key}`: {message}")
    return "invalid params:\n" + "\n".join(lines)


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate an already-parsed params mapping (profile applied here)."""
    if not isinstance(raw, dict):
        raise ConfigError("params: the file must hold a mapping of keys to values")
    try:
        return Config.model_validate(resolve_profile(raw))
    except ValidationError as error:
        raise ConfigError(_format_validation_error(error)) from None


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate ``params.yaml``; ``overrides`` are dotted keys applied before the profile."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: not found (run from the project root or pass --params)") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if overrides:
        raw = _deep_merge(raw, _unflatten(overrides))
    try:
        return config_from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
