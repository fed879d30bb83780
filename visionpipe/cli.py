"""The `visionpipe` command line (typer). Errors become one red line and a non-zero exit code."""

from __future__ import annotations

import json
import logging
import os
import sys
import traceback
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.table import Table

from visionpipe import __version__
from visionpipe.errors import ConfigError, UsageError, VisionpipeError

app = typer.Typer(
    name="visionpipe", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Declarative computer-vision pipelines: train, evaluate, export to ONNX and predict from one YAML file.",
)
err = Console(stderr=True)
out = Console()
_state = {"debug": False}

SetOpt = Annotated[list[str] | None, typer.Option(
    "--set", "-s", help="Override a config value: dotted.key=value (repeatable), e.g. --set train.epochs=3")]


def _setup_logging(debug: bool) -> None:
    rank = int(os.environ.get("RANK", 0))
    level = logging.DEBUG if debug else (logging.INFO if rank == 0 else logging.WARNING)
    logging.basicConfig(level=level, format="%(message)s", datefmt="[%X]", force=True,
                        handlers=[RichHandler(console=err, show_path=debug, rich_tracebacks=debug,
                                              markup=False)])
    for noisy in ("matplotlib", "PIL", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _print_version(value: bool) -> None:
    if value:
        out.print(f"visionpipe {__version__}")
        raise typer.Exit()


@app.callback()
def _main(debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks and debug logs.")] = False,
          version: Annotated[bool, typer.Option("--version", help="Print the version and exit.", is_eager=True,
                                                callback=_print_version)] = False) -> None:
    _state["debug"] = debug
    _setup_logging(debug)


@app.command()
def run(
    pipeline: Annotated[Path | None, typer.Argument(help="Pipeline YAML file.", show_default=False)] = None,
    set_: SetOpt = None,
    run_dir: Annotated[Path | None, typer.Option("--run-dir", help="Write the run here instead of <output>/<name>.")] = None,
    resume: Annotated[Path | None, typer.Option("--resume", help="Continue the run in this folder from its last checkpoint.")] = None,
) -> None:
    """Run a pipeline: load → augment → model → train → evaluate → export → predict."""
    from visionpipe.pipeline import RunAlreadyFinished, run_pipeline

    if pipeline is None and resume is None:
        raise UsageError("give a PIPELINE file, or --resume RUN_DIR")
    try:
        ctx = run_pipeline(str(pipeline) if pipeline else None, set_ or [],
                           run_dir=str(run_dir) if run_dir else None, resume=str(resume) if resume else None)
    except RunAlreadyFinished as e:
        err.print(f"[yellow]{escape(str(e))}[/]")
        return
    _print_summary(ctx)


def _print_summary(ctx) -> None:
    if int(os.environ.get("RANK", 0)) != 0:
        return
    table = Table(title=f"{ctx.cfg.task}: {ctx.run_dir}", show_header=True)
    table.add_column("metric")
    table.add_column("value", justify="right")
    for k, v in ctx.metrics.items():
        if isinstance(v, (int, float)) and v is not None:
            table.add_row(k, f"{v:.4f}" if isinstance(v, float) else str(v))
    out.print(table)
    for name, p in ctx.outputs.items():
        out.print(f"{name}: {p}")


@app.command()
def validate(
    pipeline: Annotated[Path, typer.Argument(help="Pipeline YAML file.")],
    set_: SetOpt = None,
) -> None:
    """Check a pipeline without running it and print the resolved config."""
    from visionpipe.config import dump_yaml, load_config

    loaded = load_config(str(pipeline), set_ or [])
    sys.stdout.write(dump_yaml(loaded.resolved_dict()))  # plain: a Console would wrap long lines into invalid YAML
    err.print(f"[green]ok[/]: {pipeline} (task {loaded.config.task}; stages: "
              f"{', '.join(loaded.config.stage_list(loaded.extra_stages))})")


@app.command()
def plugins(
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """List loaded plugins, their versions and what each registers; broken ones with their error (--debug: traceback).

    A plugin is a package with an entry point in the 'visionpipe' group naming a module of @visionpipe.hookimpl functions: the hooks are in visionpipe/hookspecs.py, the Task API (required methods: build_data, build_model, training_step, evaluate; export_spec and predictor for export and predict) in visionpipe/task.py. README: "Write your own task plugin".
    """  # the paragraph is one line: --help keeps a docstring's line breaks
    from visionpipe.manager import get_manager

    mgr = get_manager()
    rows = []
    tasks = mgr.tasks
    for info in mgr.infos:
        models = sorted({m for t in info.tasks if t in tasks for m in tasks[t].models})
        rows.append({"name": info.name, "distribution": info.distribution, "version": info.version,
                     "entry_point": info.entry_point, "tasks": info.tasks, "models": models,
                     "stages": info.stages, "error": info.error, "warnings": info.warnings})
    if as_json:
        out.print_json(json.dumps(rows))
        return
    table = Table(title="visionpipe plugins")
    for col in ("plugin", "version", "tasks", "models", "stages", "status"):
        table.add_column(col, overflow="fold")
    for r in rows:
        table.add_row(r["name"], f"{r['distribution'] or '?'} {r['version'] or ''}", ", ".join(r["tasks"]),
                      ", ".join(r["models"][:12]) + (" …" if len(r["models"]) > 12 else ""), ", ".join(r["stages"]),
                      f"[red]failed: {escape(r['error'])}[/]" if r["error"] else
                      f"[yellow]ok, but {escape('; '.join(r['warnings']))}[/]" if r["warnings"] else "[green]ok[/]")
    out.print(table)
    for info in mgr.infos:  # --debug: where in its code a plugin failed
        if _state["debug"] and info.error and info.detail:
            err.print(f"plugin {info.name}: {info.detail}", markup=False, highlight=False)


@app.command()
def export(
    source: Annotated[Path, typer.Argument(help="A run folder (uses checkpoints/best.pt) or a .pt checkpoint.")],
    format: Annotated[str, typer.Option("--format", help="Export format.")] = "onnx",
    opset: Annotated[int, typer.Option("--opset", min=11, max=23, help="ONNX opset (detection: up to 21).")] = 17,
    out_file: Annotated[Path | None, typer.Option("--out", help="Output file (default: <run>/model.onnx; "
                                                                   "next to a .pt that is not in a run's checkpoints/).")] = None,
    tolerance: Annotated[float, typer.Option("--tolerance", help="Max abs difference allowed in the parity check.")] = 1e-3,
    conv_to_matmul: Annotated[bool, typer.Option("--conv-to-matmul/--no-conv-to-matmul", help="Run convolutions on "
                                                 "maps so small that every output sees every input (e.g. a ResNet's "
                                                 "last stage at 64x64) as one matrix product: faster in onnxruntime, "
                                                 "same outputs, larger file.")] = True,
    quantize: Annotated[str | None, typer.Option("--quantize", help="Also write an int8 model (<out>.int8.onnx) "
                                                    "and compare its accuracy with fp32 on the validation set.")] = None,
    calibration: Annotated[str, typer.Option("--calibration", help="int8: 'static' (activation ranges calibrated on "
                                             "training images; for CNNs) or 'dynamic' (no data; MatMul/Gemm/LSTM layers, including "
                                             "convolutions exported as matrix products).")] = "static",
    calibration_data: Annotated[str | None, typer.Option("--calibration-data", help="int8 static: images to calibrate "
                                                            "on (folder, glob or .txt list); default: the training split.")] = None,
    calibration_images: Annotated[int, typer.Option("--calibration-images", min=1, help="int8 static: how many images.")] = 256,
) -> None:
    """Export a trained model to ONNX, checked for numerical parity against PyTorch (optionally also int8)."""
    from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
    from visionpipe.export.onnx import export_onnx

    if format != "onnx":
        raise UsageError(f"--format {format}: only 'onnx' is supported")
    if quantize not in (None, "int8"):
        raise UsageError(f"--quantize {quantize}: only 'int8' is supported")
    if calibration not in ("static", "dynamic"):
        raise UsageError(f"--calibration {calibration}: use static or dynamic")
    if source.suffix.lower() == ".onnx" and not source.is_dir():
        raise UsageError(f"{source}: already an exported ONNX model; export takes the run folder or its .pt "
                         "checkpoint (e.g. visionpipe export RUN_DIR --quantize int8)")
    ckpt = source / "checkpoints" / "best.pt" if source.is_dir() else source
    task, model, state = task_and_model_from_checkpoint(ckpt)
    if quantize and calibration == "static" and not type(task).image_predict:  # before writing anything
        raise UsageError(f"--quantize int8: task {task.name} has no image inputs to calibrate on; "
                         "add --calibration dynamic")
    data = None
    try:  # real inputs for the parity check, when the data is still where the config says
        data = task.build_data()
        if hasattr(task, "augment"):
            task.augment(data)
    except VisionpipeError as e:
        logging.getLogger(__name__).warning("training data not available (%s); parity uses synthetic inputs", e)
    spec = task.export_spec(model, data, state.get("info", {}), 4)
    run_dir = source if source.is_dir() else ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    target = out_file or run_dir / "model.onnx"
    report = export_onnx(spec, target, opset=opset, tolerance=tolerance, conv_to_matmul=conv_to_matmul)
    out.print(f"exported {target} (parity max abs diff {report['max_abs_diff']:.2e})", soft_wrap=True)
    if quantize:
        from visionpipe.export.quantize import export_int8

        q = export_int8(task, data, target, calibration, calibration_data, calibration_images)
        out.print(f"quantized {q['file']} (int8 {q['mode']}, {q['calibration_images']} calibration images): "
                  f"{q['summary']}", soft_wrap=True)


@app.command()
def predict(
    model: Annotated[Path, typer.Argument(help="An exported .onnx model, a .pt checkpoint, or a run folder.")],
    source: Annotated[str | None, typer.Argument(help="Image file, folder (recursive), glob or .txt list.")] = None,
    out_dir: Annotated[Path, typer.Option("--out", help="Output folder.")] = Path("predictions"),
    batch_size: Annotated[int, typer.Option("--batch-size", "-b", min=1)] = 16,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda or auto.")] = "auto",
    backend_name: Annotated[str, typer.Option("--backend", help="auto (from the model file), onnxruntime or torch; "
                                              "with a run folder picks model.onnx or checkpoints/best.pt.")] = "auto",
    top_k: Annotated[int | None, typer.Option("--top-k", min=0, help="Classes per record (classification, default 5); "
                                              "charrnn_generate: sample among the k likeliest (0 = all; default: "
                                              "the model's).", show_default=False)] = None,
    save_images: Annotated[bool, typer.Option("--save-images", help="Also write images with predictions drawn.")] = False,
    shard: Annotated[str | None, typer.Option("--shard", help="I/N: process every N-th input from I (default: from torchrun's RANK/WORLD_SIZE).")] = None,
    workers: Annotated[int | None, typer.Option("--workers", min=0, help="Decoder threads/processes (default: cores, or cores/4 for a model on the CPU; 0 = decode in the main thread).")] = None,
    decode: Annotated[str, typer.Option("--decode", help="Decode in 'threads' or 'processes'.")] = "threads",
    streams: Annotated[int | None, typer.Option("--streams", min=1, help="Batches the model runs at once (default: cores for onnxruntime on the CPU, 1 for torch on the CPU, 2 on a GPU).")] = None,
    threads: Annotated[int | None, typer.Option("--threads", min=1, help="Model threads per stream (onnxruntime intra-op / torch); default: cores / streams.")] = None,
    pin: Annotated[bool | None, typer.Option("--pin/--no-pin", help="Pin each model stream to its own core (default: when onnxruntime runs one single-threaded stream per core on the CPU).", show_default=False)] = None,
    graph_opt: Annotated[str | None, typer.Option("--graph-optimization", help="onnxruntime graph optimization: disable, basic, extended, all (default).", show_default=False)] = None,
    spinning: Annotated[bool, typer.Option("--spinning/--no-spinning", help="Let onnxruntime threads busy-wait (faster only when nothing else needs the cores).")] = False,
    amp: Annotated[bool, typer.Option("--amp", help="torch backend: autocast (fp16 on CUDA, bf16 on CPU).")] = False,
    num: Annotated[int | None, typer.Option("--num", min=1, help="Generative tasks: how many samples.")] = None,
    seed: Annotated[int | None, typer.Option("--seed", min=0, help="Generative tasks: random seed (default 0).",
                                             show_default=False)] = None,
    prompt: Annotated[str | None, typer.Option("--prompt", help="Text generation: the prompt.")] = None,
    option: Annotated[list[str] | None, typer.Option("--option", "-o", help="Task option key=value (repeatable); "
                                                    "a name the model's task does not take is an error.")] = None,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Predict every input again: first delete the "
                                            "predictions, errors, summary and fingerprint (of this shard) in --out. "
                                            "Needed when --out holds predictions of another model or other options.")] = False,
) -> None:
    """Run a model over files in streaming batches; writes predictions.jsonl, errors.jsonl and summary.json.

    Re-running with the same --out resumes (inputs already written are skipped) when the model and
    the options that change the records are the same; otherwise it refuses (use another --out, or
    --overwrite). For many processes or machines give each --shard I/N (or launch with torchrun),
    then `visionpipe merge`.
    """
    import yaml

    from visionpipe.infer.backends import open_backend
    from visionpipe.infer.runner import run_predict
    from visionpipe.manager import get_manager

    if device not in ("cpu", "cuda", "auto"):
        raise UsageError(f"--device {device}: use cpu, cuda or auto")
    given = {}
    for item in option or []:
        if "=" not in item:
            raise ConfigError(f"expects key=value (got '{item}')", file="--option")
        k, v = item.split("=", 1)
        try:
            given[k] = yaml.safe_load(v)
        except yaml.YAMLError:
            given[k] = v
    backend, metadata = open_backend(str(model), device=device, backend=backend_name, threads=threads,
                                     streams=streams,
                                     graph_optimization=graph_opt, spinning=spinning, amp=amp)
    task_cls = get_manager().task(metadata.get("task", "?"))
    try:  # before any input is read
        given = task_cls.check_predict_options(given)
    except ConfigError as e:
        raise ConfigError(e.message, file="--option", field=e.field) from None
    flags = {"top_k": top_k, "num": num, "seed": seed, "prompt": prompt}  # task options with flags of their own
    for name, value in flags.items():
        if value is not None:
            try:
                given[name] = task_cls.check_predict_options({name: value})[name]
            except ConfigError as e:
                raise UsageError(f"--{name.replace('_', '-')}: {e.message}") from None
    opts = {"batch_size": batch_size, "save_images": save_images, "shard": shard,
            "workers": workers, "decode": decode, "pin": pin, **given}
    summary = run_predict(task_cls, backend, metadata, source, out_dir, opts,
                          on_change="overwrite" if overwrite else "refuse")
    out.print_json(json.dumps(summary, default=str))


@app.command()
def merge(
    folder: Annotated[Path, typer.Argument(help="Folder with predictions.shard*.jsonl from `predict --shard`.")],
    out_dir: Annotated[Path | None, typer.Option("--out", help="Where to write the merged files.")] = None,
    partial: Annotated[bool, typer.Option("--partial", help="Merge even when some shards have no output yet.")] = False,
) -> None:
    """Merge the outputs of sharded predict runs into one predictions.jsonl / errors.jsonl, in input order.

    Files a task builds from all predictions (detection: COCO results and metrics) are written from the merged ones.
    """
    from visionpipe.infer.runner import merge_predictions

    out.print_json(json.dumps(merge_predictions(folder, out_dir, partial=partial)))


def _register_plugin_commands() -> None:
    from visionpipe.manager import get_manager

    get_manager().register_commands(app)  # a plugin whose hook fails is reported, the others still register


INTERRUPTED = ("[red]interrupted[/]: what was written so far is complete; run the same command again "
               "(a pipeline: visionpipe run --resume RUN_DIR) to continue")


def main() -> None:
    """Console-script entry point."""
    debug = "--debug" in sys.argv
    try:
        _register_plugin_commands()
        code = app(standalone_mode=False)  # returns the code of a typer.Exit; Ctrl-C inside a command is Exit(130)
    except SystemExit:
        raise
    except typer.Exit as e:
        code = e.exit_code
    except typer.Abort:
        err.print("[red]aborted[/]")
        sys.exit(130)
    except KeyboardInterrupt:  # Ctrl-C outside a command (start-up: loading plugins)
        code = 130
    except (ConfigError, UsageError) as e:
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except VisionpipeError as e:
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except Exception as e:  # click usage errors and anything unexpected
        if hasattr(e, "show") and hasattr(e, "exit_code"):  # click's usage errors (typer vendors click)
            e.show()
            sys.exit(e.exit_code)
        if debug:
            traceback.print_exc()
        err.print(f"[red]error:[/] {escape(type(e).__name__ + ': ' + str(e))} (run with --debug for the traceback)",
                  highlight=False, soft_wrap=True)
        sys.exit(1)
    if code == 130:
        err.print(INTERRUPTED)
    if isinstance(code, int) and code:
        sys.exit(code)
