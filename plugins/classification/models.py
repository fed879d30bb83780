"""torchvision classification models by name, local weights, head replacement, backbone groups."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torchvision
from torch import nn

from visionpipe.engine.checkpoint import load_weights_file
from visionpipe.errors import VisionpipeError, unknown_name

log = logging.getLogger(__name__)


def model_names() -> list[str]:
    """Every torchvision classification model name."""
    return sorted(torchvision.models.list_models(module=torchvision.models))


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """(qualified name, module) of the classifier head: the last nn.Linear."""
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not found:
        raise VisionpipeError(f"{type(model).__name__}: no nn.Linear head found to replace")
    return found[-1]


def replace_module(model: nn.Module, qualname: str, new: nn.Module) -> None:
    """Set the sub-module at dotted ``qualname`` to ``new``."""
    parent_name, _, attr = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def torchvision_cached_weights(name: str, weights: str) -> Path:
    """Path of torchvision weights ``name``/``weights`` in the local hub cache (no download)."""
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum[weights] if weights != "DEFAULT" else enum.DEFAULT
    except (KeyError, ValueError):
        raise VisionpipeError(f"model.weights: '{weights}' is neither a file nor a torchvision weights name for {name}") from None
    fname = Path(w.url).name
    path = Path(torch.hub.get_dir()) / "checkpoints" / fname
    if not path.is_file():
        raise VisionpipeError(f"model.weights: {weights} is not in torchvision's cache ({path}); downloads are off — "
                              f"copy the file there or give a local path")
    return path


def build_classifier(name: str, num_classes: int, weights: str | None = None, freeze_backbone: bool = False,
                     dropout: float | None = None) -> nn.Module:
    """Model ``name`` with a ``num_classes`` head; local pretrained weights loaded into the backbone."""
    names = model_names()
    if name not in names:
        raise VisionpipeError(unknown_name("model", name, [n for n in names if not n.startswith("quantized")],
                                           "task classification").split(" (valid")[0]
                              + " (see: visionpipe plugins --json)")
    model = torchvision.models.get_model(name, weights=None)
    head_name, head = last_linear(model)
    if weights:
        path = Path(weights).expanduser()
        if not path.is_file():
            path = torchvision_cached_weights(name, weights)
        report = load_weights_file(model, path)
        in_head = head_name + "."
        misfit = [k for k in (*report["mismatched"], *report["missing"], *report["unexpected"])
                  if not k.startswith(in_head)]
        if misfit:  # only the head may differ: anything else means weights of another architecture
            raise VisionpipeError(
                f"model.weights: {path} does not fit {name}: {len(misfit)} backbone tensors are missing, "
                f"extra or of another shape (e.g. {', '.join(misfit[:3])}); is it for another "
                "architecture?")
        loaded_head = head_name + ".weight" not in (*report["mismatched"], *report["missing"])
        log.info("loaded weights %s into %s; its head %s%s is replaced by a new, untrained %d-class one", path, name,
                 head_name, f" ({head.out_features} outputs)" if loaded_head else "", num_classes)
    new_head: nn.Module = nn.Linear(head.in_features, num_classes)
    if dropout is not None:
        new_head = nn.Sequential(nn.Dropout(dropout), new_head)
    if weights or head.out_features != num_classes or dropout is not None:
        replace_module(model, head_name, new_head)
    model.visionpipe_head = head_name  # remembered for parameter groups
    if freeze_backbone:
        head_mod = model.get_submodule(head_name)
        head_ids = {id(p) for p in head_mod.parameters()}
        for p in model.parameters():
            if id(p) not in head_ids:
                p.requires_grad_(False)
    return model


def split_head_backbone(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(head parameters, backbone parameters), trainable ones only."""
    head_name = getattr(model, "visionpipe_head", None) or last_linear(model)[0]
    head_ids = {id(p) for p in model.get_submodule(head_name).parameters()}
    head = [p for p in model.parameters() if id(p) in head_ids and p.requires_grad]
    back = [p for p in model.parameters() if id(p) not in head_ids and p.requires_grad]
    return head, back
