"""What both char-RNN tasks share: the model block, <unk> dropout, and local weights."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from visionpipe.engine.checkpoint import load_weights_file
from visionpipe.errors import VisionpipeError
from visionpipe.task import Task
from visionpipe_plugins.charrnn.config import RnnModelConfig
from visionpipe_plugins.charrnn.models import CELLS, CharRNN, build_model
from visionpipe_plugins.charrnn.text import PAD, UNK

log = logging.getLogger(__name__)


class CharRnnTask(Task):
    """Base of the char-RNN tasks: sequences of characters in, not images."""

    kind: ClassVar[str] = ""
    image_predict = False
    predict_resumes = False  # every run writes all its records again
    models: ClassVar[dict] = dict(CELLS)

    def model_cfg(self) -> RnnModelConfig:
        """The model block (defaults when absent)."""
        return self.cfg.model or RnnModelConfig()

    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """The recurrent model sized by the saved vocabulary (and class names)."""
        vocab = info.get("vocab")
        if not vocab:
            raise VisionpipeError(f"{self.name}: the model stage needs the vocabulary (run 'load' first)")
        m = self.model_cfg()
        model = build_model(self.kind, len(vocab), len(info.get("class_names") or []), m)
        if pretrained and m.weights:
            report = load_weights_file(model, Path(m.weights).expanduser())
            log.info("loaded %s (skipped %d mismatched, %d missing)", m.weights, len(report["mismatched"]),
                     len(report["missing"]))
        return model

    def unk_dropout(self, tokens: torch.Tensor) -> torch.Tensor:
        """Training inputs with a fraction of characters replaced by <unk> (``train.unk_dropout``)."""
        p = self.cfg.train.unk_dropout if self.cfg.train else 0.0
        if p <= 0:
            return tokens
        drop = (torch.rand(tokens.shape, device=tokens.device) < p) & (tokens != PAD)
        return tokens.masked_fill(drop, UNK)

    @staticmethod
    def describe(model: CharRNN) -> dict[str, Any]:
        """Model facts recorded in the exported metadata."""
        return {"cell": model.cell, "layers": model.layers, "hidden_size": model.hidden_size,
                "input": "onehot" if not isinstance(model.embed, nn.Embedding) else "embedding"}
