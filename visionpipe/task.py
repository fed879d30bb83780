"""The Task interface: what a task plugin implements. The engine owns everything else."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import Dataset

from visionpipe.config import PipelineConfig

if TYPE_CHECKING:
    from visionpipe.engine.device_data import DeviceImages
    from visionpipe.images import BadImage
    from visionpipe.infer.backends import Backend
    from visionpipe.pipeline import RunContext


@dataclass
class DataBundle:
    """What the load (+ augment) stage produces."""

    train: Dataset | None = None
    val: Dataset | None = None
    test: Dataset | None = None
    info: dict[str, Any] = field(default_factory=dict)
    """Plain data needed to rebuild the model and interpret outputs (e.g. class names).
    Saved in checkpoints and in exported model metadata."""
    collate_fn: Callable | None = None
    skipped: list[BadImage] = field(default_factory=list)
    """Inputs that were found unreadable and left out, with the reason."""
    inputs: list[Path] = field(default_factory=list)
    """Annotation/list files the data came from (hashed into the manifest)."""


@dataclass
class ExportSpec:
    """What to trace for ONNX and how to check it."""

    module: nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict[str, dict[int, str]]
    metadata: dict[str, Any]
    parity_inputs: list[tuple[torch.Tensor, ...]] = field(default_factory=list)
    """Real inputs (from the data) on which torch and onnxruntime must agree."""
    compare: Callable[[list[np.ndarray], list[np.ndarray]], float] | None = None
    """Max abs difference between torch and ORT outputs; default compares arrays one to one."""
    postprocess_onnx: Callable[[Any], Any] | None = None
    """Rewrites the traced ``onnx.ModelProto`` before it is checked (e.g. wraps it in a loop over the batch)."""
    max_opset: int | None = None
    """The highest opset onnxruntime runs this model at (None: any opset visionpipe exports)."""


class OptimizationContext:
    """Handed to :meth:`Task.train_step` for tasks that optimize by hand (several optimizers)."""

    def __init__(self, optimizers: dict[str, torch.optim.Optimizer], scaler: torch.amp.GradScaler,
                 autocast: Callable[[], AbstractContextManager], grad_clip: float | None) -> None:
        self.optimizers = optimizers
        self.scaler = scaler
        self.autocast = autocast
        self.grad_clip = grad_clip
        self._stepped: set[str] = set()

    def step(self, name: str, loss: torch.Tensor, params: Sequence[torch.Tensor] | None = None) -> None:
        """zero_grad, backward (scaled), clip and step optimizer ``name`` for ``loss``.

        The fp16 loss scale is updated once per training step (by :meth:`finish`), not once per
        optimizer; only an optimizer stepped twice in one training step forces an update between."""
        if name in self._stepped:
            self.finish()
        opt = self.optimizers[name]
        opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip:
            self.scaler.unscale_(opt)
            ps = params if params is not None else [p for g in opt.param_groups for p in g["params"]]
            torch.nn.utils.clip_grad_norm_(ps, self.grad_clip)
        self.scaler.step(opt)
        self._stepped.add(name)

    def finish(self) -> None:
        """End the training step: update the loss scale once if any optimizer stepped (the engine calls it)."""
        if self._stepped:
            self.scaler.update()
            self._stepped.clear()


class Predictor:
    """Turns files into model inputs and model outputs into records, for one exported model."""

    batchable: bool = True
    """Whether samples of one batch can be stacked (same shape after preprocess)."""

    def __init__(self, metadata: dict[str, Any], options: dict[str, Any]) -> None:
        self.metadata, self.options = metadata, options

    def preprocess(self, image: np.ndarray) -> tuple[dict[str, np.ndarray], Any]:
        """One decoded RGB uint8 image → (model inputs without batch axis, per-item state)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement Predictor.preprocess()")

    def postprocess(self, outputs: list[np.ndarray], state: Any) -> dict[str, Any]:
        """One sample's outputs (batch axis removed) → a JSON-able record."""
        raise NotImplementedError(f"{type(self).__name__} does not implement Predictor.postprocess()")

    def draw(self, image: np.ndarray, record: dict[str, Any]) -> np.ndarray | None:
        """Optional picture of the prediction (``--save-images``); None if the task has none."""
        return None

    def write_extra(self, out_dir: Path, records: Iterator[dict[str, Any]]) -> list[Path]:
        """Optional extra outputs built from all records (e.g. a COCO results file)."""
        return []


@dataclass(frozen=True)
class PredictOption:
    """One option of a task's predict: ``visionpipe predict -o name=value`` and the predict block's ``options``."""

    default: Any = None
    """The value when the option is not given (None: the task decides, e.g. from the model's metadata)."""
    help: str = ""
    value_type: type | None = None
    """``float``, ``int``, ``str`` or ``bool``; None accepts any value. None is always accepted (the default)."""
    records: bool = True
    """Whether the value changes the records predict writes; such options are part of the fingerprint that
    lets a re-run resume only the predictions of the same model and options."""
    low: float | None = None
    """Smallest accepted value of a number (inclusive)."""
    high: float | None = None
    """Largest accepted value of a number (inclusive)."""

    def coerce(self, value: Any) -> Any:
        """``value`` as this option's type and range; a ValueError saying what was expected when it is not."""
        t = self.value_type
        if value is None or t is None:
            return value
        if t is float and isinstance(value, str):  # YAML reads 1e-3 (no dot) as text
            with contextlib.suppress(ValueError):
                value = float(value)
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            value = float(value)
            if value != value or value in (float("inf"), float("-inf")):
                raise ValueError(f"must be a finite number (got {value!r})")
        elif not isinstance(value, t) or (t is int and isinstance(value, bool)):
            kind = {float: "a number", int: "an integer", str: "text", bool: "true or false"}.get(t, t.__name__)
            raise ValueError(f"must be {kind} (got {value!r})")
        if self.low is not None and value < self.low:
            raise ValueError(f"must be >= {self.low:g} (got {value!r})")
        if self.high is not None and value > self.high:
            raise ValueError(f"must be <= {self.high:g} (got {value!r})")
        return value


ENGINE_PREDICT_OPTIONS: dict[str, PredictOption] = {
    "prefetch": PredictOption(None, "images decoded ahead of the model (default max(2 x batch, 4 x workers))", int,
                              records=False, low=1),
    "count_total": PredictOption(True, "count the inputs in the background for the progress bar's ETA", bool,
                                 records=False),
    "pin": PredictOption(None, "pin each model runner to its own core (default: decided from the engine)", bool,
                         records=False),
}
"""Options of the image-streaming engine, accepted by every task with ``image_predict``; they change no record."""


class Task:
    """Base class of every task. Subclasses set ``name`` and ``Config`` and fill in the hooks.

    Required: :meth:`build_data`, :meth:`build_model`, :meth:`training_step` (or, with
    ``manual_optimization``, :meth:`train_step`) and :meth:`evaluate` (validation and the evaluate
    stage); :meth:`export_spec` and :meth:`predictor` for export and predict. The rest have defaults."""

    name: ClassVar[str]
    Config: ClassVar[type[PipelineConfig]] = PipelineConfig
    description: ClassVar[str] = ""
    monitor: ClassVar[str] = "val/loss"
    """Metric that picks best.pt and drives early stopping / ReduceLROnPlateau."""
    monitor_mode: ClassVar[str] = "min"
    manual_optimization: ClassVar[bool] = False
    """True when the task steps its own optimizers in :meth:`train_step`."""
    models: ClassVar[dict[str, Callable[..., nn.Module]]] = {}
    """Model registry (name → builder) shown by `visionpipe plugins`."""
    image_predict: ClassVar[bool] = True
    """True when `visionpipe predict` feeds image files through :meth:`predictor`."""
    predict_options: ClassVar[dict[str, PredictOption]] = {}
    """The task options predict accepts (``-o name=value``, the predict block's ``options``); others are errors."""
    predict_resumes: ClassVar[bool] = True
    """True when predict appends to the outputs already in its folder and skips the inputs found there (the
    default image streaming does); the folder then holds the predictions of one model and one set of options."""

    def __init__(self, cfg: PipelineConfig, ctx: RunContext | None = None) -> None:
        self.cfg = cfg
        self.ctx = ctx

    # -- load / augment / model -------------------------------------------------------------
    def build_data(self) -> DataBundle:
        """Load datasets (with their augmentation) for this pipeline."""
        raise NotImplementedError(f"task {self.name} has no load stage")

    def build_model(self, info: dict[str, Any], *, pretrained: bool = True) -> nn.Module:
        """Build the model from the model block and the data info (e.g. number of classes).

        ``pretrained=False`` skips loading the model block's weights file (the caller loads a
        checkpoint right after)."""
        raise NotImplementedError(f"task {self.name} does not implement Task.build_model() (the model stage)")

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        """Parameter groups for the optimizer (fine-tuning: smaller LR for the backbone)."""
        return [{"params": [p for p in model.parameters() if p.requires_grad], "lr": base_lr}]

    def configure_optimizers(self, model: nn.Module) -> dict[str, torch.optim.Optimizer] | None:
        """Several named optimizers for manual optimization; None = the engine builds one."""
        return None

    # -- train -------------------------------------------------------------------------------
    def training_step(self, model: nn.Module, batch: Any) -> dict[str, torch.Tensor]:
        """Forward one batch; return losses, with the total under ``"loss"``."""
        raise NotImplementedError(f"task {self.name} does not implement Task.training_step() (the train stage)")

    def train_step(self, model: nn.Module, batch: Any, opt: OptimizationContext) -> dict[str, float]:
        """Manual optimization: one full step over several optimizers; return logged values."""
        raise NotImplementedError(f"task {self.name} sets manual_optimization but does not implement Task.train_step()")

    def device_images(self, ds: Dataset | None) -> DeviceImages | None:
        """(image path, label) pairs and the augment block of ``ds`` for ``train.decode: device``; None = unsupported.

        The default accepts datasets with torchvision ImageFolder's ``samples`` attribute and a
        core :class:`~visionpipe.augment.AugmentConfig` block; override to opt in or out."""
        from visionpipe.engine.device_data import image_label_source

        return image_label_source(self, ds)

    def batch_size_of(self, batch: Any) -> int:
        """Number of samples in a batch (for throughput)."""
        first = batch[0] if isinstance(batch, (tuple, list)) else batch
        return len(first)

    # -- evaluate ----------------------------------------------------------------------------
    def evaluate(self, model: nn.Module, loader: Any, *, device: torch.device,
                 out_dir: Path | None = None, epoch: int | None = None) -> dict[str, Any]:
        """Metrics on ``loader`` (keys without the split prefix). With ``out_dir``, also plots."""
        raise NotImplementedError(f"task {self.name} does not implement Task.evaluate() (validation during training "
                                  "and the evaluate stage)")

    # -- export / predict ----------------------------------------------------------------------
    def export_spec(self, model: nn.Module, data: DataBundle | None, info: dict[str, Any],
                    num_parity: int) -> ExportSpec:
        """What to export and the metadata the exported model must carry."""
        raise NotImplementedError(f"task {self.name} does not support export")

    @classmethod
    def predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        """A Predictor for an exported model of this task."""
        raise NotImplementedError(f"task {cls.name} does not support predict")

    @classmethod
    def build_predictor(cls, metadata: dict[str, Any], options: dict[str, Any]) -> Predictor:
        """:meth:`predictor`, with metadata that lacks what it needs reported as one line (not a KeyError)."""
        from visionpipe.errors import VisionpipeError

        try:
            return cls.predictor(metadata, options)
        except KeyError as e:  # a key the metadata of this task's exports always has
            raise VisionpipeError(f"the model's visionpipe metadata does not fit task {cls.name} (no {e}); "
                                  "export the model again with `visionpipe export`") from None

    @classmethod
    def accepted_predict_options(cls) -> dict[str, PredictOption]:
        """Every option this task's predict accepts: its own and, for image tasks, the engine's."""
        return {**(ENGINE_PREDICT_OPTIONS if cls.image_predict else {}), **cls.predict_options}

    @classmethod
    def check_predict_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` with values of the declared types; a ConfigError (``field``: the option) otherwise.

        The message for an unknown name suggests the closest accepted one and lists them all."""
        from visionpipe.errors import ConfigError, unknown_name

        accepted = cls.accepted_predict_options()
        checked = {}
        for name, value in options.items():
            if name not in accepted:
                raise ConfigError(unknown_name("predict option", str(name), accepted, context=f"task {cls.name}"),
                                  field=str(name))
            try:
                checked[name] = accepted[name].coerce(value)
            except ValueError as e:
                raise ConfigError(str(e), field=str(name)) from None
        return checked

    @classmethod
    def record_options(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """The values (given or default) of the options that change the records: part of the output fingerprint."""
        out = {}
        for name, opt in sorted(cls.accepted_predict_options().items()):
            if opt.records:
                value = options.get(name)
                out[name] = opt.coerce(opt.default if value is None else value)
        return out

    @classmethod
    def predict(cls, backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                options: dict[str, Any]) -> dict[str, Any]:
        """Run prediction; the default streams image files through :meth:`predictor`."""
        from visionpipe.infer.runner import predict_images

        if source is None:
            from visionpipe.errors import VisionpipeError
            raise VisionpipeError(f"task {cls.name}: predict needs a SOURCE (file, folder or glob)")
        return predict_images(backend, cls.build_predictor(metadata, options), source, out_dir, options)
