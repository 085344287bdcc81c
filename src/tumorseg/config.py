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
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, field_validator, model_validator

DEFAULT_PARAMS = Path("params.yaml")
log = logging.getLogger(__name__)

MAX_ERROR_CHARS = 300  # an error is one line: a terminal row, a log line, a CI annotation
ERROR_PREFIX = "error: "  # how the CLI and the stages print it; the whole line stays within the limit
MAX_PARAMS_BYTES = 1 << 20  # params.yaml is ~10 kB; anything near 1 MB is not a params file
MAX_YAML_VALUES = 100_000  # values after alias expansion (params.yaml has ~300): stops alias bombs
MAX_IMAGE_SIZE = 2048
SEQUENCE_NAME = re.compile(r"[a-z](?:_?[a-z0-9]){0,31}")  # a folder name; no "__" (models/inputs.py joins with it)
SINGLE_CHANNEL = "images"  # the folder of the one grayscale channel when data.sequences is empty
RESERVED_FOLDERS = (SINGLE_CHANNEL, "masks")
MAX_SEQUENCES = 8


class ConfigError(ValueError):
    """A bad params file or setting: one line naming the file and the key, and what is wrong."""

    def __init__(self, *problems: str, source: str = "params") -> None:
        self.problems, self.source = problems, source
        super().__init__(one_line(source, problems))

    def located(self, source: str | Path) -> ConfigError:
        """The same problems, reported against the file they came from."""
        return ConfigError(*self.problems, source=str(source))


def clip(text: str, limit: int) -> str:
    """``text`` on one line, at most ``limit`` characters (an ellipsis marks the cut)."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: max(limit - 1, 0)] + "…"


def one_line(source: str, problems: Sequence[str], limit: int = MAX_ERROR_CHARS - len(ERROR_PREFIX)) -> str:
    """``source: problem; problem (+N more)`` in at most ``limit`` characters."""
    source = " ".join(str(source).split())
    keep = limit // 3  # a long path keeps its end: the file name says the most
    head = (source if len(source) <= keep else "…" + source[1 - keep :]) + ": "
    problems = [clip(problem, limit) for problem in problems] or ["invalid"]
    shown: list[str] = []
    for problem in problems:
        more = len(problems) - len(shown) - 1
        if len(head + "; ".join([*shown, problem]) + (f" (+{more} more)" if more else "")) > limit:
            break
        shown.append(problem)
    more = len(problems) - max(len(shown), 1)
    tail = f" (+{more} more)" if more else ""
    if not shown:  # the first problem always shows, cut to fit
        return head + clip(problems[0], limit - len(head) - len(tail)) + tail
    return head + "; ".join(shown) + tail


def check_image_size(value: int) -> int:
    """The models downsample 5 times (stride 32), and one 2048² image already costs gigabytes of
    activations: every input side (``image_size``, ``prepare --size``) passes this one check."""
    if isinstance(value, bool) or not isinstance(value, int) or not 32 <= value <= MAX_IMAGE_SIZE or value % 32:
        raise ValueError(f"must be a multiple of 32 from 32 to {MAX_IMAGE_SIZE} (the models downsample 5 times), got {value!r}")
    return value


def _list_as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


# YAML has lists, not tuples: accept a list here, then validate its items strictly.
IntTuple = Annotated[tuple[int, ...], BeforeValidator(_list_as_tuple)]


class _Strict(BaseModel):
    # forbid: an unknown (e.g. misspelled) key is an error, never silently ignored.
    # strict: `epochs: true`, `epochs: "5"` or `use_hac: "yes"` are errors, not 1, 5 and True
    # (an integer where a number is expected stays fine: `lr: 1` is 1.0).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


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
    # MRI sequences in channel order (e.g. [t1, flair, t1ce]); empty = one grayscale image per slice
    # from image_dir (the Figshare layout). A model trained on sequences expects exactly these.
    sequences: tuple[str, ...] = ()
    # Where a multi-sequence dataset keeps its slices (sequences only): folders = ROOT/<sequence>/ and
    # ROOT/<mask_dir>/; kaggle_lgg = kaggle_3m/<case>/<case>_<n>.tif (t1, flair, t1ce as RGB);
    # nifti = <case>_<sequence>.nii[.gz] volumes with <case>_seg.nii[.gz]; auto = whichever is found.
    layout: Literal["auto", "folders", "kaggle_lgg", "nifti"] = "auto"

    @field_validator("sequences", mode="before")
    @classmethod
    def _check_sequences(cls, value: Any) -> Any:
        if isinstance(value, list):
            value = tuple(value)
        if isinstance(value, tuple):
            bad = [name for name in value if not isinstance(name, str) or not SEQUENCE_NAME.fullmatch(name) or name in RESERVED_FOLDERS]
            if bad:
                raise ValueError(
                    f"sequence names are folder names: lower-case letters and digits, single _ between them, starting with a letter, "
                    f"not {' or '.join(RESERVED_FOLDERS)} (got {bad[0]!r})"
                )
            if len(set(value)) != len(value):
                raise ValueError(f"a sequence is listed twice: {list(value)}")
            if len(value) > MAX_SEQUENCES:
                raise ValueError(f"at most {MAX_SEQUENCES} sequences, got {len(value)}")
        return value

    @property
    def channels(self) -> tuple[str, ...]:
        """The folder of each input channel in raw and prepared data: the sequences, or ``images``."""
        return self.sequences or (SINGLE_CHANNEL,)


class PrepareConfig(_Strict):
    on_error: Literal["skip", "fail"] = "skip"
    mask_threshold: int = Field(127, ge=0, le=254)
    empty_masks: Literal["skip", "keep"] = "skip"
    val_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.15, ge=0.0, lt=1.0)
    group_by: str = "block:20"
    size_strata: int = Field(3, ge=1, le=20)
    workers: int = Field(0, ge=0, le=256)
    # A slice without one of data.sequences: skip it (counted per case in report.json) or fill the
    # sequence with zeros (train.sequence_dropout teaches the model to cope with a blank one).
    missing_sequences: Literal["skip", "fill"] = "skip"

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
    def _check_fractions(self) -> PrepareConfig:
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
    """The reference loss: weighted BCE + soft Dice + Tversky (+ optional focal and boundary terms)."""

    bce_weight: float = Field(1.0, ge=0.0)
    dice_weight: float = Field(1.0, ge=0.0)
    tversky_weight: float = Field(1.0, ge=0.0)
    tversky_alpha: float = Field(0.3, ge=0.0, le=1.0)  # weight of false positives
    tversky_beta: float = Field(0.7, ge=0.0, le=1.0)  # weight of false negatives
    smooth: float = Field(1.0, gt=0.0)
    focal_weight: float = Field(0.0, ge=0.0)  # focal BCE term (not in the reference loss)
    focal_gamma: float = Field(2.0, ge=0.0, le=10.0)  # down-weighting of easy pixels; 0 = BCE
    boundary_weight: float = Field(0.0, ge=0.0)  # BCE on the band around the mask's outline (not in the reference loss)
    boundary_width: int = Field(2, ge=1, le=16)  # the band: pixels within this many of the outline, both sides

    @model_validator(mode="after")
    def _some_term(self) -> LossConfig:
        if self.bce_weight + self.dice_weight + self.tversky_weight + self.focal_weight + self.boundary_weight <= 0:
            raise ValueError("at least one of bce_weight, dice_weight, tversky_weight, focal_weight, boundary_weight must be > 0")
        return self


class UNetConfig(_Strict):
    """Base U-Net trained from scratch; HAC and CASPP are switchable for ablations."""

    base_filters: int = Field(32, ge=4, le=256)
    depth: int = Field(4, ge=2, le=5)
    use_hac: bool = True
    use_caspp: bool = True
    caspp_rates: IntTuple = (1, 2, 4, 6)
    dropout: float = Field(0.1, ge=0.0, lt=1.0)
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    attention_gates: bool = False  # additive attention gates on the skip connections
    transformer_depth: int = Field(0, ge=0, le=12)  # transformer layers on the deepest feature map (TransUNet); 0 = off
    transformer_heads: int = Field(8, ge=1, le=64)  # attention heads of each transformer layer

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
    decoder_filters: IntTuple = (256, 128, 64, 32, 16)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # keras.applications builds BatchNorm with momentum 0.999; from scratch its moving statistics
    # lag so far behind that inference-mode predictions are empty. 0.9 tracks them.
    bn_momentum: float = Field(0.9, gt=0.0, lt=1.0)
    freeze_epochs: int = Field(0, ge=0)
    fine_tune_lr_factor: float = Field(0.1, gt=0.0, le=1.0)
    attention_gates: bool = False  # additive attention gates on the skip connections
    transformer_depth: int = Field(0, ge=0, le=12)  # transformer layers on the deepest feature map (TransUNet); 0 = off
    transformer_heads: int = Field(8, ge=1, le=64)  # attention heads of each transformer layer

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


class DistillConfig(_Strict):
    """Knowledge distillation: per model, teacher ``.keras`` files (several = their ensemble mean)
    whose probabilities on the training images are blended into the targets, so that one model
    learns what an ensemble knows; ``[]`` = plain masks."""

    unet: tuple[str, ...] = ()
    umobilenetv2: tuple[str, ...] = ()
    weight: float = Field(0.5, ge=0.0, le=1.0)  # target = (1 - weight) * mask + weight * teacher probability
    tta: bool = True  # the teachers predict with flip TTA, as they are scored

    @field_validator("unet", "umobilenetv2", mode="before")
    @classmethod
    def _named_files(cls, value: Any) -> Any:
        value = _list_as_tuple(value)
        if isinstance(value, tuple) and any(not isinstance(item, str) or not item.strip() or item == "none" for item in value):
            raise ValueError("a list of teacher model files ([] = no distillation)")
        return value

    def teachers(self, model: str) -> tuple[str, ...]:
        return getattr(self, model)


class OversampleConfig(_Strict):
    """Class-aware sampling: the training pairs of the weak kinds (a tumour type, the smallest
    tumours) appear ``repeats`` times per epoch, each copy augmented on its own, so the loss sees
    more of what the models get wrong most; the epoch grows by the extra copies."""

    # a tumour type of the data's labels.csv (prepare copies it into manifest.csv), e.g. glioma; none = off
    tumour_type: str = Field("none", min_length=1, max_length=100)
    small_tumours: bool = False  # the smallest third of the training tumours by area
    repeats: int = Field(2, ge=1, le=10)  # a pair chosen by both is still drawn `repeats` times

    @property
    def active(self) -> bool:
        return self.repeats > 1 and (self.tumour_type != "none" or self.small_tumours)


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
    # Multi-sequence data: the probability that a training slice has one of its sequences blanked
    # (zeros, as prepare.missing_sequences=fill stores a missing one), so a model copes without it.
    sequence_dropout: float = Field(0.0, ge=0.0, le=1.0)
    # How many sequences one dropout may blank at once (1..this, never every one): 2 of 3 also
    # teaches FLAIR-only segmentation, as some patients come (6 of lgg-256's 89).
    sequence_dropout_max: int = Field(1, ge=1, le=MAX_SEQUENCES - 1)
    threads: int = Field(0, ge=0, le=512)  # TensorFlow intra-op threads; 0 = all cores
    deterministic: bool = True  # op determinism: same seed -> same weights (slightly slower)
    jit_compile: bool = False  # XLA; measured 3.7x slower per step on 2 CPU cores
    # BatchNormalization through TensorFlow's fused kernel (Keras 3 runs it as separate ops); same
    # function, saved layers stay stock; UMobileNetV2 step 28-31% shorter with 2 threads (benchmarks/results/train_step.json)
    fused_batch_norm: bool = True
    distribute: Literal["none", "mirrored", "multi_worker"] = "none"
    # Warm start (fine-tuning, progressive resizing: a 128² model continued at 256²). Every weight
    # must fit the model that params.yaml builds; the input size may differ (fully convolutional).
    init_from: InitFromConfig = InitFromConfig()
    distill: DistillConfig = DistillConfig()
    oversample: OversampleConfig = OversampleConfig()
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


class RegistryConfig(_Strict):
    """The MLflow model registry: whether evaluate registers the pipeline's best model."""

    # true: after scoring, the model with the best VALIDATION Dice (never test) becomes a new
    # version of ``name`` with ``alias`` pointing at it (``models:/<name>@<alias>`` loads it).
    register_best: bool = False
    name: str = Field("tumorseg", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,99}$")
    alias: str = Field("candidate", pattern=r"^[A-Za-z][A-Za-z0-9_\-]{0,62}$")


class CIConfig(_Strict):
    """The metric gate run by `tumorseg check-metrics` (and CI)."""

    # Minimum per-image test Dice, per profile and model.
    min_dice: dict[str, dict[str, float]] = {
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
                if model not in MODEL_NAMES:
                    raise ValueError(f"min_dice.{profile}.{model}: unknown model (known: {', '.join(MODEL_NAMES)})")
                if not 0.0 <= threshold <= 1.0:
                    raise ValueError(f"min_dice.{profile}.{model} must be in [0, 1], got {threshold}")
        return value


class ModelsConfig(_Strict):
    unet: UNetConfig = UNetConfig()
    umobilenetv2: UMobileNetV2Config = UMobileNetV2Config()


# The models this project trains, declared once: the fields of ``models:`` in params.yaml (the
# model registry, dvc.yaml's ``vars`` and the stage scripts are checked against or read this).
MODEL_NAMES: tuple[str, ...] = tuple(ModelsConfig.model_fields)


class Config(_Strict):
    """The whole validated configuration (after the profile is applied)."""

    profile: str = "full"
    lr: float = Field(1e-4, gt=0.0, le=1.0)
    epochs: int = Field(30, ge=1, le=10_000)
    batch_size: int = Field(8, ge=1, le=4096)
    image_size: int = 256
    seed: int = Field(42, ge=0, le=2**31 - 1)
    data: DataConfig = DataConfig()
    prepare: PrepareConfig = PrepareConfig()
    augment: AugmentConfig = AugmentConfig()
    loss: LossConfig = LossConfig()
    models: ModelsConfig = ModelsConfig()
    train: TrainConfig = TrainConfig()
    pretrain: PretrainConfig = PretrainConfig()
    evaluate: EvaluateConfig = EvaluateConfig()
    registry: RegistryConfig = RegistryConfig()
    ci: CIConfig = CIConfig()

    @field_validator("image_size")
    @classmethod
    def _model_input_side(cls, value: int) -> int:
        return check_image_size(value)

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
            raise ConfigError(f"`{dotted}`: a profile or override sets it to a section, but it is a value")
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def resolve_profile(raw: dict[str, Any]) -> dict[str, Any]:
    """Apply ``profiles[profile]`` over the file's values; drop the ``profiles`` table."""
    raw = dict(raw)
    profiles = raw.pop("profiles", None) or {}
    if not isinstance(profiles, dict):
        raise ConfigError("`profiles`: must be a mapping of profile name -> overrides")
    name = raw.get("profile", "full")
    if not isinstance(name, str):
        raise ConfigError(f"`profile`: must be a profile name such as full or quick, got {clip(repr(name), 60)}")
    if name == "full":
        return raw
    if name not in profiles:
        known = ", ".join(["full", *profiles]) or "full"
        raise ConfigError(f"`profile`: {clip(repr(name), 60)} is not defined; use one of: {clip(known, 100)}")
    override = profiles[name] or {}
    if not isinstance(override, dict):
        raise ConfigError(f"`profiles.{name}`: must be a mapping of overrides")
    if "profile" in override or "profiles" in override:
        raise ConfigError(f"`profiles.{name}`: may not set `profile` or `profiles`")
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


_EXPECTED = {
    "int_type": "an integer",
    "float_type": "a number",
    "bool_type": "true or false",
    "string_type": "a string",
    "tuple_type": "a list",
    "dict_type": "a mapping",
    "model_type": "a section (a mapping of keys to values)",
}


def _describe(value: Any) -> str:
    """A value as the user wrote it in YAML, with its type when the type is the problem."""
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, str):
        return f"{clip(repr(value), 60)} (a string: no quotes around numbers)" if _looks_numeric(value) else f"{clip(repr(value), 60)} (a string)"
    if value is None:
        return "nothing (null)"
    if isinstance(value, (list, dict)):
        return f"a {'list' if isinstance(value, list) else 'mapping'} {clip(repr(value), 40)}"
    return clip(repr(value), 60)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _problems(error: ValidationError) -> list[str]:
    problems = []
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        kind, given = item["type"], item.get("input")
        if kind == "extra_forbidden":
            message = "unknown key (misspelled, or not a setting of this version)"
        elif kind in _EXPECTED:
            message = f"must be {_EXPECTED[kind]}, got {_describe(given)}"
        else:
            message = item["msg"].removeprefix("Value error, ")
            if kind != "value_error" and not isinstance(given, dict):
                message += f" (got {_describe(given)})"
        problems.append(f"`{key}`: {message}")
    return problems


def _missing_sections(raw: dict[str, Any], model: type[BaseModel], prefix: str = "") -> list[str]:
    """Sections (at any depth) that are absent or empty: their defaults would be used silently,
    so a file that lost its `train:` section would still "work". Only ``profile`` may be left out
    (it means `full`, the file as written)."""
    missing = []
    for name, field in model.model_fields.items():
        is_section = isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)
        if name not in raw and (is_section or model is Config) and name != "profile":
            missing.append(prefix + name)
        elif is_section and raw[name] is None:
            missing.append(prefix + name)
        elif is_section and isinstance(raw[name], dict):
            missing += _missing_sections(raw[name], field.annotation, f"{prefix}{name}.")
    return missing


def config_from_dict(raw: dict[str, Any]) -> Config:
    """Validate a parsed params file (profile applied here). It must be complete: every key and
    section of the project's params.yaml at the top level, every section below them."""
    if not isinstance(raw, dict):
        raise ConfigError(f"must hold a mapping of keys to values (like the project's params.yaml), got {_describe(raw)}")
    missing = _missing_sections(raw, Config)
    if missing:
        raise ConfigError(
            f"missing or empty: {', '.join(f'`{key}`' for key in missing)} "
            "(every setting of the project's params.yaml is required; copy the missing ones from it)"
        )
    try:
        return Config.model_validate(resolve_profile(raw))
    except ValidationError as error:
        raise ConfigError(*_problems(error)) from None


def load_config(path: str | Path = DEFAULT_PARAMS, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate ``params.yaml``; ``overrides`` are dotted keys applied before the profile."""
    path = Path(path)
    try:
        raw = parse_params(read_params_text(path))
        if overrides and isinstance(raw, dict):
            raw = _deep_merge(raw, _unflatten(overrides))
        return config_from_dict(raw)
    except ConfigError as exc:
        raise exc.located(path) from None


def read_params_text(path: Path) -> str:
    """The file's text, or one line saying why it is not a params file (a folder, an image...)."""
    if path.is_dir():
        raise ConfigError("is a folder, not a params file (give the YAML file, e.g. --params params.yaml)", source=str(path))
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_PARAMS_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError("not found (run from the project root or pass --params)", source=str(path)) from None
    except OSError as exc:
        raise ConfigError(f"cannot read it: {exc.strerror or exc}", source=str(path)) from None
    if len(data) > MAX_PARAMS_BYTES:
        raise ConfigError(f"larger than {MAX_PARAMS_BYTES >> 20} MB, so not a params file (params.yaml is ~10 kB)", source=str(path))
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"not a text file (byte {exc.object[exc.start]:#04x} at offset {exc.start} is not UTF-8): give the YAML params file",
            source=str(path),
        ) from None
    if "\0" in text:
        raise ConfigError("a binary file (it holds NUL bytes), not a YAML params file", source=str(path))
    return text


def parse_params(text: str) -> Any:
    """YAML text -> Python values, refusing what PyYAML would accept silently or slowly."""
    loader = _ParamsLoader(text)
    try:
        node = loader.get_single_node()
        if node is not None:
            _count_values(node, {}, set())
        data = None if node is None else loader.construct_document(node)
        if data is None:
            raise ConfigError("empty (no settings at all): copy the project's params.yaml and edit it")
        return data
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"not valid YAML{where}: {clip(exc.problem or exc.context or '', 120)}") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"not valid YAML: {clip(str(exc), 150)}") from None
    except RecursionError:
        raise ConfigError("nested too deeply to be a params file") from None
    finally:
        loader.dispose()


# YAML 1.2 floats: PyYAML follows YAML 1.1, where `1e-4` (no dot) is a string; DVC (`dvc exp run
# -S lr=1e-4`) and every YAML 1.2 tool read a number. (.inf/.nan and 1:30.5 as in YAML 1.1.)
_FLOAT = re.compile(
    r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+\.[0-9_]*
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""",
    re.X,
)
_FLOAT_TAG = "tag:yaml.org,2002:float"
_MERGE_TAG = "tag:yaml.org,2002:merge"


class _ParamsLoader(yaml.SafeLoader):
    """SafeLoader with YAML 1.2 floats that refuses duplicate keys (PyYAML keeps the last one)."""

    yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag != _FLOAT_TAG]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
    }

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_line: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == _MERGE_TAG:  # `<<: *defaults` may be overridden by the keys beside it
                continue
            key, line = self.construct_object(key_node, deep=True), key_node.start_mark.line + 1
            try:
                if key in first_line:
                    raise ConfigError(
                        f"`{clip(str(key), 60)}`: duplicate key at line {line} (first at line {first_line[key]}); "
                        "YAML would silently keep only the last"
                    )
            except TypeError:  # an unhashable key: the base class says so
                break
            first_line[key] = line
        return super().construct_mapping(node, deep=deep)


_ParamsLoader.add_implicit_resolver(_FLOAT_TAG, _FLOAT, list("-+0123456789."))


def _count_values(node: yaml.Node, counted: dict[int, int], open_nodes: set[int]) -> int:
    """Values in ``node`` once aliases are expanded; refuse an alias bomb (a few lines of
    anchors that expand to billions of values) before anything expands it."""
    if id(node) in counted:
        return counted[id(node)]
    if id(node) in open_nodes:
        raise ConfigError("an anchor contains an alias to itself (a recursive structure), which no setting can hold")
    open_nodes.add(id(node))
    if isinstance(node, yaml.SequenceNode):
        total = 1 + sum(_count_values(child, counted, open_nodes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        total = 1 + sum(_count_values(k, counted, open_nodes) + _count_values(v, counted, open_nodes) for k, v in node.value)
    else:
        total = 1
    open_nodes.discard(id(node))
    if total > MAX_YAML_VALUES:
        raise ConfigError(f"YAML anchors and aliases expand to more than {MAX_YAML_VALUES:,} values (an alias bomb?); a params file needs a few hundred")
    counted[id(node)] = total
    return total


def _unflatten(flat: dict[str, Any]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for dotted, value in flat.items():
        node = tree
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree
