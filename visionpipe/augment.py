"""Albumentations pipelines from config: any transform by name, validated at load time."""

from __future__ import annotations

from typing import Annotated, Any

import albumentations as A
import cv2
import numpy as np
from pydantic import AfterValidator, Field, field_validator

from visionpipe.config import Block
from visionpipe.errors import did_you_mean

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _transform_names() -> list[str]:
    return sorted(n for n in dir(A) if isinstance(getattr(A, n), type)
                  and issubclass(getattr(A, n), A.BasicTransform | A.BaseCompose))


def build_transform(spec: dict[str, Any]) -> Any:
    """``{name: HorizontalFlip, p: 0.5}`` → the albumentations transform; ValueError names the problem."""
    if not isinstance(spec, dict) or "name" not in spec:
        raise ValueError(f"each transform is a mapping with 'name' and its arguments (got {spec!r})")
    args = {k: v for k, v in spec.items() if k != "name"}
    name = spec["name"]
    cls = getattr(A, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, A.BasicTransform | A.BaseCompose)):
        raise ValueError(f"unknown albumentations transform '{name}'{did_you_mean(name, _transform_names())}")
    if issubclass(cls, A.BaseCompose):  # OneOf, SomeOf, Sequential: nested lists
        args["transforms"] = [build_transform(t) for t in args.get("transforms", [])]
    try:
        return cls(**args)
    except Exception as e:  # albumentations validates arguments itself (pydantic)
        msg = str(e).strip().splitlines()
        raise ValueError(f"{name}: invalid arguments {args}: {' '.join(msg[:3])}") from None


def validate_transforms(specs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Check that every spec builds; the error names the item's index."""
    for i, t in enumerate(specs):
        try:
            build_transform(t)
        except ValueError as e:
            raise ValueError(f"[{i}] {e}") from None
    return specs


TransformList = Annotated[list[dict[str, Any]], AfterValidator(validate_transforms)]
"""A config field holding albumentations transforms by name, checked when the config loads."""


class AugmentConfig(Block):
    """Augmentation: albumentations transforms by name for train and eval, then resize + normalize."""

    image_size: tuple[int, int] = Field((224, 224), description="(height, width) fed to the model")
    mean: tuple[float, float, float] = Field(IMAGENET_MEAN, description="normalization mean (RGB, 0..1)")
    std: tuple[float, float, float] = Field(IMAGENET_STD, description="normalization std (RGB, 0..1)")
    train: TransformList = Field(default_factory=list, description="train-time transforms, in order")
    eval: TransformList = Field(default_factory=list, description="eval/predict-time transforms before resize")

    @field_validator("image_size")
    @classmethod
    def _positive(cls, v: tuple[int, int]) -> tuple[int, int]:
        if min(v) < 8:
            raise ValueError(f"must be at least 8 pixels a side (got {v})")
        return v


def compose(specs: list[dict[str, Any]], tail: list[Any], **kw: Any) -> A.Compose:
    """A Compose of the user's transforms followed by ``tail`` (resize/normalize)."""
    return A.Compose([build_transform(s) for s in specs] + tail, **kw)


def apply_transforms(data: Any, cfg: AugmentConfig, train: A.Compose, eval: A.Compose) -> dict[str, list[str]]:
    """Give the train split ``train`` and val/test ``eval``; return the transform names applied."""
    for split in ("train", "val", "test"):
        ds = getattr(data, split)
        if ds is not None:
            ds.transform = train if split == "train" else eval
    return {"train": [t.get("name") for t in cfg.train], "eval": [t.get("name") for t in cfg.eval]}


def resize_normalize(cfg: AugmentConfig) -> list[Any]:
    """The resize + normalize steps that eval, export and predict share."""
    h, w = cfg.image_size
    return [A.Resize(h, w), A.Normalize(mean=cfg.mean, std=cfg.std, max_pixel_value=255.0)]


def serialize(t: A.Compose) -> dict[str, Any]:
    """A JSON-able description of a pipeline, rebuilt with :func:`deserialize` at predict time."""
    return A.to_dict(t)


def deserialize(d: dict[str, Any]) -> A.Compose:
    """Inverse of :func:`serialize`."""
    return A.from_dict(d)


class EvalTransform:
    """A stored eval transform as ``image (HWC uint8) -> CHW float32`` for the model, the same values faster.

    albumentations' Normalize rebuilds its 256-entry lookup tables on every call; a trailing
    standard Normalize (always applied) gets its tables built once here, from the same float32
    formula, so the values are identical. Other pipelines run exactly as stored.
    """

    def __init__(self, transform: A.Compose) -> None:
        self.transform = transform
        steps = list(transform.transforms)
        last = steps[-1] if steps else None
        self.lut: np.ndarray | None = None
        self.size: tuple[int, int] | None = None  # a lone Resize to this size: nothing to do for such images
        self.head: A.Compose | None = None  # the steps before Normalize
        if isinstance(last, A.Normalize) and last.normalization == "standard" and last.p >= 1.0:
            mean = np.asarray(last.mean_np, np.float32).reshape(-1, 1)
            den = np.asarray(last.denominator, np.float32).reshape(-1, 1)
            tables = (np.arange(256, dtype=np.float32) - mean) * den  # (channels or 1, 256), as albucore
            self.lut = np.ascontiguousarray(tables.T[:, None, :])  # (256, 1, channels) for cv2.LUT
            self.head = A.Compose(steps[:-1]) if len(steps) > 1 else None
            only = steps[0] if len(steps) == 2 else None
            if isinstance(only, A.Resize) and only.p >= 1.0:  # albumentations returns a same-size image as is
                self.size = (only.height, only.width)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        """The model input for one image (CHW float32; on the fast path a view, not C-contiguous)."""
        lut = self.lut
        if lut is not None and image.dtype == np.uint8 and image.ndim == 3 and lut.shape[2] in (1, image.shape[2]):
            x = image if self.head is None or image.shape[:2] == self.size else self.head(image=image)["image"]
            if x.dtype == np.uint8 and x.shape[2:] == image.shape[2:]:  # the steps before Normalize kept the layout
                # a CHW view of the HWC lookup: the batch's stack does the one transposing copy
                return cv2.LUT(x, lut).transpose(2, 0, 1)
        x = self.transform(image=image)["image"]
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


class SeededAugmentation:
    """Dataset mixin: augmentation randomness depends only on (run seed, epoch, sample index).

    The engine calls ``set_epoch(epoch, seed)`` before each training epoch, so a run is
    reproducible with any number of DataLoader workers and a resumed run draws exactly the
    augmentations the uninterrupted run would have drawn.
    """

    aug_seed: int = 0
    aug_epoch: int = 0

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Select the augmentation stream of ``epoch``."""
        self.aug_epoch, self.aug_seed = epoch, seed

    def augment_sample(self, transform: A.Compose, index: int, **targets: Any) -> dict[str, Any]:
        """Apply ``transform`` to one sample with its own deterministic seed."""
        ss = np.random.SeedSequence([self.aug_seed, self.aug_epoch, index])
        transform.set_random_seed(int(ss.generate_state(1)[0]))
        return transform(**targets)
