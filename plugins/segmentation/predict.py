"""Export wrapper and predictor: logits + mask out, index-mask and overlay PNGs per image."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from torch.nn import functional as F

from visionpipe.augment import EvalTransform, deserialize
from visionpipe.io import atomic_path
from visionpipe.task import Predictor
from visionpipe_plugins.segmentation.masks import overlay, voc_palette, write_mask

MASK_KEY = "_mask"
"""Record key that carries the predicted mask from ``postprocess`` to ``draw`` (never written to JSON)."""
MAX_UPSAMPLE_ELEMENTS = 1 << 26
"""Above this many logits (C*H*W) at full size, the argmax mask is resized instead of the logits."""


class SegmentationExport(nn.Module):
    """A torchvision segmentation model → (logits N×C×H×W, mask N×H×W class indices)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(images)["out"]
        return logits, logits.argmax(1)


def compare_outputs(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
    """Max abs logit difference; inf when a mask pixel differs where the logits are not a near tie."""
    if len(ref) != 2 or len(got) != 2 or ref[0].shape != got[0].shape or ref[1].shape != got[1].shape:
        return float("inf")
    diff = float(np.max(np.abs(ref[0].astype(np.float64) - got[0].astype(np.float64)))) if ref[0].size else 0.0
    differ = ref[1] != got[1]
    if differ.any():
        logits = np.moveaxis(ref[0], 1, -1)[differ]  # (pixels, C)
        rows = np.arange(len(logits))
        gap = logits[rows, ref[1][differ]] - logits[rows, got[1][differ].astype(np.int64)]
        if float(gap.max()) > 2 * diff + 1e-6:
            return float("inf")
    return diff


def upsample_argmax(logits: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Class indices at ``size`` (H, W) from C×h×w logits (bilinear on the logits, like torchvision)."""
    c, h, w = logits.shape
    if (h, w) == tuple(size):
        return logits.argmax(0).astype(np.uint8)
    t = torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32))[None]
    if c * size[0] * size[1] <= MAX_UPSAMPLE_ELEMENTS:
        up = F.interpolate(t, size=tuple(size), mode="bilinear", align_corners=False)
        return up[0].argmax(0).numpy().astype(np.uint8)
    small = t[0].argmax(0)[None, None].float()
    return F.interpolate(small, size=tuple(size), mode="nearest")[0, 0].numpy().astype(np.uint8)


class SegmentationPredictor(Predictor):
    """Eval preprocessing from the model's metadata; per image: class shares, a mask PNG and an overlay PNG.

    Options: ``out_dir`` and ``source_root`` (set by the task's ``predict``), ``alpha`` (overlay opacity).
    """

    def __init__(self, metadata: dict[str, Any], options: dict[str, Any]) -> None:
        super().__init__(metadata, options)
        self.transform = EvalTransform(deserialize(metadata["preprocess"]))
        self.names: list[str] = metadata["class_names"]
        self.palette = metadata.get("palette") or voc_palette(len(self.names))
        self.alpha = float(options.get("alpha", 0.5))
        self.out_dir = Path(options["out_dir"]) if options.get("out_dir") else None
        root = options.get("source_root")
        self.source_root = Path(root) if root else None

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        x = self.transform(image)
        return {"images": x}, image.shape[:2]

    def postprocess(self, outputs: list[np.ndarray], state: Any) -> dict[str, Any]:
        mask = upsample_argmax(outputs[0], state)
        counts = np.bincount(mask.ravel(), minlength=len(self.names))[: len(self.names)]
        total = max(int(counts.sum()), 1)
        return {"size": [int(state[0]), int(state[1])],
                "class_share": {n: round(float(c) / total, 6) for n, c in zip(self.names, counts, strict=True)},
                "classes": [n for n, c in zip(self.names, counts, strict=True) if c > 0],
                MASK_KEY: mask}

    def _relative(self, src: Path) -> Path:
        root = self.source_root
        rel = src.relative_to(root) if root and root in src.parents else Path(src.name)
        return rel.with_suffix(".png")

    def draw(self, image: np.ndarray, record: dict[str, Any]) -> np.ndarray | None:
        """Write the index-mask PNG and the overlay PNG; record their paths (relative to the output folder)."""
        mask = record.pop(MASK_KEY)
        if self.out_dir is None:
            return overlay(image, mask, self.palette, self.alpha)
        rel = self._relative(Path(record["path"]))
        mask_file, overlay_file = self.out_dir / "masks" / rel, self.out_dir / "overlays" / rel
        write_mask(mask_file, mask)
        overlay_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(overlay_file) as tmp:
            Image.fromarray(overlay(image, mask, self.palette, self.alpha)).save(tmp, format="PNG")
        record["mask"] = str(mask_file.relative_to(self.out_dir))
        record["overlay"] = str(overlay_file.relative_to(self.out_dir))
        return None
