"""Config blocks of the classification task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from visionpipe.augment import AugmentConfig
from visionpipe.config import Block, PipelineConfig, TrainConfig
from visionpipe.errors import did_you_mean


class GenerateConfig(Block):
    """Built-in synthetic dataset written to ``load.root`` when it does not exist yet."""

    kind: Literal["shapes"] = "shapes"
    per_class: int = Field(150, gt=0, description="images per class (split into train/val/test)")
    image_size: int = Field(64, ge=16, description="side of the generated images")
    seed: int = 0


class LoadConfig(Block):
    """Where the images are: an ImageFolder tree or CSV lists (``path,label``)."""

    format: Literal["imagefolder", "csv"] = Field("imagefolder", description="data layout")
    root: str = Field(description="dataset root; CSV paths and split folders are relative to it")
    train: str | None = Field("train", description="train split: a sub-folder (imagefolder) or a CSV file")
    val: str | None = Field("val", description="validation split (folder or CSV); null (implied by val_split) to "
                                                "split from train")
    test: str | None = Field(None, description="optional test split")
    val_split: float = Field(0.0, ge=0, lt=1, description="fraction of train held out as val when val is null")
    classes: list[str] | None = Field(None, description="class names in label order; default: sorted names found")
    check_images: bool = Field(True, description="decode every image before training; skip unreadable ones")
    generate: GenerateConfig | None = Field(None, description="create the built-in dataset at root if missing")

    @model_validator(mode="after")
    def _val_source(self) -> LoadConfig:
        if self.val_split > 0 and "val" not in self.model_fields_set:  # the default split folder gives way
            self.val = None
        if self.val is not None and self.val_split > 0:
            raise ValueError("set either val (a split) or val_split (a fraction of train), not both")
        return self


class ModelConfig(Block):
    """A torchvision classification model by name."""

    name: str = Field("resnet18", description="torchvision model name, e.g. resnet18, resnet50, mobilenet_v3_small")
    weights: str | None = Field(
        None, description="local weights file (.pth/.pt state dict or visionpipe checkpoint), or a torchvision "
                          "weights name (e.g. IMAGENET1K_V1) found in torchvision's cache; the head is replaced")
    freeze_backbone: bool = Field(False, description="train only the new head")
    dropout: float | None = Field(None, ge=0, lt=1, description="dropout before the head (replaces the head)")

    @field_validator("name")
    @classmethod
    def _known_model(cls, name: str) -> str:
        from visionpipe_plugins.classification.models import model_names

        names = model_names()
        if name not in names:
            raise ValueError(f"unknown torchvision classification model '{name}'"
                             f"{did_you_mean(name, [n for n in names if not n.startswith('quantized')])} "
                             "(see: visionpipe plugins --json)")
        return name


class ClassificationTrainConfig(TrainConfig):
    """Train block plus classification's loss settings."""

    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class ClassificationConfig(PipelineConfig):
    """A classification pipeline file."""

    task: Literal["classification"] = "classification"
    load: LoadConfig | None = None
    augment: AugmentConfig | None = None
    model: ModelConfig | None = None
    train: ClassificationTrainConfig | None = None
