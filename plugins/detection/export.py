"""The exported detector (one image in, boxes/labels/scores out) and its parity comparison."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn


class ExportedDetector(nn.Module):
    """(1, 3, H, W) float 0..1 RGB → boxes (1, N, 4) xyxy input pixels, labels (1, N) int64, scores (1, N).

    Resize and normalization happen inside (torchvision's transform), so any H, W works. The
    batch axis is fixed to 1: torchvision detectors take a list of images, which tracing unrolls.
    One tiny extra proposal is appended before the box head: with zero RPN proposals the traced
    graph would reshape an empty tensor with -1, which onnxruntime refuses; the extra one decodes to
    a box smaller than the head's minimum size and is always dropped, so detections are unchanged.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        m = self.model
        original = [(images.shape[-2], images.shape[-1])]
        batch, _ = m.transform([images[0]])
        features = m.backbone(batch.tensors)
        if isinstance(features, torch.Tensor):
            features = OrderedDict([("0", features)])
        proposals, _ = m.rpn(batch, features)
        guard = torch.tensor([[0.0, 0.0, 1e-4, 1e-4]], dtype=proposals[0].dtype, device=proposals[0].device)
        proposals = [torch.cat([proposals[0], guard])]
        detections, _ = m.roi_heads(features, proposals, batch.image_sizes)
        out = m.transform.postprocess(detections, batch.image_sizes, original)[0]
        return out["boxes"][None], out["labels"][None], out["scores"][None]


def _iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Pairwise IoU of xyxy boxes a (N, 4) and b (M, 4)."""
    tl = np.maximum(a[:, None, :2], b[None, :, :2])
    br = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(br - tl, 0, None).prod(-1)
    area_a = (a[:, 2:] - a[:, :2]).clip(0).prod(-1)
    area_b = (b[:, 2:] - b[:, :2]).clip(0).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-9)


def make_compare(score_floor: float, margin: float = 0.02):
    """A parity measure: every detection scoring above ``score_floor + margin`` in either output must have a
    same-label partner in the other; the result is the worst of (1 - IoU) and |score difference| over pairs.

    Detections near the score threshold may appear on one side only (float noise), so they are not required.
    """

    def compare(ref: list[np.ndarray], got: list[np.ndarray]) -> float:
        if len(ref) != 3 or len(got) != 3:
            return float("inf")
        rb, rl, rs = (np.asarray(x).reshape(-1, *x.shape[2:]) for x in ref)
        gb, gl, gs = (np.asarray(x).reshape(-1, *x.shape[2:]) for x in got)
        worst = 0.0
        for (ab, al, as_), (bb, bl, bs) in (((rb, rl, rs), (gb, gl, gs)), ((gb, gl, gs), (rb, rl, rs))):
            strong = as_ > score_floor + margin
            if not strong.any():
                continue
            if len(bb) == 0:
                return float("inf")
            iou = _iou(ab[strong].astype(np.float64), bb.astype(np.float64))
            iou[al[strong][:, None] != bl[None, :]] = -1.0
            j = iou.argmax(1)
            best = iou[np.arange(len(j)), j]
            if (best < 0).any():
                return float("inf")
            worst = max(worst, float((1 - best).max()), float(np.abs(as_[strong] - bs[j]).max()))
        return worst

    return compare
