"""Config blocks of the DCGAN task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from visionpipe.augment import TransformList
from visionpipe.config import (
    Block,
    EvaluateConfig,
    OptimizerConfig,
    PipelineConfig,
    PredictConfig,
    TrainConfig,
)


class GenerateConfig(Block):
    """Built-in unlabeled image set written to ``load.root`` when it does not exist yet."""

    kind: Literal["shapes"] = Field("shapes", description="one coloured shape on a dark graded background")
    count: int = Field(2000, gt=0, description="number of images")
    image_size: int = Field(64, ge=16, description="side of the generated images")
    seed: int = 0


class LoadConfig(Block):
    """A folder of images without labels (searched recursively)."""

    root: str = Field(description="folder of training images (any size; the augment stage resizes/crops)")
    val: str | None = Field(
        None, description="folder of real reference images for the Fréchet distance; default: the training images")
    reference_images: int = Field(
        1000, gt=1, description="at most this many real images (evenly spaced) are the Fréchet distance reference")
    check_images: bool = Field(True, description="decode every image before training; skip unreadable ones")
    generate: GenerateConfig | None = Field(None, description="create the built-in image set at root if missing")


class DcganAugmentConfig(Block):
    """Train-time transforms, then resize/crop to a square and scale to [-1, 1] (the generator's tanh range)."""

    image_size: int = Field(64, description="side of the square images (a power of two >= 16)")
    resize: Literal["center_crop", "stretch"] = Field(
        "center_crop", description="center_crop: shorter side to image_size then a centre crop; stretch: resize")
    train: TransformList = Field(default_factory=list, description="albumentations transforms, in order")

    @field_validator("image_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 16 or v & (v - 1):
            raise ValueError("must be a power of two >= 16: the DCGAN doubles a 4x4 map up to it")
        return v


class DcganModelConfig(Block):
    """Generator and discriminator sizes (Radford et al. 2016)."""

    name: Literal["dcgan"] = "dcgan"
    nz: int = Field(100, gt=0, description="size of the noise vector z")
    ngf: int = Field(64, gt=0, description="generator width: channels of its last hidden layer")
    ndf: int = Field(64, gt=0, description="discriminator width: channels of its first layer")
    channels: Literal[1, 3] = Field(3, description="image channels: 3 (RGB) or 1 (grayscale)")
    leaky_slope: float = Field(0.2, ge=0, lt=1, description="LeakyReLU slope in the discriminator")
    weights: str | None = Field(None, description="local checkpoint/state dict to start from (e.g. a previous run)")


class DcganOptimizerConfig(OptimizerConfig):
    """One optimizer setting used for both networks; the DCGAN paper's Adam by default."""

    name: Literal["sgd", "adamw", "adam"] = Field("adam", description="optimizer")
    lr: float = Field(2e-4, gt=0, description="learning rate")
    betas: tuple[float, float] = Field((0.5, 0.999), description="Adam betas (beta1 0.5 as in the paper)")


class DcganTrainConfig(TrainConfig):
    """Train block plus the GAN's options."""

    optimizer: DcganOptimizerConfig = Field(default_factory=DcganOptimizerConfig)
    lr_d: float | None = Field(None, gt=0, description="discriminator learning rate; default: optimizer.lr")
    label_smoothing: float = Field(
        0.0, ge=0, lt=0.5, description="one-sided label smoothing: the discriminator's target for real images is "
                                       "1 - label_smoothing (Salimans et al. 2016 recommend 0.1)")


class DcganEvaluateConfig(EvaluateConfig):
    """Fréchet distance between real and generated images, and sample grids."""

    split: Literal["val"] = "val"
    fid_samples: int = Field(1000, gt=1, description="generated images per Fréchet distance (fixed noise)")
    feature_extractor: str = Field(
        "random", description="'random': a fixed, seeded, randomly initialised conv net (no download); or a path to "
                              "a visionpipe classification checkpoint, or a torchvision state dict (with feature_arch)")
    feature_arch: str | None = Field(
        None, description="torchvision model name for a plain state dict in feature_extractor, e.g. resnet18")
    feature_image_size: int | None = Field(
        None, ge=16, description="resize images to this before a checkpoint extractor; default: its training size "
                                 "(224 for a plain state dict)")
    grid: int = Field(64, gt=0, le=256, description="samples in the per-epoch grid PNG")


NO_SOURCE = "dcgan generates images from noise and reads no source: remove it (predict.options num and seed pick the samples)"


class DcganPredictConfig(PredictConfig):
    """The predict block: samples from noise, so no ``source``."""

    @field_validator("source")
    @classmethod
    def _no_source(cls, v: str | None) -> str | None:
        if v is not None:
            raise ValueError(NO_SOURCE)
        return v


class DcganConfig(PipelineConfig):
    """A DCGAN pipeline file."""

    task: Literal["dcgan"] = "dcgan"
    load: LoadConfig | None = None
    augment: DcganAugmentConfig | None = None
    model: DcganModelConfig | None = None
    train: DcganTrainConfig | None = None
    evaluate: DcganEvaluateConfig | None = None
    predict: DcganPredictConfig | None = None
