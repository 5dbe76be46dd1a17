"""The typed schema of params.yaml: one section per stage, validated before any work starts."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Annotated, Literal, Union

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


DEFAULT_MARGIN = 1.3  # the common protocol's face box enlargement


class FacesParams(Section):
    frames_per_video: int = Field(16, ge=1, le=1000, description="frames sampled uniformly from each video")
    detector: str = Field("haar", description="face detector from the registry (dfdetect.faces)")
    margin: Union[float, Literal["auto"]] = Field(
        1.3,
        description="the face box is enlarged this much (the common protocol: 1.3); auto: as much as the faces "
        "of --data's own stills are framed (measured by prepare and stored with the model, so every "
        "crop of evaluation and serving frames faces as training saw them)",
    )
    align: bool = Field(
        False,
        description="turn each face so its eyes are level before cropping (a detector with landmarks: retinaface)",
    )
    crop_size: int = Field(256, ge=16, le=1024, description="side of the saved square face crops")
    min_face: int = Field(40, ge=8, description="smallest face side searched, in pixels of the frame")
    crop_images: bool = Field(False, description="also crop the largest face of still images (not for tight crops)")

    @field_validator("margin")
    @classmethod
    def _margin_range(cls, value):
        if value != "auto" and not 0.5 <= value <= 3.0:
            raise ValueError("needs 0.5 <= margin <= 3.0, or 'auto'")
        return value

    def with_margin(self, model_margin: float | None) -> "FacesParams":
        """These settings with the margin a model's crops need: the one it was trained with when it recorded one
        (faces framed as training saw them, whatever params say now), else this margin (1.3 for auto)."""
        if model_margin is not None:
            return self.model_copy(update={"margin": float(model_margin)})
        return self if self.margin != "auto" else self.model_copy(update={"margin": DEFAULT_MARGIN})


def _compile_regex(value: str) -> re.Pattern:
    try:
        return re.compile(value)
    except re.error as exc:
        raise ValueError(f"not a regular expression: {exc}") from None


def _checked_regex(value: str) -> str:
    _compile_regex(value)
    return value


RegexStr = Annotated[str, AfterValidator(_checked_regex)]  # a field holding a regular expression that compiles


def _check_group_pattern(value: str | None) -> str | None:
    if value is not None and "video" not in _compile_regex(value).groupindex:
        raise ValueError("needs a named group (?P<video>...)")
    return value


def _check_name(value: str | None) -> str | None:
    if value is not None and not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", value):
        raise ValueError("a data set name is letters, digits, '.', '_' and '-' (it names folders and metrics)")
    return value


class _NamedGroups(Section):
    """Checks for a data set's `name` (it names folders and metrics) and `group_pattern` (a regex with a video
    group), shared by the main data set's params and every other set's."""

    @field_validator("group_pattern", check_fields=False)  # the fields are the subclasses'
    @classmethod
    def _pattern_compiles(cls, value):
        return _check_group_pattern(value)

    @field_validator("name", check_fields=False)
    @classmethod
    def _name_is_a_label(cls, value):
        return _check_name(value)


class NamedSet(_NamedGroups):
    """A data set folder with a name for reports and metrics, and how its files group into videos."""

    path: str = Field(description="folder in the seed layout: {train,val,test}/{real,fake}/, or {real,fake}/ alone")
    name: str | None = Field(None, description="names the set in reports and metrics (default: the folder name)")
    face_crop: bool = Field(
        False,
        description="crop the largest face of its stills (whole photos, portraits) as "
        "prepare.faces says; videos are always face-cropped",
    )
    group_pattern: str | None = Field(
        None,
        description="as prepare.group_pattern, for this set's file names: frames "
        "of one video stay together (one split; video metrics)",
    )

    @property
    def label(self) -> str:
        return self.name or Path(self.path).name


class SourceParams(NamedSet):
    """One more data set of a training mixture (beside --data): DVC-versioned, validated by prepare."""

    max_per_class: int | None = Field(
        None,
        ge=1,
        description="at most this many files per class and split (a video "
        "counts once), whole groups chosen by a stable hash",
    )
    split: dict[Literal["train", "val", "test"], float] = Field(
        default_factory=lambda: {"train": 0.7, "val": 0.15, "test": 0.15},  # as mixture.DEFAULT_SPLIT
        description="for a source without split folders: the share of its groups in each split",
    )

    @field_validator("split")
    @classmethod
    def _fractions(cls, value):
        if "train" not in value or "val" not in value or abs(sum(value.values()) - 1) > 1e-6 or min(value.values()) < 0:
            raise ValueError("needs train and val (and optionally test) shares that sum to 1")
        return value


class PrepareParams(_NamedGroups):
    image_size: int = Field(128, ge=16, le=1024, description="side of the square images the cache holds")
    min_size: int = Field(32, ge=1, description="images smaller than this (either side) are excluded")
    max_bad_fraction: float = Field(
        0.05, ge=0.0, le=1.0, description="fatal when more than this fraction of files is unreadable"
    )
    allow_leakage: bool = Field(False, description="allow the same content in two splits (not advised)")
    drop_leaks: bool = Field(
        False,
        description="the same image content in two splits (e.g. one photo under two names "
        "in a public set): keep it in the earliest split, drop and list the rest, "
        "instead of stopping",
    )
    group_pattern: str | None = Field(
        None,
        description="regex on image file names with named groups video (and identity): frames of one video "
        "or identity may not be in two splits; e.g. '^(?P<video>[a-z]+_\\d+)_\\d+$'",
    )
    faces: FacesParams = FacesParams()
    name: str = Field("data", description="names the --data set in reports and metrics (a mixture's first source)")
    max_per_class: int | None = Field(
        None,
        ge=1,
        description="at most this many files of --data per class and split "
        "(whole videos or identities, chosen by a stable hash)",
    )
    sources: list[SourceParams] = Field(
        default_factory=list,
        description="more data sets mixed into the same "
        "splits (a training mixture); train.source_weights sets their shares",
    )

    @model_validator(mode="after")
    def _unique_names(self):
        names = [self.name, *(s.label for s in self.sources)]
        if len(set(names)) < len(names):
            raise ValueError(f"data set names must differ (name each source): {names}")
        for s in self.sources:
            _check_name(s.label)
        return self


class ModelParams(Section):
    name: str = Field("custom_cnn", description="an architecture from the model registry")
    pretrained: bool = Field(False, description="start from ImageNet weights (local file or torch cache)")
    weights_path: str | None = Field(None, description="file of ImageNet weights; default: torch hub cache")
    dropout: float = Field(0.3, ge=0.0, lt=1.0)
    residual_branch: bool = Field(
        False,
        description="add a small CNN on fixed high-pass residuals of the image, whose logit is added to the backbone's",
    )
    image_size: int | None = Field(
        None,
        ge=16,
        le=1024,
        description="the model's input side; null: prepare.image_size. Smaller: each image is downscaled from the "
        "prepared cache (a cheaper model, e.g. a distilled student), and served at this size",
    )
    colour: Literal["rgb", "grey"] = Field(
        "rgb",
        description="grey: the model sees luma only (ITU-R 601, in all three channels), in training and serving "
        "alike; colour statistics and chroma compression differ between sources (README 'Generalisation')",
    )
    patch_blocks: int | None = Field(
        None,
        ge=1,
        description="keep only the backbone's first N blocks and score each position of their feature map with a "
        "1 x 1 head, the image's logit the mean (a classifier of limited receptive field, Chai et al. 2020; "
        "efficientnet_lite*, e.g. 5: Lite0's first three stages); null: the whole backbone",
    )
    scales: list[int] = Field(
        default_factory=lambda: [1],
        min_length=1,
        max_length=4,
        description="the input seen at these downscaling factors (2: average-pooled to half its side) by the same "
        "network: training draws one factor per batch, scoring averages the logits of all ([1, 2] measured in "
        "README 'Generalisation')",
    )

    @field_validator("scales")
    @classmethod
    def _distinct_scales(cls, value: list[int]) -> list[int]:
        if any(f < 1 or f > 8 for f in value) or len(set(value)) < len(value):
            raise ValueError(f"model.scales: distinct integer factors from 1 to 8 expected, got {value}")
        return value


def _ordered_range(value: tuple, lowest: float, highest: float) -> tuple:
    """A [low, high] pair within [lowest, highest]."""
    low, high = value
    if not lowest <= low <= high <= highest:
        raise ValueError(f"needs {lowest} <= low <= high <= {highest}")
    return value


class AugmentParams(Section):
    hflip: bool = True
    rotation_degrees: float = Field(10.0, ge=0.0, le=180.0)
    scale: tuple[float, float] = Field(
        (1.0, 1.0),
        description="zoom drawn per image [low, high] (above 1: the face larger), about the centre: how far a face "
        "crop of another detector or face shape frames it differently ([1, 1]: as prepared)",
    )
    aspect: tuple[float, float] = Field(
        (1.0, 1.0),
        description="width over height stretch drawn per image [low, high] (area kept): faces of other proportions, "
        "such as children's ([1, 1]: none)",
    )
    color_jitter: float = Field(0.2, ge=0.0, le=1.0, description="brightness/contrast/saturation strength")
    grayscale_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of images turned grey (ITU-R 601 luma in all three channels): colour carries less label",
    )
    # How fakes reach users: re-compressed, blurred, noisy, resized. Each applies to a random share of images.
    jpeg_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images re-compressed as JPEG")
    jpeg_quality: tuple[int, int] = Field((50, 95), description="JPEG quality range [low, high]")
    jpeg_scale: tuple[float, float] = Field(
        (1.0, 1.0),
        description="size, relative to the image, at which a re-compressed image is compressed [low, high]: a "
        "photo is compressed at its own resolution and then resized by the face crop, so its 8 x 8 blocks reach the "
        "model magnified or shrunk ([1, 1]: compressed at the image's own size)",
    )
    blur_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images Gaussian-blurred")
    blur_sigma: float = Field(1.5, gt=0.0, le=5.0, description="largest blur sigma, pixels")
    sharpen_prob: float = Field(
        0.0, ge=0.0, le=1.0, description="share of images sharpened (unsharp mask; never one also blurred)"
    )
    sharpen_amount: float = Field(1.0, gt=0.0, le=5.0, description="largest unsharp-mask amount (1: detail doubled)")
    sharpness_match_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="share of images blurred or sharpened to the sharpness of another image of the batch (sharpness then carries no label)",
    )
    noise_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images with Gaussian noise")
    noise_std: float = Field(0.03, gt=0.0, le=0.5, description="largest noise standard deviation (images in [0, 1])")
    downscale_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images downscaled and scaled back up")
    downscale_min: float = Field(0.5, gt=0.0, lt=1.0, description="smallest downscale factor")
    # Cutout: a hidden patch makes the model look at the whole face, not one region of one generator.
    erase_prob: float = Field(0.0, ge=0.0, le=1.0, description="share of images with a random rectangle greyed out")
    erase_area: tuple[float, float] = Field((0.02, 0.2), description="erased share of the image [low, high]")

    @field_validator("erase_area")
    @classmethod
    def _area_range(cls, value):
        low, high = value
        if not 0 < low <= high < 1:
            raise ValueError("needs 0 < low <= high < 1")
        return value

    @field_validator("jpeg_quality")
    @classmethod
    def _quality_range(cls, value):
        return _ordered_range(value, 1, 100)

    @field_validator("jpeg_scale")
    @classmethod
    def _scale_range(cls, value):
        return _ordered_range(value, 0.25, 4)

    @field_validator("scale", "aspect")
    @classmethod
    def _geometry_range(cls, value):
        return _ordered_range(value, 0.5, 2)


class SbiParams(Section):
    mode: Literal["none", "add", "only"] = Field(
        "none",
        description="self-blended fakes from real faces: add (beside the known fakes) or only (real faces alone)",
    )
    prob: float = Field(
        0.5, ge=0.0, le=1.0, description="share of the real faces of a batch turned into self-blended fakes"
    )
    mask: Literal["landmarks", "ellipse"] = Field(
        "ellipse",
        description="landmarks: the convex hull of the face mesh (MediaPipe's 468 points, as the paper), an "
        "ellipse where no face mesh is found; ellipse: always an ellipse around the crop's centre",
    )
    alteration: Literal["mild", "paper"] = Field(
        "mild",
        description="how the blended copy differs from the face: mild (colour gain and shift, a light blur or "
        "unsharp mask, always inside the mask); paper (the paper's augmentation: colour, brightness and contrast "
        "shifts, then shrunk 2 or 4 times and enlarged back, or sharpened; the inside or the outside of the mask "
        "altered at random)",
    )
    paired: bool = Field(
        False,
        description="true: a chosen real face stays in the batch as a real and its self-blend is added beside it "
        "(the paper's batches of pairs: both hold the same face, source and identity, so those carry no label; each "
        "is augmented on its own draws; the batch grows by the share chosen); false: the chosen real is replaced "
        "by its self-blend",
    )
    donor_prob: float = Field(
        0.0,
        ge=0.0,
        le=1.0,
        description="chance that a self-blend's inside comes from another real face of the batch instead of the "
        "face itself (its colours matched to the face's inside the mask; aligned by the face mesh's five points, "
        "whatever mask says, unaligned where no face is found; blended whole): Face X-ray's blended images, an "
        "identity swap; 0: self-blends only",
    )
    donor_choice: Literal["random", "nearest"] = Field(
        "random",
        description="which other real face of the batch is a blend's donor (with donor_prob > 0): random, any of "
        "them uniformly; nearest, one of the 3 whose five landmarks are shaped most like the face's once position, "
        "scale and rotation are taken out (Face X-ray's choice: a turned head gets a donor turned the same way; "
        "random where the face mesh finds no face)",
    )
    boundary_weight: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="> 0: besides the label, a head on boundary_layer's features learns to draw each self-blend's "
        "blending boundary (none on a real face), weighed this much against the label loss (Face X-ray's "
        "supervision; the head is training's alone, never served); 0: off",
    )
    boundary_layer: RegexStr = Field(
        r"^net\._blocks\.4$",
        description="regular expression naming the one module whose output feature map the boundary head reads "
        "(the default: the end of EfficientNet-Lite's third stage, 16 x 16 at 128 px)",
    )

    @model_validator(mode="after")
    def _boundary_needs_self_blends(self):
        if self.boundary_weight > 0 and self.mode == "none":
            raise ValueError(
                "boundary_weight > 0 learns the self-blends' blending boundaries: it needs mode add or only"
            )
        return self


class MixStyleParams(Section):
    """MixStyle: early feature statistics (an image's style) mixed between images of a batch in training."""

    prob: float = Field(
        0.0, ge=0.0, le=1.0, description="chance that a batch's styles are mixed at each chosen layer (0: off)"
    )
    alpha: float = Field(
        0.1, gt=0.0, le=10.0, description="Beta(alpha, alpha) draws each image's share of its own style"
    )
    layers: RegexStr = Field(
        r"^net\._blocks\.(2|4)$",
        description="regular expression of module names whose outputs are mixed (the default: the ends of "
        "EfficientNet-Lite's second and third stages; early layers hold style, later ones content)",
    )


class OperatingPointParams(Section):
    """How the decision threshold is chosen on validation (dfdetect.operating_point)."""

    policy: Literal["eer", "fpr", "recall"] = Field(
        "eer",
        description="eer: where false positives and misses balance; fpr: flag at most `target` of real faces; "
        "recall: catch at least `target` of fakes",
    )
    target: float | None = Field(
        None, gt=0.0, lt=1.0, description="the false-positive rate (policy fpr) or recall (policy recall) to reach"
    )

    @model_validator(mode="after")
    def _target_fits_policy(self):
        if self.policy != "eer" and self.target is None:
            raise ValueError(f"policy '{self.policy}' needs a target, e.g. 0.01")
        if self.policy == "eer" and self.target is not None:
            raise ValueError("policy 'eer' takes no target (set policy: fpr or recall to use one)")
        return self


class TrainParams(Section):
    epochs: int = Field(20, ge=1, le=10_000)
    batch_size: int = Field(32, ge=1, le=4096)
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = Field(0.001, gt=0.0, le=10.0)
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD only")
    weight_decay: float = Field(0.0001, ge=0.0, le=1.0)
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    step_size: int = Field(5, ge=1, description="StepLR only: epochs between decays")
    gamma: float = Field(0.5, gt=0.0, le=1.0, description="StepLR only: decay factor")
    early_stopping_patience: int = Field(
        5, ge=0, description="epochs without a val AUC gain (or, at the same val AUC, a lower val loss); 0 disables"
    )
    ema_decay: float = Field(
        0.0,
        ge=0.0,
        lt=1.0,
        description="exponential moving average of the weights, validated "
        "and shipped instead of the last step's (0 disables; 0.998 averages about 500 steps)",
    )
    balance_classes: bool = Field(
        False,
        description="weigh each batch's real and fake images equally in the loss, whatever their counts "
        "(self-blends in mode add turn reals into fakes, so fakes outnumber reals about 3 to 1 at prob 0.5)",
    )
    consistency: float = Field(
        0.0,
        ge=0.0,
        le=100.0,
        description="weight of a consistency loss: each image is augmented twice and the two views' scores "
        "must agree (symmetric KL divergence; about R-Drop's alpha / 2); the step then costs twice as much, "
        "and the logged train_loss includes the term. 0: one view",
    )
    freeze: RegexStr = Field(
        "",
        description="regular expression: parameters whose names match keep their initial "
        "(ImageNet) values, e.g. '^net\\.(_conv_stem|_bn0|_blocks\\.[0-2]\\.)' for Lite0's first "
        "layers; their gradients are then not computed (batch-norm statistics still adapt). "
        "Empty: train every parameter",
    )
    augment: AugmentParams = AugmentParams()
    sbi: SbiParams = SbiParams()
    mixstyle: MixStyleParams = Field(
        MixStyleParams(),
        description="mix early feature statistics between images in training (README 'Generalisation')",
    )
    source_weights: dict[str, float] = Field(
        default_factory=dict,
        description="a mixture's share of training draws per source name (prepare.name and "
        "prepare.sources); an unlisted source weighs 1. Empty: every image once per epoch",
    )
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="auto: fp16 AMP on CUDA, bf16 autocast on a CPU that has native bf16, else fp32"
    )
    channels_last: Union[Literal["auto"], bool] = Field("auto", description="auto, true or false")
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    num_workers: int = Field(0, ge=0, le=64)
    wise_alpha: float = Field(
        1.0,
        gt=0.0,
        le=1.0,
        description="weight-space ensembling (WiSE-FT): after training, each weight the ImageNet file supplied "
        "becomes alpha x fine-tuned + (1 - alpha) x ImageNet (a new head stays fine-tuned), and the temperature "
        "and threshold are chosen again on validation; needs model.pretrained and train.calibrate (a pruned "
        "network's fine-tune and a distilled student are never mixed). 1: the fine-tuned weights as trained",
    )
    probe_epochs: int = Field(
        0,
        ge=0,
        le=10_000,
        description="linear probing before fine-tuning (LP-FT): the first this many of train.epochs train only "
        "the parts the ImageNet file does not supply (the head), on frozen ImageNet features and batch-norm "
        "statistics, then every layer learns; needs model.pretrained and one process. 0: fine-tune from the start",
    )
    calibrate: bool = Field(
        True,
        description="fit a temperature and a shift of the logits on validation after training (Platt scaling: "
        "served probabilities then mean what they say); the threshold moves with it",
    )
    operating_point: OperatingPointParams = Field(
        OperatingPointParams(),
        description="the decision threshold's policy, chosen on validation and stored with the model",
    )

    @model_validator(mode="after")
    def _probe_leaves_fine_tuning(self):
        if self.probe_epochs and self.probe_epochs >= self.epochs:
            raise ValueError(
                f"probe_epochs ({self.probe_epochs}) must be fewer than epochs ({self.epochs}): the probe's epochs "
                "count within train.epochs and at least one must fine-tune every layer"
            )
        return self


class SuiteSet(NamedSet):
    """A data set the model is scored on, beside its own test split: the generalisation suite. Its test split
    if it has one, else all of it; either class may be missing (a set of fakes or of reals only)."""

    attributes: str | None = Field(
        None,
        description="regex with named groups on file names, e.g. "
        "'^(?P<age>\\d+)_(?P<gender>\\d)_(?P<race>\\d)_': error rates per group value",
    )
    attribute_names: dict[str, dict[str, str]] = Field(
        default_factory=dict, description="readable names of attribute values, e.g. {gender: {'0': male}}"
    )
    attribute_bins: dict[str, list[float]] = Field(
        default_factory=dict,
        description="numeric attributes grouped into bands at these edges, e.g. {age: [3, 13, 20, 40, 60]}: "
        "'under 3', '3 to under 13', ..., '60 and over' (one group per value would hold too few images to judge)",
    )

    @field_validator("attributes")
    @classmethod
    def _attributes_compile(cls, value):
        if value is not None:
            try:
                compiled = re.compile(value)
            except re.error as exc:
                raise ValueError(f"not a regular expression: {exc}") from None
            if not compiled.groupindex:
                raise ValueError("needs at least one named group, e.g. (?P<gender>\\d)")
        return value

    @field_validator("attribute_bins")
    @classmethod
    def _bins_increase(cls, value):
        for attr, edges in value.items():
            finite = all(math.isfinite(e) for e in edges)
            if not edges or not finite or any(b <= a for a, b in zip(edges, edges[1:])):
                raise ValueError(
                    f"{attr}: band edges must be a non-empty, strictly increasing list of finite numbers, got {edges}"
                )
        return value

    @model_validator(mode="after")
    def _bins_name_attributes(self):
        if self.attribute_bins and not self.attributes:
            raise ValueError("attribute_bins needs attributes: a regex whose named groups read those values")
        named = set(re.compile(self.attributes).groupindex) if self.attributes else set()
        unknown = sorted(set(self.attribute_bins) - named)
        if unknown:
            raise ValueError(f"attribute_bins names {unknown}, not named groups of attributes ({sorted(named)})")
        both = sorted(set(self.attribute_bins) & set(self.attribute_names))
        if both:
            raise ValueError(f"{both}: an attribute is either banded (attribute_bins) or named (attribute_names)")
        return self


class EvaluateParams(Section):
    split: Literal["test", "val"] = "test"
    threshold: Union[float, Literal["val"]] = Field(
        "val", description="decision threshold, or 'val': the EER threshold found on validation"
    )
    robustness: bool = Field(
        True, description="also score the split re-compressed (JPEG 90/70/50), blurred, downscaled"
    )
    datasets: list[Union[str, SuiteSet]] = Field(
        default_factory=list,
        description="the generalisation suite: more data sets to score, one table (a path, or "
        "{path, name, face_crop, group_pattern, attributes, attribute_names, attribute_bins})",
    )

    @field_validator("datasets")
    @classmethod
    def _as_sets(cls, value):
        sets = [SuiteSet(path=v) if isinstance(v, str) else v for v in value]
        names = [s.label for s in sets]
        if len(set(names)) < len(names):
            raise ValueError(f"suite set names must differ (give each a name): {names}")
        for s in sets:
            _check_name(s.label)
        return sets

    @model_validator(mode="after")
    def _threshold_range(self):
        if isinstance(self.threshold, float) and not 0.0 <= self.threshold <= 1.0:
            raise ValueError(f"threshold must be within [0, 1] or 'val', got {self.threshold}")
        return self


class SampleDataParams(Section):
    per_class: dict[str, int] = Field(
        default_factory=lambda: {"train": 300, "val": 100, "test": 100},
        description="images per class in each split",
    )
    image_size: int = Field(128, ge=32, le=512)

    @model_validator(mode="after")
    def _splits(self):
        unknown = set(self.per_class) - {"train", "val", "test"}
        if unknown or "train" not in self.per_class or "val" not in self.per_class:
            raise ValueError(f"per_class keys must be train, val and optionally test, got {sorted(self.per_class)}")
        return self


# The metrics of dfdetect.metrics, by name (tests keep the two in step; config stays free of heavy imports).
MetricName = Literal["accuracy", "precision", "recall", "f1", "roc_auc", "average_precision", "eer", "ece"]
# What a suite row (dfdetect.suite) holds. Across the groups of a file-name attribute (the worst attribute counts):
# real_fpr_ratio / fake_recall_ratio are the highest group's rate over the lowest's, worst_group_real_fpr the
# highest group's false-positive rate, worst_group_fake_recall the lowest group's recall.
SuiteMetricName = Literal[
    "roc_auc",
    "average_precision",
    "eer",
    "accuracy",
    "fake_recall",
    "real_fpr",
    "video_roc_auc",
    "video_average_precision",
    "video_fake_recall",
    "video_real_fpr",
    "real_fpr_ratio",
    "worst_group_real_fpr",
    "fake_recall_ratio",
    "worst_group_fake_recall",
]
LOWER_IS_BETTER = frozenset(
    {"eer", "ece", "real_fpr", "video_real_fpr", "real_fpr_ratio", "worst_group_real_fpr", "fake_recall_ratio"}
)


class RegistryParams(Section):
    model_name: str = Field(
        "dfdetect-detector",
        min_length=1,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="registered model name in the MLflow model registry",
    )


class PromotionParams(Section):
    metric: MetricName = Field("roc_auc", description="the metric a challenger must beat the champion on")
    min_improvement: float = Field(0.0, ge=0.0, le=1.0, description="by at least this much (absolute)")
    floors: dict[MetricName, float] = Field(
        default_factory=lambda: {"roc_auc": 0.8},
        description="every one must hold for the challenger (for eer: a ceiling); alone decide with no champion",
    )
    dataset_floors: dict[str, dict[SuiteMetricName, float]] = Field(
        default_factory=dict,
        description="floors per suite set (evaluate.datasets, by name), e.g. {lfw_faceswap: "
        "{roc_auc: 0.8}, utkface_real: {real_fpr: 0.1}}: a challenger that wins in-dataset but loses there is refused "
        "(eer, real_fpr, video_real_fpr and real_fpr_ratio are ceilings); the challenger is re-scored on those sets",
    )
    lock_timeout_s: float = Field(120.0, gt=0, description="how long to wait for another promotion to finish")
    lock_lease_s: float = Field(
        900.0,
        gt=0,
        description="a promotion lock older than this is taken over (a holder "
        "on this host whose process is gone: at once)",
    )


class ServingParams(Section):
    alias: str = Field("champion", min_length=1, description="registry alias (or version) the service answers with")
    workers: int = Field(
        1, ge=1, le=64, description="BentoML worker processes; each loads the models and runs its own batcher"
    )
    runtime: Literal["auto", "torch", "onnx", "onnx-int8"] = Field(
        "auto",
        description="auto: torch on CUDA, onnx on the CPU (measured fastest there); torch: bf16 autocast + "
        "channels_last on CPU, fp16 on CUDA; onnx: ONNX Runtime fp32 (CPU); onnx-int8: dynamically quantised",
    )
    ensemble: list[str] = Field(
        default_factory=list,
        description="serve the mean of these versions/aliases instead of `alias` (the guide's ensemble)",
    )
    # "none", not "off": YAML 1.1 (and `dvc exp run -S`, which rewrites params.yaml) reads a bare off as false.
    challenger_mode: Literal["none", "ab", "shadow"] = Field(
        "none",
        description="ab: the challenger answers challenger_fraction of requests; shadow: it scores, the champion answers",
    )
    challenger_fraction: float = Field(0.1, ge=0.0, le=1.0)
    poll_interval_s: float = Field(10.0, ge=0.5, description="how often the service checks the registry for promotions")
    max_batch_size: int = Field(32, ge=1, le=1024)
    max_latency_ms: int = Field(
        1000, ge=1, le=60_000, description="adaptive batching: longest a request may queue (503 after)"
    )
    batch_wait_ms: float = Field(
        20.0,
        ge=0,
        le=1000,
        description="adaptive batching: longest a free model holds a part-full batch for the requests the service "
        "held during the last batch (0: never; a lone request is never held)",
    )
    max_upload_mb: float = Field(10.0, gt=0, le=1024, description="largest image upload")
    max_video_mb: float = Field(200.0, gt=0, le=10_240, description="largest video upload")
    video_frames: int = Field(16, ge=1, le=1000, description="frames sampled uniformly from a video")
    max_score_mb: float = Field(16.0, gt=0, le=1024, description="largest POST /score JSON body")
    # POST /inference/analyze-frames: bounds on one batch request, so that it costs no more than its images
    # would as single requests (each image also keeps the single-image limits above and below)
    max_batch_images: int = Field(
        32, ge=1, le=1024, description="most images in one analyze-frames request (400 above)"
    )
    max_batch_mb: float = Field(
        16.0, gt=0, le=1024, description="largest analyze-frames body, all its images together (413 above)"
    )
    max_batch_megapixels: float = Field(
        100.0,
        gt=0,
        le=10_000,
        description="most pixels (width x height summed over its images) one analyze-frames "
        "request may decode; 400 above, decided from the headers before decoding",
    )
    max_image_megapixels: float = Field(40.0, gt=0, le=64, description="largest decoded image (width x height)")
    max_image_side: int = Field(8192, ge=64, le=16_384, description="longest side of an image, in pixels")
    max_aspect_ratio: float = Field(10.0, ge=1, le=20, description="longest side over shortest side of an image")
    max_video_megapixels: float = Field(8.3, gt=0, le=40, description="largest video frame (4K UHD is 8.3)")
    decode_threads: int = Field(
        2, ge=1, le=64, description="threads that decode and resize uploads, off the event loop"
    )
    header_timeout_s: float = Field(10.0, gt=0, le=300, description="time a connection has to send a request's headers")
    body_timeout_s: float = Field(
        30.0, gt=0, le=600, description="longest pause while a request body is read (408 after)"
    )
    upload_timeout_s: float = Field(
        300.0,
        gt=0,
        le=3600,
        description="longest a whole request body may take to arrive, however steadily (408 after): a client "
        "sending a byte every few seconds never pauses long, yet would hold its connection for good. With "
        "max_video_mb 200, 300 s asks a video's client for about 5.3 Mbit/s",
    )
    max_uploads_in_progress: int = Field(
        64,
        ge=1,
        le=10_000,
        description="request bodies a worker receives at once (503 with Retry-After above, after the body "
        "is read away for up to 1 s so the client reads the answer)",
    )
    video_time_limit_s: float = Field(
        120.0,
        gt=0,
        le=3600,
        description="longest reading a video's sampled frames may take (400 after): a small file can hold "
        "millions of tiny frames, all decoded on the way to the last sampled one. Frames are decoded in order: "
        "a 480p H.264 frame took 1.8 ms on one core here, so 120 s is about 60,000 such frames (a 1080p one "
        "costs about 5 times more)",
    )
    face_crop: bool = Field(
        False,
        description="score the largest face (prepare.faces: detector, margin, crop_size), "
        "as models trained on face crops expect; a frame without one is a 422",
    )
    device: str = Field("auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$")
    review_band: tuple[float, float] | None = Field(
        None,
        description="[low, high]: a P(fake) within it answers verdict 'review' (a person should look) "
        "instead of fake or real; null: every answer is fake or real",
    )
    content_credentials: bool = Field(
        True, description="check each upload for a C2PA manifest and answer what it declares (`provenance`)"
    )
    prediction_log: str | None = Field(
        None,
        description="where every verdict is logged (a folder or s3://bucket/prefix): rotated, gzip-compressed JSON "
        "Lines written off the request path; null: no log (and no /feedback)",
    )
    log_inputs: bool = Field(False, description="also keep each uploaded image in the log, under its SHA-256")
    prediction_log_queue: int = Field(
        10_000, ge=1, le=1_000_000, description="verdicts waiting to be written; beyond it they are dropped and counted"
    )
    prediction_log_flush_lines: int = Field(1000, ge=1, le=1_000_000, description="verdicts per log file at most")
    prediction_log_flush_s: float = Field(
        30.0, gt=0, le=3600, description="a log file is written at least this often while verdicts come"
    )

    @model_validator(mode="after")
    def _batch_wait_is_below_max_latency(self):
        if self.batch_wait_ms >= self.max_latency_ms:
            raise ValueError(
                f"batch_wait_ms ({self.batch_wait_ms}) must be below max_latency_ms ({self.max_latency_ms}): "
                "a held request would be refused as overloaded"
            )
        return self

    @field_validator("review_band")
    @classmethod
    def _band_is_an_interval(cls, value):
        if value is not None and not 0.0 <= value[0] < value[1] <= 1.0:
            raise ValueError(f"review_band must be [low, high] with 0 <= low < high <= 1, got {list(value)}")
        return value


class MlflowParams(Section):
    experiment: str = Field("dfdetect", min_length=1)
    tracking_uri: str | None = Field(
        None, description="used when $MLFLOW_TRACKING_URI is unset; default sqlite:///mlflow.db"
    )
    log_model: bool = True


class MonitorParams(Section):
    """The drift monitor and when the loop retrains (dfdetect.monitor)."""

    window_hours: float = Field(24.0, gt=0, le=24 * 366, description="the log window compared, ending now")
    drift_share: float = Field(
        0.5, gt=0.0, le=1.0, description="drift when at least this share of the compared columns moved (p < 0.05)"
    )
    min_items: int = Field(30, ge=1, description="fewer logged verdicts in the window: too few to judge, no drift")
    retrain_min_reviews: int = Field(
        100, ge=1, description="retrain also when at least this many reviewed verdicts came in the window"
    )


# What `dfdetect tune` may vary: keys of these sections are applied per trial on the same prepared data
# (prepare.* would need another prepare, seed would compare luck, not recipes).
TUNABLE_SECTIONS = ("model", "train")


class SearchDimension(Section):
    """One axis of the search space: a float or int range (optionally on a log scale) or a list of choices."""

    type: Literal["float", "int", "categorical"] = Field(description="float | int | categorical")
    low: float | None = Field(None, description="smallest value (float, int)")
    high: float | None = Field(None, description="largest value (float, int)")
    log: bool = Field(False, description="sample on a log scale (float, int; low > 0)")
    step: float | None = Field(None, gt=0, description="only multiples of this from low (float, int)")
    choices: list[Union[str, int, float, bool]] | None = Field(None, description="the values to choose from")

    @model_validator(mode="after")
    def _complete(self):
        if self.type == "categorical":
            if not self.choices:
                raise ValueError("a categorical dimension needs choices: [a, b, ...]")
            if self.low is not None or self.high is not None:
                raise ValueError("a categorical dimension takes choices, not low/high")
            return self
        if self.choices is not None:
            raise ValueError(f"a {self.type} dimension takes low and high, not choices")
        if self.low is None or self.high is None or not self.low < self.high:
            raise ValueError(f"a {self.type} dimension needs low < high")
        if self.log and (self.low <= 0 or self.step is not None):
            raise ValueError("log: true needs low > 0 and no step")
        if self.type == "int" and not (float(self.low).is_integer() and float(self.high).is_integer()):
            raise ValueError("an int dimension needs whole low and high")
        return self


class TuneParams(Section):
    """`dfdetect tune`: an Optuna study over `space` (dfdetect.tune)."""

    space: dict[str, SearchDimension] = Field(
        default_factory=dict,
        description="parameter (dotted, in model or train) -> its range or choices; trial 0 is params.yaml's recipe",
    )
    objective: Literal["val_auc", "suite_mean"] = Field(
        "val_auc",
        description="val_auc: the validation ROC-AUC of the model the trial ships (its best epoch, mixed with "
        "ImageNet's weights where train.wise_alpha < 1); suite_mean: its mean with the ROC-AUC on each "
        "evaluate.datasets set that has both classes",
    )
    epochs: int | None = Field(None, ge=1, le=10_000, description="epochs per trial (default: train.epochs)")
    study: str = Field("dfdetect", min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$", description="study name")
    storage: str | None = Field(
        None,
        description="Optuna storage URL (postgresql+psycopg2://..., sqlite:///...); $DFDETECT_TUNE_STORAGE wins over "
        "it; null: beside a database tracking URI (its server, database <name>_optuna), else sqlite:///optuna.db",
    )
    sampler: Literal["tpe", "random"] = Field("tpe", description="how trials are proposed")
    pruner_startup_trials: int = Field(
        2, ge=0, description="finished trials before the median pruner stops anyone (it needs a median)"
    )
    pruner_warmup_epochs: int = Field(1, ge=0, description="epochs every trial runs before it may be stopped")

    @field_validator("space")
    @classmethod
    def _tunable_keys(cls, value):
        for key in value:
            if key.split(".")[0] not in TUNABLE_SECTIONS or "." not in key:
                raise ValueError(
                    f"{key}: only keys of {', '.join(TUNABLE_SECTIONS)} can be tuned on one prepared data set "
                    "(e.g. train.lr, model.dropout)"
                )
        return value


class DistillParams(Section):
    """`dfdetect distill`: the student learns from its labels and from a teacher's soft P(fake)."""

    teachers: list[str] = Field(
        default_factory=list,
        description="registry aliases or versions, or checkpoint files; several: the mean of their P(fake)",
    )
    alpha: float = Field(0.7, ge=0.0, le=1.0, description="weight of the teacher's soft targets (1 - alpha: labels)")
    temperature: float = Field(
        2.0, gt=0.0, le=20.0, description="both logits are divided by it before the soft loss (Hinton et al.)"
    )


class Params(Section):
    seed: int = Field(42, ge=0, le=2**32 - 1)
    sample_data: SampleDataParams = SampleDataParams()
    prepare: PrepareParams = PrepareParams()
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    registry: RegistryParams = RegistryParams()
    promotion: PromotionParams = PromotionParams()
    serving: ServingParams = ServingParams()
    monitor: MonitorParams = MonitorParams()
    tune: TuneParams = TuneParams()
    distill: DistillParams = DistillParams()
    mlflow: MlflowParams = MlflowParams()


class ParamsError(ValueError):
    """params.yaml is missing, unreadable or breaks the schema."""


def _describe(error: dict, raw: dict) -> str:
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (value {error['input']!r})"
    if error["type"] == "value_error" and isinstance(error["input"], dict):  # a rule across a section's keys
        return f"{key}: {error['msg']}"
    return f"{key}: got {error['input']!r}; {error['msg']}"


def parse_params(raw: dict | None, source: str = "params") -> Params:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ParamsError(f"{source}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as exc:
        lines = [_describe(e, raw) for e in exc.errors()]
        raise ParamsError(f"{source} is invalid:\n  " + "\n  ".join(lines)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    if not path.exists():
        raise ParamsError(f"{path}: params file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ParamsError(f"{path}: not valid YAML: {exc}") from None
    return parse_params(raw, str(path))
