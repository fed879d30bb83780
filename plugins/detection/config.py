"""Config blocks of the detection task (load, augment, model, train)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from visionpipe.augment import TransformList
from visionpipe.config import Block, ExportConfig, PipelineConfig, TrainConfig
from visionpipe.synthetic import SHAPES

DETECTION_MODELS = (
    "fasterrcnn_resnet50_fpn", "fasterrcnn_resnet50_fpn_v2", "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn", "resnet_fpn",
)


class GenerateConfig(Block):
    """Built-in shapes dataset (COCO format) written to ``load.root`` when it does not exist yet."""

    kind: Literal["shapes"] = "shapes"
    train: int = Field(600, gt=0, description="train images")
    val: int = Field(100, gt=0, description="validation images")
    test: int = Field(100, gt=0, description="test (held-out) images")
    image_size: int = Field(128, ge=32, description="side of the generated images")
    classes: list[str] = Field(default_factory=lambda: list(SHAPES), description=f"shape classes, from {SHAPES}")
    objects: tuple[int, int] = Field((1, 3), description="min/max objects per non-empty image")
    empty_fraction: float = Field(0.05, ge=0, lt=1, description="fraction of images with no object (negatives)")
    object_size: tuple[float, float] = Field((0.15, 0.45), description="object size range, fraction of the side")
    clutter: float = Field(0.5, ge=0, description="background texture strength")
    seed: int = 0

    @field_validator("classes")
    @classmethod
    def _known(cls, v: list[str]) -> list[str]:
        bad = [c for c in v if c not in SHAPES]
        if bad or not v:
            raise ValueError(f"shape classes must be a non-empty subset of {list(SHAPES)} (got {v})")
        return v

    @model_validator(mode="after")
    def _ranges(self) -> GenerateConfig:
        if not 0 < self.objects[0] <= self.objects[1]:
            raise ValueError(f"objects: need 0 < min <= max (got {self.objects})")
        if not 0 < self.object_size[0] <= self.object_size[1] < 1:
            raise ValueError(f"object_size: need 0 < min <= max < 1 (got {self.object_size})")
        return self


class SplitConfig(Block):
    """Where one split's annotations and images are (paths relative to ``load.root``)."""

    annotations: str | None = Field(
        None, description="coco: the JSON file; voc: a folder of XML files or an ImageSets .txt list of ids; "
                          "yolo: the labels folder (default: the images folder with 'images' replaced by 'labels')")
    images: str | None = Field(
        None, description="folder that image file names are relative to (coco: default root; voc: default "
                          "JPEGImages; yolo: required)")


class LoadConfig(Block):
    """Detection data: COCO JSON, Pascal VOC XML or YOLO txt layouts."""

    format: Literal["coco", "voc", "yolo"] = Field("coco", description="annotation layout")
    root: str = Field(description="dataset root; every split path is relative to it and must stay inside it")
    train: SplitConfig | None = Field(None, description="train split")
    val: SplitConfig | None = Field(None, description="validation split (drives best.pt and early stopping)")
    test: SplitConfig | None = Field(None, description="optional held-out test split")
    classes: list[str] | None = Field(
        None, description="class names: required for yolo (line index = class id) unless root has classes.txt; "
                          "voc: default sorted names found; coco: a subset of category names to keep")
    min_box_size: float = Field(1.0, ge=0, description="boxes narrower or lower than this (pixels, after "
                                                        "clipping to the image) are dropped and counted")
    check_images: bool = Field(True, description="decode every image before training; skip unreadable ones")
    generate: GenerateConfig | None = Field(None, description="create the built-in dataset at root if missing")

    @field_validator("classes")
    @classmethod
    def _unique(cls, v: list[str] | None) -> list[str] | None:
        dup = next((n for i, n in enumerate(v or []) if n in v[:i]), None)
        if dup is not None:
            raise ValueError(f"class name '{dup}' appears twice in {v}")
        return v

    @field_validator("train", "val", "test", mode="before")
    @classmethod
    def _shorthand(cls, v: Any) -> Any:
        return {"annotations": v} if isinstance(v, str) else v

    @model_validator(mode="after")
    def _some_split(self) -> LoadConfig:
        if self.train is None and self.val is None and self.test is None:
            raise ValueError("give at least one of train, val, test")
        return self


class DetectionAugmentConfig(Block):
    """Train-time albumentations transforms; boxes follow them (the model resizes and normalizes itself)."""

    train: TransformList = Field(default_factory=list, description="train-time transforms, in order")
    min_visibility: float = Field(0.3, ge=0, le=1, description="drop a box when less than this fraction of it "
                                                               "stays in the image after a transform")
    min_area: float = Field(4.0, ge=0, description="drop a box smaller than this many pixels after transforms")


class DetectionModelConfig(Block):
    """A torchvision Faster R-CNN by name, or ``resnet_fpn`` with any torchvision ResNet backbone."""

    name: str = Field("fasterrcnn_mobilenet_v3_large_320_fpn", description=f"one of {', '.join(DETECTION_MODELS)}")
    backbone: str = Field("resnet50", description="resnet_fpn only: torchvision ResNet name (resnet18 ... "
                                                  "wide_resnet101_2, resnext*)")
    returned_layers: list[int] = Field([1, 2, 3, 4], description="resnet_fpn only: ResNet stages fed to the FPN")
    fpn_channels: int = Field(256, gt=0, description="resnet_fpn only: FPN width")
    representation_size: int | None = Field(None, gt=0, description="box head MLP width; default torchvision's 1024")
    weights: str | None = Field(None, description="local full-model weights (.pth state dict or visionpipe "
                                                  "checkpoint); the class head is re-initialised when it differs")
    backbone_weights: str | None = Field(None, description="local backbone weights, e.g. a torchvision "
                                                           "classification state dict of the same architecture")
    norm: Literal["auto", "batchnorm", "frozen"] = Field(
        "auto", description="backbone normalization: frozen BN when weights are given (auto), else trained BN")
    trainable_backbone_layers: int | None = Field(
        None, ge=0, le=6, description="backbone stages trained when weights are given (default 3); all from scratch")
    min_size: int = Field(800, ge=16, description="images are resized so the short side is this")
    max_size: int = Field(1333, ge=16, description="... and the long side at most this")
    image_mean: tuple[float, float, float] = Field((0.485, 0.456, 0.406), description="normalization mean (0..1)")
    image_std: tuple[float, float, float] = Field((0.229, 0.224, 0.225), description="normalization std (0..1)")
    anchor_sizes: list[list[int]] | None = Field(
        None, description="anchor sizes (pixels of the resized image), one list per feature map; default: the model's")
    aspect_ratios: list[float] | None = Field(None, description="anchor aspect ratios (h/w) on every feature map")
    rpn_pre_nms_top_n_train: int = Field(2000, gt=0)
    rpn_pre_nms_top_n_test: int = Field(1000, gt=0)
    rpn_post_nms_top_n_train: int = Field(2000, gt=0)
    rpn_post_nms_top_n_test: int = Field(1000, gt=0)
    rpn_nms_thresh: float = Field(0.7, gt=0, le=1)
    rpn_batch_size_per_image: int = Field(256, gt=0, description="anchors sampled per image for the RPN loss")
    box_batch_size_per_image: int = Field(512, gt=0, description="proposals sampled per image for the box loss")
    box_score_thresh: float = Field(0.05, ge=0, lt=1, description="detections below this score are dropped")
    box_nms_thresh: float = Field(0.5, gt=0, le=1, description="per-class NMS IoU threshold")
    box_detections_per_img: int = Field(100, gt=0, description="at most this many detections per image")
    draw_score_thresh: float = Field(0.5, ge=0, le=1, description="predict --save-images draws boxes above this "
                                                                  "score (stored in the exported model)")

    @field_validator("name")
    @classmethod
    def _known(cls, v: str) -> str:
        if v not in DETECTION_MODELS:
            from visionpipe.errors import did_you_mean
            raise ValueError(f"unknown detection model '{v}'{did_you_mean(v, DETECTION_MODELS)} "
                             f"(valid: {', '.join(DETECTION_MODELS)})")
        return v

    @field_validator("returned_layers")
    @classmethod
    def _layers(cls, v: list[int]) -> list[int]:
        if not v or any(i not in (1, 2, 3, 4) for i in v) or sorted(set(v)) != v:
            raise ValueError(f"need increasing ResNet stages from 1..4 (got {v})")
        return v

    @model_validator(mode="after")
    def _sizes(self) -> DetectionModelConfig:
        if self.max_size < self.min_size:
            raise ValueError(f"max_size ({self.max_size}) must be >= min_size ({self.min_size})")
        if self.anchor_sizes is not None and (not self.anchor_sizes or any(not s for s in self.anchor_sizes)):
            raise ValueError("anchor_sizes: one non-empty list of sizes per feature map")
        return self


class DetectionExportConfig(ExportConfig):
    """ONNX export of a detector: opsets up to 21 (onnxruntime has no RoiAlign of opset 22)."""

    opset: int = Field(17, ge=11, le=21, description="ONNX opset (11-21: onnxruntime has no RoiAlign of opset 22)")


class DetectionConfig(PipelineConfig):
    """A detection pipeline file."""

    task: Literal["detection"] = "detection"
    load: LoadConfig | None = None
    augment: DetectionAugmentConfig | None = None
    model: DetectionModelConfig | None = None
    train: TrainConfig | None = None
    export: DetectionExportConfig | None = None
