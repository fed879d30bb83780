"""The charrnn_classify task: a short string (a name, a word) → one of N classes."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.errors import VisionpipeError
from visionpipe.infer.backends import Backend
from visionpipe.plots import plot_confusion
from visionpipe.task import DataBundle, ExportSpec, PredictOption
from visionpipe_plugins.charrnn.config import CharRnnClassifyConfig
from visionpipe_plugins.charrnn.data import collate, load_classify
from visionpipe_plugins.charrnn.metrics import classification_metrics
from visionpipe_plugins.charrnn.models import ClassifierExport
from visionpipe_plugins.charrnn.predict import classify_lines
from visionpipe_plugins.charrnn.task import CharRnnTask


class CharRnnClassifyTask(CharRnnTask):
    """Classify short strings with a character RNN, from a folder of <label>.txt files."""

    name = "charrnn_classify"
    kind = "classify"
    Config = CharRnnClassifyConfig
    description = "char-RNN classification of short strings (one <label>.txt per class)"
    monitor = "val/acc"
    monitor_mode = "max"
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "top_k": PredictOption(5, "classes per record, likeliest first", int, low=1)}

    cfg: CharRnnClassifyConfig

    def build_data(self) -> DataBundle:
        """Lines of every class file, split per class into train/val/test; vocabulary from train."""
        if self.cfg.load is None:
            raise VisionpipeError("charrnn_classify needs a 'load' block")
        data, info, inputs = load_classify(self.cfg.load, self.cfg.seed)
        return DataBundle(train=data.get("train"), val=data.get("val"), test=data.get("test"), info=info,
                          collate_fn=collate, inputs=inputs)

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Cross-entropy on one padded batch (run packed)."""
        tokens, lengths, y = batch
        logits = model(self.unk_dropout(tokens), lengths).float()
        return {"loss": F.cross_entropy(logits, y), "acc": (logits.argmax(1) == y).float().mean()}

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """Loss, accuracy, per-class precision/recall/F1; confusion matrix (PNG) on the final pass."""
        classes = self.ctx.info["class_names"] if self.ctx else loader.dataset.class_names
        n = len(classes)
        cm = torch.zeros(n, n, dtype=torch.long)
        loss_sum, count = 0.0, 0
        for tokens, lengths, y in loader:
            tokens, lengths, y = tokens.to(device), lengths.to(device), y.to(device)
            logits = model(tokens, lengths).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            count += len(y)
            cm += torch.bincount(y.cpu() * n + logits.argmax(1).cpu(), minlength=n * n).reshape(n, n)
        if count == 0:
            raise VisionpipeError("charrnn_classify: the evaluation split is empty")
        res = {"loss": loss_sum / count, **classification_metrics(cm, classes)}
        if epoch is None:
            res["confusion_matrix"] = cm.tolist()
            if out_dir is not None:
                plot_confusion(cm.numpy(), classes, Path(out_dir) / "plots" / "confusion_matrix.png",
                               title=f"confusion matrix (accuracy {res['acc']:.3f})")
        return res

    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """(tokens, lengths) → (logits, probs); vocabulary and preprocessing in the metadata."""
        ds = (data.test or data.val or data.train) if data else None
        parity = []
        if ds is not None and num_parity:
            for start in (0, num_parity):
                items = [ds[i] for i in range(start, min(len(ds), start + num_parity))]
                if items:
                    tokens, lengths, _ = collate(items)
                    parity.append((tokens, lengths))
        example = parity[0] if parity else (torch.randint(2, len(info["vocab"]), (2, 7)), torch.tensor([7, 4]))
        meta = {"task": self.name, "vocab": info["vocab"], "class_names": info["class_names"],
                "max_length": info["max_length"], "lowercase": info["lowercase"], **self.describe(model)}
        axes = {"tokens": {0: "batch", 1: "time"}, "lengths": {0: "batch"}, "logits": {0: "batch"},
                "probs": {0: "batch"}}
        return ExportSpec(ClassifierExport(model), example, ["tokens", "lengths"], ["logits", "probs"], axes, meta,
                          parity_inputs=parity)

    @classmethod
    def predict(cls, backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any]) -> dict[str, Any]:
        """Classify each line of SOURCE (a text file, or a folder of <label>.txt files scored against their names)."""
        return classify_lines(backend, metadata, source, out_dir, options)
