"""Pipeline config: YAML with line numbers, pydantic validation, ``--set`` overrides.

A pipeline file has core keys (``task``, ``name``, ``seed``, ``device``, ``output``,
``stages``) and one block per stage (``load``, ``augment``, ``model``, ``train``,
``evaluate``, ``export``, ``predict``, and any stage a plugin adds). The task plugin
supplies the pydantic model for the whole file by subclassing :class:`PipelineConfig`.
"""

from __future__ import annotations

import copy
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from visionpipe.errors import ConfigError, did_you_mean

# ----------------------------------------------------------------------------- base models


class Block(BaseModel):
    """Base of every config block: typed, documented, unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())


class OptimizerConfig(Block):
    """Optimizer settings (SGD or AdamW)."""

    name: Literal["sgd", "adamw", "adam"] = Field("sgd", description="optimizer")
    lr: float = Field(0.01, gt=0, description="learning rate")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum (SGD)")
    weight_decay: float = Field(0.0, ge=0, description="weight decay (decoupled for AdamW)")
    betas: tuple[float, float] = Field((0.9, 0.999), description="Adam/AdamW betas")
    fused: bool | None = Field(
        None, description="torch's fused optimizer kernel (one kernel for all parameters: 3-4x faster steps); "
                          "default: on when every parameter is a floating-point tensor on the CPU or CUDA")
    backbone_lr_mult: float = Field(
        1.0, ge=0, description="LR multiplier for backbone parameters (0 freezes them); head keeps lr")


class SchedulerConfig(Block):
    """LR scheduler, stepped once per epoch (ReduceLROnPlateau on the monitored metric)."""

    name: Literal["none", "step", "multistep", "exponential", "cosine", "plateau"] = "none"
    step_size: int = Field(10, gt=0, description="StepLR: epochs between decays")
    milestones: list[int] = Field(default_factory=lambda: [30, 60], description="MultiStepLR epochs")
    gamma: float = Field(0.1, gt=0, description="decay factor (step, multistep, exponential)")
    t_max: int | None = Field(None, gt=0, description="CosineAnnealingLR period; default: epochs - warmup")
    eta_min: float = Field(0.0, ge=0, description="CosineAnnealingLR minimum LR")
    patience: int = Field(3, ge=0, description="ReduceLROnPlateau patience (epochs)")
    factor: float = Field(0.1, gt=0, lt=1, description="ReduceLROnPlateau factor")
    warmup_epochs: float = Field(0.0, ge=0, description="linear warm-up from warmup_start_factor*lr")
    warmup_start_factor: float = Field(0.1, gt=0, le=1, description="LR fraction at step 0 of warm-up")


class EarlyStoppingConfig(Block):
    """Stop when the monitored metric has not improved for ``patience`` epochs."""

    patience: int = Field(5, gt=0)
    min_delta: float = Field(0.0, ge=0)


class TrainConfig(Block):
    """The shared training engine's settings; tasks may extend this block."""

    epochs: int = Field(10, gt=0, description="number of epochs")
    batch_size: int = Field(32, gt=0, description="batch size per process")
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = Field(default_factory=SchedulerConfig)
    grad_clip: float | None = Field(None, gt=0, description="clip gradient norm to this value")
    grad_accum: int = Field(1, gt=0, description="accumulate gradients over this many batches")
    amp: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto", description="mixed precision: auto = bf16 on CUDA when supported (else fp16 with a gradient "
        "scaler), off on CPU; bf16 also runs on CPU; fp16 needs CUDA (off on CPU, with a warning)")
    channels_last: bool = Field(False, description="channels_last memory format for the model and 4-D input batches")
    compile: bool = Field(False, description="torch.compile the model (after DDP wrapping)")
    cudnn_benchmark: bool | None = Field(
        None, description="let cuDNN pick the fastest convolution algorithms for the input sizes it sees; "
        "default: on with CUDA unless deterministic: true")
    ema: float | None = Field(None, gt=0, lt=1, description="keep an EMA of weights with this decay; evaluated and exported")
    monitor: str | None = Field(None, description="metric that picks best.pt, e.g. 'val/top1'; default: the task's")
    monitor_mode: Literal["max", "min"] | None = Field(None, description="whether higher or lower is better")
    early_stopping: EarlyStoppingConfig | None = None
    eval_every: int = Field(1, gt=0, description="evaluate every N epochs")
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes")
    pin_memory: bool | None = Field(
        None, description="page-locked host memory for batches, copied to the GPU without blocking; default: on with CUDA")
    persistent_workers: bool = Field(
        False, description="keep DataLoader workers alive from one epoch to the next (needs num_workers > 0)")
    prefetch_factor: int | None = Field(
        None, gt=0, description="batches each worker prepares ahead (needs num_workers > 0); default 4")
    decode: Literal["workers", "device"] = Field(
        "workers", description="where training images are decoded and augmented: 'workers' (the task's CPU "
        "transforms in DataLoader workers) or 'device' (workers only read JPEG bytes; decoding and "
        "resize/crop/flip/normalize run on the training device: nvJPEG on CUDA, torchvision on CPU); "
        "for image-label datasets, see docs/distributed.md")
    log_every: int = Field(10, gt=0, description="steps between TensorBoard scalars (on CUDA also between reads "
                           "of the loss on the host, which wait for the GPU)")
    tensorboard: bool = Field(True, description="write TensorBoard event files to <run>/tb")

    @model_validator(mode="after")
    def _workers_options(self) -> TrainConfig:
        for name in ("persistent_workers", "prefetch_factor"):
            if getattr(self, name) and self.num_workers == 0:
                raise ValueError(f"{name} needs num_workers > 0 (DataLoader worker processes); got num_workers: 0")
        return self


class ExportConfig(Block):
    """ONNX export with a parity check against PyTorch."""

    format: Literal["onnx"] = "onnx"
    opset: int = Field(17, ge=11, le=23, description="ONNX opset (detection: up to 21)")
    dynamic_batch: bool = Field(True, description="dynamic batch axis")
    conv_to_matmul: bool = Field(True, description="convolutions on maps so small that every output sees every "
                                                   "input (e.g. a ResNet's last stage at 64x64) become one matrix "
                                                   "product: faster in onnxruntime, same outputs, larger file")
    tolerance: float = Field(1e-3, gt=0, description="max abs difference allowed against PyTorch")
    parity_samples: int = Field(4, gt=0, description="real inputs used for the parity check")
    file: str = Field("model.onnx", description="file name inside the run folder")


class PredictConfig(Block):
    """Batch inference over files (a folder, a file or a glob) with the exported model."""

    source: str | None = Field(None, description="file, folder (recursive) or glob to predict on")
    batch_size: int = Field(16, gt=0)
    device: Literal["cpu", "cuda", "auto"] = "auto"
    top_k: int | None = Field(None, ge=0, description="the task's top_k option: classes per record (classification, "
                                                      "default 5) or charrnn_generate's sampling top-k (0 = all; "
                                                      "default: the model's); an error for tasks without it")
    save_images: bool = Field(False, description="draw predictions on copies of the images")
    out: str = Field("predictions", description="folder inside the run folder")
    workers: int | None = Field(None, ge=0, description="decoder threads/processes; default: cores, or cores/4 "
                                                          "for a model on the CPU; 0 = main thread")
    streams: int | None = Field(None, ge=1, description="batches the model runs at once; default: cores for "
                                                         "onnxruntime on the CPU, 1 for torch on the CPU, 2 on a GPU")
    decode: Literal["threads", "processes"] = Field("threads", description="how inputs are decoded in parallel")
    options: dict[str, Any] = Field(
        default_factory=dict,
        description="task-specific predict options, as `visionpipe predict -o key=value` takes them "
                    "(e.g. detection score_threshold, dcgan num/seed, charrnn prompt/length/temperature); "
                    "the predict stage refuses a name its task does not declare")

    @model_validator(mode="after")
    def _options_are_not_block_keys(self) -> PredictConfig:
        for name in self.options:
            if name in type(self).model_fields:  # it would be overridden by the block's own value
                raise ValueError(f"options.{name}: {name} is a key of the predict block itself; "
                                 f"set predict.{name} instead of predict.options.{name}")
        return self


class EvaluateConfig(Block):
    """Evaluation split and options."""

    split: Literal["val", "test"] = "val"
    batch_size: int | None = Field(None, gt=0, description="default: train.batch_size")


STAGE_ORDER = ("load", "augment", "model", "train", "evaluate", "export", "predict")
STAGE_NEEDS = {"augment": ("load",), "train": ("load", "model"), "evaluate": ("load", "model"),
               "export": ("model",)}  # built-in stages that use what earlier stages of the same run made


class PipelineConfig(Block):
    """The whole pipeline file. Tasks subclass it to type load/augment/model (and extend train)."""

    task: str = Field(description="task plugin name, see `visionpipe plugins`")
    name: str | None = Field(None, description="run name; default: the file's stem")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="seed for Python, NumPy and torch RNGs")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto = cuda when available")
    output: str = Field("runs", description="folder that holds run folders")
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms")
    stages: list[str] | None = Field(
        None, description="stages to run, in order; default: every stage block present, in canonical order")
    load: Any = None
    augment: Any = None
    model: Any = None
    train: TrainConfig | None = None
    evaluate: EvaluateConfig | None = None
    export: ExportConfig | None = None
    predict: PredictConfig | None = None

    @model_validator(mode="after")
    def _deterministic_consistent(self) -> PipelineConfig:
        if self.deterministic and self.train is not None and self.train.cudnn_benchmark:
            raise ValueError("train.cudnn_benchmark: true contradicts deterministic: true (the autotuner "
                             "may pick non-deterministic algorithms); drop one of them")
        return self

    @field_validator("stages")
    @classmethod
    def _stages_known(cls, stages: list[str] | None) -> list[str] | None:
        if stages is not None:
            known = set(cls.model_fields) | set(_extra_stage_names)
            for s in stages:
                if s not in STAGE_ORDER and s not in _extra_stage_names:
                    raise ValueError(f"unknown stage '{s}'{did_you_mean(s, known)}")
            for i, s in enumerate(stages):
                missing = [n for n in STAGE_NEEDS.get(s, ()) if n not in stages[:i]]
                if missing:
                    raise ValueError(f"stage '{s}' needs {' and '.join(repr(n) for n in missing)} before it")
        return stages

    def stage_list(self, extra: Mapping[str, Any] | None = None) -> list[str]:
        """Stages to run, in order."""
        if self.stages is not None:
            return list(self.stages)
        present = [s for s in STAGE_ORDER if getattr(self, s, None) is not None]
        return present + [s for s in (extra or {})]


_extra_stage_names: set[str] = set()


# ----------------------------------------------------------------------------- YAML with lines


class _LineLoader(yaml.SafeLoader):
    """SafeLoader that remembers the line of every mapping key and sequence item."""


MAX_YAML_VALUES = 100_000  # a pipeline has hundreds; nested aliases ("billion laughs") would have billions


def _load_with_lines(text: str, filename: str) -> tuple[Any, dict[tuple, int]]:
    lines: dict[tuple, int] = {}
    try:
        node = yaml.compose(text, Loader=_LineLoader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", file=filename, line=line) from None
    if node is None:
        return {}, lines
    count = 0

    def walk(n: yaml.Node, path: tuple, parents: tuple[int, ...]) -> None:
        nonlocal count
        count += 1
        if count > MAX_YAML_VALUES:
            raise ConfigError(f"the YAML expands to more than {MAX_YAML_VALUES:,} values (nested aliases?)",
                              file=filename, line=n.start_mark.line + 1)
        if id(n) in parents:
            raise ConfigError("a YAML alias refers to a value that contains it (a recursive structure)",
                              file=filename, line=n.start_mark.line + 1)
        lines.setdefault(path, n.start_mark.line + 1)
        if isinstance(n, yaml.MappingNode):
            first: dict[Any, int] = {}
            for k, v in n.value:
                key = k.value
                if key in first and key != "<<":
                    raise ConfigError(f"duplicate key '{key}' (first at line {first[key]}); YAML keeps only the last",
                                      file=filename, line=k.start_mark.line + 1)
                first[key] = lines[path + (key,)] = k.start_mark.line + 1
                walk(v, path + (key,), parents + (id(n),))
        elif isinstance(n, yaml.SequenceNode):
            for i, v in enumerate(n.value):
                lines[path + (i,)] = v.start_mark.line + 1
                walk(v, path + (i,), parents + (id(n),))

    walk(node, (), ())  # before constructing: refuses duplicate keys and alias bombs first
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark else None
        raise ConfigError(f"invalid YAML: {getattr(e, 'problem', e)}", file=filename, line=line) from None
    return data, lines


# ----------------------------------------------------------------------------- overrides


def parse_override(item: str) -> tuple[list[str], Any]:
    """Parse ``a.b.c=value``; the value is read as YAML (so 3, 0.1, true, [1,2] are typed)."""
    if "=" not in item:
        raise ConfigError(f"--set expects dotted.key=value (got '{item}')")
    key, raw = item.split("=", 1)
    key = re.sub(r"\[(\d+)\]", r".\1", key)  # augment.train[0].p is augment.train.0.p
    if not key or any(not p for p in key.split(".")):
        raise ConfigError(f"--set: bad key '{key}'")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def _list_index(items: list, key: str, path: list[str], item: str) -> int:
    """``key`` as an index into ``items``; a ConfigError naming the override otherwise."""
    if not key.isdigit() or int(key) >= len(items):
        raise ConfigError(f"'{key}' is not an index of this list (it has {len(items)} items)"
                          f" in --set {item}", file="--set", field=".".join(path))
    return int(key)


def apply_overrides(data: dict, overrides: list[str]) -> set[tuple]:
    """Set each ``dotted.key=value`` into ``data`` in place; return the overridden paths."""
    touched = set()
    for item in overrides:
        keys, value = parse_override(item)
        cur = data
        for depth, k in enumerate(keys[:-1]):
            if isinstance(cur, list):
                cur = cur[_list_index(cur, k, keys[:depth + 1], item)]
                continue
            if cur.get(k) is not None and not isinstance(cur[k], (dict, list)):
                raise ConfigError(f"cannot set '{'.'.join(keys[depth + 1:])}' inside {'.'.join(keys[:depth + 1])}: "
                                  f"it is {cur[k]!r}, not a mapping (in --set {item})",
                                  file="--set", field=".".join(keys[:depth + 1]))
            if not isinstance(cur.get(k), (dict, list)):
                cur[k] = {}
            cur = cur[k]
        if isinstance(cur, list):
            cur[_list_index(cur, keys[-1], keys, item)] = value
        else:
            cur[keys[-1]] = value
        touched.add(tuple(keys))
    return touched


# ----------------------------------------------------------------------------- errors


def _humanize(err: dict) -> str:
    """Turn a pydantic error into a short message."""
    typ, msg, ctx = err.get("type", ""), err.get("msg", ""), err.get("ctx") or {}
    got = err.get("input")
    show_got = not isinstance(got, (dict, list)) and typ != "missing"
    def num(v: Any) -> str:
        return f"{v:g}" if isinstance(v, float) else str(v)

    if typ == "greater_than":
        msg = f"must be > {num(ctx.get('gt'))}"
    elif typ == "greater_than_equal":
        msg = f"must be >= {num(ctx.get('ge'))}"
    elif typ == "less_than":
        msg = f"must be < {num(ctx.get('lt'))}"
    elif typ == "less_than_equal":
        msg = f"must be <= {num(ctx.get('le'))}"
    elif typ == "missing":
        msg = "required field is missing"
    elif typ == "literal_error":
        msg = f"must be one of {ctx.get('expected')}"
    elif msg.startswith("Value error, "):
        msg = msg[len("Value error, "):]
    return f"{msg} (got {got!r})" if show_got else msg


def _allowed_keys(model: type[BaseModel] | None, loc: tuple) -> list[str]:
    """Field names of the sub-model that ``loc`` (excluding its last key) points into."""
    cur: Any = model
    for part in loc[:-1]:
        if not (isinstance(cur, type) and issubclass(cur, BaseModel)):
            return []
        f = cur.model_fields.get(str(part))
        if f is None:
            return []
        cur = _model_in(f.annotation)
    if isinstance(cur, type) and issubclass(cur, BaseModel):
        return list(cur.model_fields)
    return []


def _model_in(annotation: Any) -> Any:
    """The BaseModel class inside an annotation such as ``X | None`` or ``list[X]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()) or ():
        m = _model_in(arg)
        if m is not None:
            return m
    return None


def validation_to_config_error(exc: ValidationError, source: ConfigSource, model: type[BaseModel] | None,
                               prefix: tuple = ()) -> ConfigError:
    """The first pydantic error as a ConfigError with file, line and dotted field."""
    err = exc.errors()[0]
    # drop pydantic's union/tag parts (e.g. 'function-after[...]') from the location
    loc = prefix + tuple(p for p in err["loc"] if not (isinstance(p, str) and ("[" in p or p.startswith("function"))))
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[len(prefix):])
        hint = did_you_mean(str(loc[-1]), allowed)
        msg = f"unknown key{hint}" + (f" (allowed: {', '.join(allowed)})" if allowed and not hint else "")
    else:
        msg = _humanize(err)
    extra = len(exc.errors()) - 1
    if extra:
        msg += f" (and {extra} more error{'s' if extra > 1 else ''})"
    return source.error(msg, loc)


# ----------------------------------------------------------------------------- loading


@dataclass
class ConfigSource:
    """Where a config came from: file name, key → line map, and overridden keys."""

    file: str
    lines: dict[tuple, int] = field(default_factory=dict)
    overridden: set[tuple] = field(default_factory=set)

    def line_of(self, loc: tuple) -> int | None:
        """Line of ``loc`` or of its closest parent present in the file."""
        loc = tuple(loc)
        while loc:
            if loc in self.lines:
                return self.lines[loc]
            loc = loc[:-1]
        return None

    def error(self, message: str, loc: tuple = ()) -> ConfigError:
        """A ConfigError located at ``loc`` (a dotted path)."""
        fieldname = ".".join(str(p) for p in loc) or None
        loc = tuple(loc)
        set_here = loc in self.overridden or any(loc[:i] in self.overridden for i in range(1, len(loc)))
        set_below = loc not in self.lines and any(o[:len(loc)] == loc for o in self.overridden)
        if set_here or set_below:
            return ConfigError(message, file="--set", field=fieldname)
        return ConfigError(message, file=self.file, line=self.line_of(loc), field=fieldname)


@dataclass
class LoadedConfig:
    """A validated pipeline config plus where it came from."""

    config: PipelineConfig
    raw: dict
    source: ConfigSource
    extra_stages: dict[str, Any] = field(default_factory=dict)

    def resolved_dict(self) -> dict:
        """The resolved config (defaults filled in) as plain data, for config.yaml."""
        d = self.config.model_dump(mode="json", exclude_none=False)
        d.update({k: (v.model_dump(mode="json") if isinstance(v, BaseModel) else v)
                  for k, v in self.extra_stages.items()})
        return d


def read_yaml_file(path: str | os.PathLike) -> tuple[dict, ConfigSource]:
    """Read a pipeline file into plain data plus a line map. Errors name the file."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError("file not found", file=str(path))
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"not UTF-8 text ({e.reason} at byte {e.start})", file=str(path)) from None
    data, lines = _load_with_lines(text, str(path))
    if not isinstance(data, dict):
        raise ConfigError("a pipeline must be a YAML mapping with at least 'task:'", file=str(path), line=1)
    return data, ConfigSource(str(path), lines)


def load_config(path: str | os.PathLike | None, overrides: list[str] | None = None, *,
                data: dict | None = None, manager: Any = None) -> LoadedConfig:
    """Load, override and validate a pipeline against its task's schema."""
    from visionpipe.manager import get_manager

    manager = manager or get_manager()
    if data is None:
        data, source = read_yaml_file(path)
    else:
        data, source = copy.deepcopy(data), ConfigSource(str(path or "<config>"))
    source.overridden = apply_overrides(data, overrides or [])

    task_name = data.get("task")
    if task_name is None:
        raise source.error("required field is missing (name a task, see `visionpipe plugins`)", ("task",))
    if not isinstance(task_name, str):
        raise source.error(f"must be a task name, not {task_name!r} (see `visionpipe plugins`)", ("task",))
    tasks = manager.tasks
    if task_name not in tasks:
        raise source.error(manager.unknown_task(task_name), ("task",))
    task_cls = tasks[task_name]
    model_cls: type[PipelineConfig] = task_cls.Config

    # plugin stages validate their own blocks
    extra: dict[str, Any] = {}
    stage_defs = manager.stages
    _extra_stage_names.clear()
    _extra_stage_names.update(stage_defs)
    body = dict(data)
    for name, sdef in stage_defs.items():
        if name in body and name not in model_cls.model_fields:
            block = body.pop(name)
            try:
                extra[name] = sdef.config.model_validate(block or {}) if sdef.config else block
            except ValidationError as e:
                raise validation_to_config_error(e, source, sdef.config, prefix=(name,)) from None
    for key in body:
        if key not in model_cls.model_fields:
            allowed = list(model_cls.model_fields) + list(stage_defs)
            raise source.error(f"unknown key{did_you_mean(key, allowed)} (allowed: {', '.join(allowed)})", (key,))
    try:
        cfg = model_cls.model_validate(body)
    except ValidationError as e:
        raise validation_to_config_error(e, source, model_cls) from None
    if cfg.predict is not None:  # the task's own options: names, types and ranges it declares
        p = cfg.predict
        try:
            p.options = task_cls.check_predict_options(p.options)
            if p.top_k is not None:
                task_cls.check_predict_options({"top_k": p.top_k})
        except ConfigError as e:
            where = ("predict", "top_k") if e.field == "top_k" and "top_k" not in p.options else \
                ("predict", "options", e.field)
            raise source.error(e.message, where) from None
    if cfg.name is None:
        cfg.name = Path(path).stem if path else task_name
    return LoadedConfig(cfg, data, source, extra)


def dump_yaml(data: Any) -> str:
    """YAML text for resolved configs (block style, key order kept)."""
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, allow_unicode=True)
