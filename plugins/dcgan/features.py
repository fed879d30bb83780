"""Feature extractors for the Fréchet distance that work offline (no downloaded Inception weights).

``random``: a small conv net with fixed, seeded random weights. It is not trained: its
features are multi-scale statistics of colours, edges and textures, which is enough to tell
blobs from shapes on one data set, but its values are not comparable to Inception FIDs.
A checkpoint: a classifier trained with visionpipe (or a torchvision state dict); the
features are the input of its last linear layer, as FID does with Inception's pool layer.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.engine.checkpoint import load_checkpoint, load_weights_file
from visionpipe.errors import ConfigError, VisionpipeError

log = logging.getLogger(__name__)

RANDOM_SEED = 20160119  # fixed forever: changing it changes every reported distance
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class RandomConvFeatures(nn.Module):
    """Four conv3x3-ReLU-avgpool stages with seeded Kaiming weights; features = each stage's global mean."""

    widths = (32, 64, 128, 256)

    def __init__(self, seed: int = RANDOM_SEED) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        convs, cin = [], 3
        for w in self.widths:
            conv = nn.Conv2d(cin, w, 3, padding=1)
            with torch.no_grad():
                conv.weight.copy_(torch.randn(conv.weight.shape, generator=g) * (2.0 / (cin * 9)) ** 0.5)
                conv.bias.zero_()
            convs.append(conv)
            cin = w
        self.convs = nn.ModuleList(convs)
        self.requires_grad_(False)

    @property
    def dim(self) -> int:
        """Feature length."""
        return sum(self.widths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] (1 or 3 channels) → [B, dim] features."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        feats = []
        for conv in self.convs:
            x = F.relu(conv(x))
            feats.append(x.mean((2, 3)))
            if min(x.shape[2:]) >= 2:
                x = F.avg_pool2d(x, 2)
        return torch.cat(feats, 1)


class ClassifierFeatures(nn.Module):
    """A classifier's penultimate features (the input of its last nn.Linear) on resized, normalized images."""

    def __init__(self, model: nn.Module, size: int, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        heads = [m for m in model.modules() if isinstance(m, nn.Linear)]
        if not heads:
            raise VisionpipeError(f"{type(model).__name__}: no nn.Linear layer whose input could be the features")
        self.model = model.eval().requires_grad_(False)
        self.size = size
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self._captured: torch.Tensor | None = None
        heads[-1].register_forward_pre_hook(self._capture)

    def _capture(self, module: nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        self._captured = args[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] → [B, D] features."""
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x + 1.0) * 0.5
        if x.shape[-2:] != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False, antialias=True)
        self.model((x - self.mean) / self.std)
        assert self._captured is not None
        return self._captured.flatten(1)


def _from_visionpipe_checkpoint(path: Path, state: dict[str, Any], size: int | None) -> ClassifierFeatures:
    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint

    _, model, _ = task_and_model_from_checkpoint(path)
    aug = (state.get("config") or {}).get("augment") or {}
    own = aug.get("image_size") or [224, 224]
    own = own[0] if isinstance(own, (list, tuple)) else int(own)
    mean, std = tuple(aug.get("mean") or IMAGENET_MEAN), tuple(aug.get("std") or IMAGENET_STD)
    log.info("Fréchet distance features: %s checkpoint %s at %dpx", state.get("task"), path, size or own)
    return ClassifierFeatures(model, size or own, mean, std)


def _from_state_dict(path: Path, arch: str | None, size: int | None) -> ClassifierFeatures:
    import torchvision

    if not arch:
        raise ConfigError(f"{path} is a plain state dict: name its torchvision architecture in "
                          f"evaluate.feature_arch (e.g. resnet18)", field="evaluate.feature_arch")
    try:
        model = torchvision.models.get_model(arch, weights=None)
    except ValueError:
        raise ConfigError(f"unknown torchvision model '{arch}'", field="evaluate.feature_arch") from None
    report = load_weights_file(model, path)
    if report["missing"] or report["mismatched"]:
        raise VisionpipeError(f"evaluate.feature_extractor: {path} does not fit {arch} "
                              f"(missing {report['missing'][:3]}, mismatched {report['mismatched'][:3]})")
    log.info("Fréchet distance features: %s weights %s at %dpx", arch, path, size or 224)
    return ClassifierFeatures(model, size or 224, IMAGENET_MEAN, IMAGENET_STD)


def check_extractor_setting(setting: str) -> None:
    """Fail early (at load time) when the extractor file does not exist."""
    if setting != "random" and not Path(setting).expanduser().is_file():
        raise ConfigError(f"'{setting}' is neither 'random' nor an existing weights file",
                          field="evaluate.feature_extractor")


def build_extractor(setting: str, arch: str | None = None, size: int | None = None) -> nn.Module:
    """The feature network named by ``evaluate.feature_extractor`` (eval mode, no gradients)."""
    if setting == "random":
        return RandomConvFeatures().eval()
    check_extractor_setting(setting)
    path = Path(setting).expanduser()
    state = load_checkpoint(path)
    if "config" in state and "task" in state:
        return _from_visionpipe_checkpoint(path, state, size).eval()
    return _from_state_dict(path, arch, size).eval()
