"""Config blocks of the segmentation task."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator, model_validator

from visionpipe.augment import AugmentConfig
from visionpipe.config import Block, PipelineConfig, TrainConfig

MODEL_NAMES = ("fcn_resnet50", "fcn_resnet101", "deeplabv3_resnet50", "deeplabv3_resnet101",
               "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "lraspp_mobilenet_v3_small")


class GenerateConfig(Block):
    """Built-in synthetic dataset (shapes and their masks) written to ``load.root`` when it is missing."""

    kind: Literal["shapes"] = "shapes"
    train: int = Field(800, gt=0, description="training images")
    val: int = Field(100, gt=0, description="validation images")
    test: int = Field(100, gt=0, description="held-out test images")
    image_size: int = Field(96, ge=32, description="side of the generated images")
    max_shapes: int = Field(3, ge=1, description="shapes per image: 1..max_shapes")
    overlap: bool = Field(False, description="let shapes overlap (harder: occluded shapes); else they keep apart")
    seed: int = 0


class LoadConfig(Block):
    """Where images and masks are: PNG mask pairs (index or palette PNGs) or COCO annotations."""

    format: Literal["masks", "coco"] = Field("masks", description="masks: image + mask PNG pairs; coco: a COCO JSON")
    root: str = Field(description="dataset root; everything else is relative to it")
    train: str | None = Field("train", description="masks: a folder (holding image_dir and mask_dir) or a .txt "
                                                   "list of file stems; coco: an annotation JSON file")
    val: str | None = Field("val", description="validation split, same forms as train")
    test: str | None = Field(None, description="optional test split")
    image_dir: str = Field("images", description="images folder: inside the split folder, or under root for a .txt "
                                                 "list or COCO ('{split}' is replaced by the split name)")
    mask_dir: str = Field("masks", description="masks folder, like image_dir (format masks; '{split}' is replaced "
                                                "too)")
    mask_suffix: str = Field(".png", description="mask file = <image stem><mask_suffix>")
    ignore_index: int = Field(255, ge=0, le=255, description="mask value left out of loss and metrics")
    classes: list[str] | None = Field(None, description="class names in index order (0 = first)")
    classes_file: str | None = Field(None, description="text file under root with one class name per line")
    coco_background: str = Field("background", description="coco: name of class 0 (pixels of no annotation)")
    check_images: bool = Field(True, description="decode every image and check its mask size before training; "
                                                 "unreadable images are skipped, bad masks are errors")
    generate: GenerateConfig | None = Field(None, description="create the built-in dataset at root if missing")

    @field_validator("image_dir", "mask_dir")
    @classmethod
    def _only_split_placeholder(cls, v: str) -> str:
        rest = v.replace("{split}", "")
        if "{" in rest or "}" in rest:
            raise ValueError("only {split} may appear in braces")
        return v

    def split_dirs(self, split: str) -> tuple[str, str]:
        """(image_dir, mask_dir) of ``split``: ``{split}`` replaced by its name."""
        return self.image_dir.replace("{split}", split), self.mask_dir.replace("{split}", split)

    @model_validator(mode="after")
    def _one_class_source(self) -> LoadConfig:
        if self.classes is not None and self.classes_file is not None:
            raise ValueError("set either classes or classes_file, not both")
        if self.classes is not None and len(self.classes) < 2:
            raise ValueError("segmentation needs at least 2 classes (e.g. background and one object)")
        return self


class ModelConfig(Block):
    """A torchvision segmentation model by name."""

    name: Literal[MODEL_NAMES] = Field("lraspp_mobilenet_v3_large", description="torchvision segmentation model")
    aux_loss: bool = Field(False, description="add the auxiliary head and its loss (fcn/deeplabv3 only)")
    weights: str | None = Field(None, description="local weights of the whole model (.pth/.pt state dict or "
                                                  "visionpipe checkpoint); a head of another class count is skipped")
    weights_backbone: str | None = Field(None, description="local classification weights for the backbone only "
                                                           "(e.g. resnet50-*.pth, mobilenet_v3_large-*.pth)")
    bn_momentum: float | None = Field(
        None, gt=0, le=1, description="BatchNorm momentum for every BN layer; default: the model's own "
                                      "(0.01 in MobileNets, slow to settle in a short run from scratch)")

    @model_validator(mode="after")
    def _aux_supported(self) -> ModelConfig:
        if self.aux_loss and self.name.startswith("lraspp"):
            raise ValueError(f"aux_loss: {self.name} has no auxiliary head (use an fcn_* or deeplabv3_* model)")
        if self.weights and self.weights_backbone:
            raise ValueError("set either weights (whole model) or weights_backbone, not both")
        return self


class SegmentationTrainConfig(TrainConfig):
    """Train block plus segmentation's loss settings."""

    aux_weight: float = Field(0.5, ge=0, description="weight of the auxiliary loss (with model.aux_loss)")
    dice_weight: float = Field(0.0, ge=0, description="add this × soft Dice loss to the cross-entropy")


class SegmentationConfig(PipelineConfig):
    """A segmentation pipeline file."""

    task: Literal["segmentation"] = "segmentation"
    load: LoadConfig | None = None
    augment: AugmentConfig | None = None
    model: ModelConfig | None = None
    train: SegmentationTrainConfig | None = None
