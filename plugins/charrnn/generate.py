"""The charrnn_generate task: a character-level language model, sampled with temperature and top-k."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from visionpipe.errors import VisionpipeError
from visionpipe.infer.backends import Backend
from visionpipe.io import write_text
from visionpipe.task import DataBundle, ExportSpec, PredictOption
from visionpipe_plugins.charrnn.config import CharRnnGenerateConfig
from visionpipe_plugins.charrnn.data import collate, load_generate
from visionpipe_plugins.charrnn.metrics import LanguageModelMeter
from visionpipe_plugins.charrnn.models import CharLM, LMExport
from visionpipe_plugins.charrnn.predict import generate_texts
from visionpipe_plugins.charrnn.sampling import generate
from visionpipe_plugins.charrnn.task import CharRnnTask
from visionpipe_plugins.charrnn.text import Vocab

log = logging.getLogger(__name__)


def torch_step(model: CharLM, device: torch.device):
    """A sampling step function (numpy in, numpy out) over a PyTorch language model."""

    @torch.no_grad()
    def step(tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, st = model(torch.from_numpy(tokens).to(device), None, torch.from_numpy(state).to(device))
        return logits.float().cpu().numpy(), st.float().cpu().numpy()

    return step


class CharRnnGenerateTask(CharRnnTask):
    """A character-level language model trained on a text file; generates text from a prompt."""

    name = "charrnn_generate"
    kind = "generate"
    Config = CharRnnGenerateConfig
    description = "char-RNN language model: bits per character, text generation with temperature and top-k"
    monitor = "val/bpc"
    monitor_mode = "min"
    predict_options: ClassVar[dict[str, PredictOption]] = {
        "prompt": PredictOption(None, "the text to continue (default: each line of SOURCE, else the model's "
                                        "sampling.prompt)", str),
        "length": PredictOption(None, "characters to generate (default: the model's sampling.length)", int,
                               low=1),
        "temperature": PredictOption(None, "sampling temperature, 0 = greedy (default: the model's "
                                             "sampling.temperature)", float, low=0),
        "top_k": PredictOption(None, "sample among the k likeliest characters, 0 = all (default: the model's "
                                       "sampling.top_k)", int, low=0),
        "num": PredictOption(1, "samples per prompt", int, low=1),
        "seed": PredictOption(0, "random seed", int, low=0),
    }

    cfg: CharRnnGenerateConfig

    def build_data(self) -> DataBundle:
        """Chunks of the train/val/test texts; vocabulary and unigram counts from train."""
        if self.cfg.load is None:
            raise VisionpipeError("charrnn_generate needs a 'load' block")
        data, info, inputs = load_generate(self.cfg.load)
        return DataBundle(train=data.get("train"), val=data.get("val"), test=data.get("test"), info=info,
                          collate_fn=collate, inputs=inputs)

    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Next-character cross-entropy over every real (non-padding) position."""
        tokens, lengths, targets = batch
        logits, _ = model(self.unk_dropout(tokens), lengths)
        loss = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=0)
        return {"loss": loss, "bpc": loss.detach() / np.log(2.0)}

    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device, out_dir: Path | None = None,
                 epoch: int | None = None) -> dict[str, Any]:
        """Loss, perplexity and bits per character, beside a unigram baseline on the same characters."""
        info = self.ctx.info if self.ctx else {}
        meter = LanguageModelMeter(info["unigram_counts"])
        for tokens, lengths, targets in loader:
            logits, _ = model(tokens.to(device), lengths.to(device))
            meter.update(logits, targets.to(device))
        res = meter.result()
        if res["chars"] == 0:
            raise VisionpipeError("charrnn_generate: the evaluation split is empty")
        s = self.cfg.sampling
        if out_dir is not None and (epoch is None or (s.every and epoch % s.every == 0)):
            rng = np.random.default_rng(self.cfg.seed)
            text = s.prompt + generate(torch_step(model, device), Vocab.from_info(info["vocab"]),
                                       (model.state_layers, model.hidden_size), s.prompt, s.length,
                                       s.temperature, s.top_k, rng)
            name = "final.txt" if epoch is None else f"epoch_{epoch:03d}.txt"
            write_text(Path(out_dir) / "samples" / name, text + "\n")
            log.info("sample (%s): %s", name, text[:160].replace("\n", " | "))
        return res

    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """(tokens, state) → (logits, state_out), so generation runs step by step in onnxruntime."""
        ds = (data.val or data.test or data.train) if data else None
        b = max(1, min(num_parity, 4))
        if ds is not None and num_parity and len(ds) > 0:
            tokens, _, _ = collate([ds[i % len(ds)] for i in range(b)])
            tokens = tokens[:, :48]
        else:
            tokens = torch.randint(2, len(info["vocab"]), (b, 24))
        zero = model.zero_state(len(tokens))
        parity: list[tuple[torch.Tensor, ...]] = []
        if num_parity:
            with torch.no_grad():
                half = tokens.shape[1] // 2
                _, st = model(tokens[:, :half], None, zero)
                parity = [(tokens[:, :half], zero), (tokens[:, half:], st), (tokens[:, half:half + 1], st)]
        s = self.cfg.sampling
        meta = {"task": self.name, "vocab": info["vocab"], "state_shape": [model.state_layers, model.hidden_size],
                "sampling": {"prompt": s.prompt, "length": s.length, "temperature": s.temperature, "top_k": s.top_k},
                **self.describe(model)}
        axes = {"tokens": {0: "batch", 1: "time"}, "state": {1: "batch"}, "logits": {0: "batch", 1: "time"},
                "state_out": {1: "batch"}}
        return ExportSpec(LMExport(model), (tokens, zero), ["tokens", "state"], ["logits", "state_out"], axes, meta,
                          parity_inputs=parity)

    @classmethod
    def predict(cls, backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any]) -> dict[str, Any]:
        """Generate from ``--prompt`` (or each line of SOURCE) with temperature / top-k options."""
        return generate_texts(backend, metadata, source, out_dir, options)
