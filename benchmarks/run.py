"""visionpipe benchmark suite: ratios, each measured side by side in one run.

    python benchmarks/run.py            # the five CPU figures, one line per figure
    python benchmarks/run.py --check    # exit 1 when a goal is missed
    python benchmarks/run.py --quick    # CI smoke version: small counts, no goal checks
    python benchmarks/run.py --gpu      # the four GPU training figures (6-9); skipped without CUDA
    python benchmarks/run.py --gpu-smoke  # figures 6-9 at toy sizes on any device: the code runs, no goals

Every figure compares two things on the same model, images and settings, timed in
alternation (A, B, B, A, ...) so that load from other processes hits both alike; the figure is
the median of the per-repetition ratios (25 repetitions for figures 1-2, 11 for the others). See docs/benchmarks.md for the method and results.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
os.environ.setdefault("VISIONPIPE_PROGRESS", "0")

import gpu  # noqa: E402
import measure  # noqa: E402
from setup_bench import (  # noqa: E402
    GENERATED_SIZE,
    IMAGE_FORMATS,
    Bench,
    at_input_size,
    image_folder,
    machine,
    prepare,
    preprocessed,
)

from visionpipe.infer.backends import split_cores  # noqa: E402

log = logging.getLogger("bench")

# Repetitions per side. Figures 1-2 get more: on a shared VM one 1,000-image repetition of either
# side varies by ~10% (the noise decorrelates within ~1 s, so pairing cancels little of it), which
# gives the median of 11 paired ratios a standard error of ~0.04; 25 bring it to ~0.025.
REPS, PREDICT_REPS = 11, 25


@dataclass
class Figure:
    """One line of the report."""

    number: int
    title: str
    ratio: float
    goal: str
    met: bool
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def line(self, check_goals: bool) -> str:
        """``N. title  ratio  (goal ...)  ok|MISSED  [detail]``."""
        verdict = ("ok" if self.met else "MISSED") if check_goals else "smoke"
        return f"{self.number}. {self.title:<46} {self.ratio:6.2f}  (goal {self.goal:<7}) {verdict:<6}  {self.detail}"


def predict_session() -> dict[str, Any]:
    """The model-runner settings `visionpipe predict` picks on this machine (streams x threads, no spinning)."""
    streams, threads = split_cores(None, None, False)
    return {"streams": streams, "threads": threads, "spinning": False}


def alternate(reps: int, **runs: Any) -> dict[str, list[float]]:
    """Call each zero-argument function ``reps`` times, alternating the order every repetition."""
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(reps):
        for n in (names if r % 2 == 0 else names[::-1]):
            out[n].append(runs[n]())
            log.info("  %s rep %d: %s", n, r + 1, out[n][-1])
    return out


def paired(num: list[float], den: list[float]) -> tuple[float, float, float]:
    """(median, min, max) of the per-repetition ratios num[i] / den[i].

    The two sides of repetition i ran back to back, so a slow or fast spell of the machine
    falls on both; the median of these paired ratios is the figure (robust to one lucky or
    unlucky repetition on either side, unlike a ratio of two separate best-ofs).
    """
    import statistics

    ratios = [a / b for a, b in zip(num, den, strict=True)]
    return statistics.median(ratios), min(ratios), max(ratios)


def spread(lo: float, hi: float, n: int) -> str:
    return f"median of {n} paired ratios, range {lo:.2f}-{hi:.2f}"


def ceiling(b: Bench, folder: Path, x: np.ndarray, bs: int, reps: int = 3) -> dict[str, float]:
    """What predict can reach on this machine: the raw loop's CPU per image vs that plus predict's host work.

    On cores the model keeps busy, predict ÷ raw cannot exceed model / (model + host), both in
    process CPU per image (medians of ``reps`` alternated measurements).
    """
    import statistics

    out = b.root / "out-host"
    res = alternate(reps, host=lambda: measure.predict_host_cpu_ms(b.onnx, folder, out, bs),
                    model=lambda: measure.raw_onnxruntime_timed(b.onnx, x, bs, **predict_session())[1])
    model, host = statistics.median(res["model"]), statistics.median(res["host"])
    return {"model_cpu_ms": model, "host_cpu_ms": host, "ceiling": model / (model + host)}


def fig_predict_vs_raw(b: Bench, folder: Path, x: np.ndarray, bs: int, reps: int) -> Figure:
    out = b.root / "out-predict"
    res = alternate(
        reps,
        predict=lambda: measure.visionpipe_predict(b.onnx, folder, out, bs)["images_per_second"],
        raw_ort_defaults=lambda: measure.raw_onnxruntime(b.onnx, x, bs),
        raw_predict_options=lambda: measure.raw_onnxruntime(b.onnx, x, bs, **predict_session()),
    )
    limits = [max(a, b) for a, b in zip(res["raw_ort_defaults"], res["raw_predict_options"], strict=True)]
    ratio, lo, hi = paired(res["predict"], limits)  # each repetition's limit: the faster raw loop
    cap = ceiling(b, folder, x, bs, reps=min(5, reps))
    return Figure(1, "predict ÷ raw onnxruntime loop (the limit)", ratio, ">= 0.90", ratio >= 0.90,
                  f"{spread(lo, hi, reps)}; best predict {max(res['predict']):.0f} img/s vs best raw "
                  f"{max(limits):.0f} img/s ({len(x)} images, batch {bs}); CPU per image: model "
                  f"{cap['model_cpu_ms']:.3f} ms, predict's host work {cap['host_cpu_ms']:.3f} ms -> ceiling "
                  f"{cap['ceiling']:.2f}",
                  {"runs": res, "images": len(x), "batch_size": bs, "paired_range": [lo, hi], "ceiling": cap})


def fig_predict_vs_torch(b: Bench, folder: Path, x: np.ndarray, bs: int, reps: int) -> Figure:
    out = b.root / "out-predict"
    res = alternate(
        reps,
        predict=lambda: measure.visionpipe_predict(b.onnx, folder, out, bs)["images_per_second"],
        torch_eager=lambda: measure.torch_tutorial(b, folder, bs),
        raw_ort=lambda: measure.raw_onnxruntime(b.onnx, x, bs, **predict_session()),
    )
    ratio, lo, hi = paired(res["predict"], res["torch_eager"])
    bound = paired(res["raw_ort"], res["torch_eager"])[0]
    return Figure(2, "predict (onnxruntime) ÷ PyTorch eager tutorial loop", ratio, ">= 1.5", ratio >= 1.5,
                  f"{spread(lo, hi, reps)}; best predict {max(res['predict']):.0f} img/s vs best eager "
                  f"{max(res['torch_eager']):.0f} img/s; raw onnxruntime loop ÷ eager {bound:.2f} (the bound "
                  f"for any predict)",
                  {"runs": res, "batch_size": bs, "paired_range": [lo, hi], "raw_over_eager": bound})


def fig_int8(b: Bench, x: np.ndarray, bs: int, reps: int) -> Figure:
    opts = predict_session()  # predict's session settings, for both
    res = alternate(reps, int8=lambda: measure.raw_onnxruntime(b.int8, x, bs, **opts),
                    fp32=lambda: measure.raw_onnxruntime(b.onnx, x, bs, **opts))
    ratio, lo, hi = paired(res["int8"], res["fp32"])
    acc = b.quant_report.get("accuracy", {})
    drop = acc.get("top1_drop_points", float("nan"))
    met = ratio >= 1.5 and drop <= 1.0
    return Figure(3, "int8 ÷ fp32 onnxruntime throughput", ratio, ">= 1.5", met,
                  f"top-1 {acc.get('top1_fp32', float('nan')):.4f} -> {acc.get('top1_int8', float('nan')):.4f}, "
                  f"drop {drop:.2f} points (goal <= 1) on {acc.get('images', 0)} val+test images; "
                  f"{spread(lo, hi, reps)}; best {max(res['int8']):.0f} vs {max(res['fp32']):.0f} img/s",
                  {"runs": res, "accuracy": acc, "quantization": {k: v for k, v in b.quant_report.items()
                                                                  if k != "accuracy"}})


def fig_training(b: Bench, steps: int, bs: int, reps: int) -> Figure:
    res = alternate(reps, trainer=lambda: measure.trainer_steps_per_second(b, steps, bs, 0),
                    textbook=lambda: measure.textbook_steps_per_second(b, steps, bs, 0))
    wall = {k: [w for w, _ in v] for k, v in res.items()}
    cpu = {k: [c for _, c in v] for k, v in res.items()}
    ratio, lo, hi = paired(wall["trainer"], wall["textbook"])
    cpu_ratio = paired(cpu["trainer"], cpu["textbook"])[0]
    return Figure(4, "Trainer steps/s ÷ hand-written PyTorch loop", ratio, ">= 0.97", ratio >= 0.97,
                  f"{spread(lo, hi, reps)}; best {max(wall['trainer']):.2f} vs {max(wall['textbook']):.2f} steps/s "
                  f"({steps} steps of {bs}); per CPU-second {cpu_ratio:.2f}",
                  {"wall_steps_per_s": wall, "cpu_steps_per_s": cpu, "cpu_ratio": cpu_ratio, "steps": steps,
                   "batch_size": bs})


def fig_memory(b: Bench, small: int, large: int, bs: int) -> Figure:
    rss = {}
    for n in (small, large):
        folder = image_folder(b, "mem", n)
        out = b.root / f"out-mem-{n}"
        import shutil

        shutil.rmtree(out, ignore_errors=True)
        rss[n] = measure.peak_rss_mb(["predict", str(b.onnx), str(folder), "--out", str(out), "-b", str(bs)], b.root,
                                     out / "predictions.jsonl")
        with open(out / "predictions.jsonl") as f:
            lines = sum(1 for _ in f)
        assert lines == n, f"predict wrote {lines} predictions for {n} images"
        log.info("  over %d images: %s", n, rss[n])
    ratio = rss[large]["peak_rss_mb"] / rss[small]["peak_rss_mb"]
    return Figure(5, f"peak RSS of predict: {large:,} ÷ {small:,} images", ratio, "<= 1.2", ratio <= 1.2,
                  f"{rss[large]['peak_rss_mb']:.0f} MB vs {rss[small]['peak_rss_mb']:.0f} MB; while streaming "
                  f"{large:,} images RSS went {rss[large]['rss_first_batch_mb'] or 0:.0f} -> "
                  f"{rss[large]['rss_at_end_mb'] or 0:.0f} MB (first batch -> last)",
                  {"rss": rss})


GPU_FIGURES = (6, 7, 8, 9)


def fig_gpu_classification(root: Path, sz: gpu.Sizes, reps: int, compiled: bool) -> Figure:
    mode = "compiled" if compiled else "eager"
    res = alternate(reps, visionpipe=lambda: gpu.visionpipe_classification(root, sz, compiled),
                    hand=lambda: gpu.hand_classification(sz, compiled))
    ratio = paired(res["visionpipe"], res["hand"])[0]
    return Figure(7 if compiled else 6, f"{sz.classifier} Trainer ÷ hand bf16+CL loop, {mode}", ratio, ">= 0.95",
                  ratio >= 0.95, f"{max(res['visionpipe']):.0f} vs {max(res['hand']):.0f} img/s (batch {sz.batch}, "
                  f"{sz.image}px, synthetic data on the device)", {"runs": res, "sizes": sz.__dict__})


def fig_gpu_jpeg(root: Path, sz: gpu.Sizes, reps: int) -> Figure:
    folder = gpu.jpeg_folder(root, sz)
    res = alternate(reps, jpeg=lambda: gpu.visionpipe_jpeg(root, sz, folder),
                    synthetic=lambda: gpu.visionpipe_classification(root, sz, False))
    ratio = paired(res["jpeg"], res["synthetic"])[0]
    return Figure(8, f"{sz.classifier} from JPEG files ÷ synthetic (visionpipe)", ratio, ">= 0.8", ratio >= 0.8,
                  f"{max(res['jpeg']):.0f} vs {max(res['synthetic']):.0f} img/s; decode: device, "
                  f"{sz.jpeg_size[0]}x{sz.jpeg_size[1]} JPEGs, {sz.workers} workers",
                  {"runs": res, "sizes": sz.__dict__})


def fig_gpu_detection(root: Path, sz: gpu.Sizes, reps: int) -> Figure:
    ours, ref = gpu.same_detector_size(sz)
    assert ours == ref, f"visionpipe's {sz.detector} has {ours} parameters, torchvision's {ref}"
    res = alternate(reps, visionpipe=lambda: gpu.visionpipe_detection(root, sz), hand=lambda: gpu.hand_detection(sz))
    ratio = paired(res["visionpipe"], res["hand"])[0]
    return Figure(9, f"{sz.detector} Trainer ÷ hand bf16 loop", ratio, ">= 0.95", ratio >= 0.95,
                  f"{max(res['visionpipe']):.1f} vs {max(res['hand']):.1f} img/s (batch {sz.det_batch}, "
                  f"{sz.det_image}px, {ours:,} parameters)", {"runs": res, "sizes": sz.__dict__})


def gpu_device(smoke: bool) -> tuple[str | None, str]:
    """(device for the GPU figures or None to skip them, a description)."""
    import torch

    if torch.cuda.is_available():
        return "cuda", f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    if smoke:
        return "cpu", f"CPU (no CUDA device): smoke run only, NOT GPU figures; torch {torch.__version__}"
    return None, "no CUDA device (torch.cuda.is_available() is False)"


def main(argv: list[str] | None = None) -> int:
    """Run the suite; return the exit code."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--check", action="store_true", help="exit 1 when a goal is missed")
    ap.add_argument("--quick", action="store_true", help="smoke version for CI: small counts, goals not checked")
    ap.add_argument("--gpu", action="store_true", help="run the GPU training figures 6-9 (skipped without CUDA)")
    ap.add_argument("--gpu-smoke", action="store_true",
                    help="figures 6-9 at toy sizes (ResNet-18 32px, MobileNet Faster R-CNN 160px) on CUDA or CPU: "
                         "proves the code paths, goals not checked")
    ap.add_argument("--only", default=None, help="figures to run, e.g. 1,3 (default 1-5; 6-9 with --gpu)")
    ap.add_argument("--image-format", choices=IMAGE_FORMATS, default="png",
                    help="files figures 1-2 read: the generated PNGs (default) or JPEG copies of them")
    ap.add_argument("--input-size", type=int, default=None, metavar="PX",
                    help=f"figures 1-2 at PX x PX: the model re-exported at that input size and the pictures "
                         f"resized to it (default: the model's own {GENERATED_SIZE})")
    ap.add_argument("--images", type=int, default=None, metavar="N",
                    help="images per repetition of figures 1-3 (default 1000; quick 128); e.g. 320 at --input-size 224")
    ap.add_argument("--reps", type=int, default=None,
                    help=f"repetitions per side (default {PREDICT_REPS} for figures 1-2, {REPS} for the others; quick 1)")
    ap.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "visionpipe-bench",
                    help="data, model and image folders (reused between runs)")
    ap.add_argument("--fresh", action="store_true", help="retrain and re-quantize instead of reusing the workdir")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("-v", "--verbose", action="store_true")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING, format="%(message)s")
    log.setLevel(logging.INFO)
    default = "6,7,8,9" if (args.gpu or args.gpu_smoke) else "1,2,3,4,5"
    only = {int(x) for x in (args.only or default).split(",") if x.strip()}
    reps = args.reps or (1 if args.quick or args.gpu_smoke else REPS)
    predict_reps = args.reps or (1 if args.quick else PREDICT_REPS)
    bs = 32
    n_images = args.images or (128 if args.quick else 1000)
    if n_images < bs or (args.input_size is not None and args.input_size < 32):
        ap.error(f"--images needs at least {bs} (one batch) and --input-size at least 32")
    steps = 3 if args.quick else 20
    small, large = (100, 1000) if args.quick else (1000, 10000)

    info = machine()
    t0 = time.perf_counter()
    figures: list[Figure] = []
    judged: list[Figure] = []
    b = None
    if only - set(GPU_FIGURES):
        b = prepare(args.workdir, args.quick, args.fresh)
        log.info("setup: %.0f s (model test top-1 %s)", b.setup_seconds, b.test_top1)
        b12 = at_input_size(b, args.input_size) if only & {1, 2} else b  # figures 1-2 at --input-size
        size = b12.metadata["input_size"]
        print(f"visionpipe benchmarks{' (quick smoke run: goals not checked)' if args.quick else ''}: "
              f"{b.metadata['model']} {size[0]}x{size[1]}{' (figures 1-2)' if b12 is not b else ''}, "
              f"{len(b.metadata['class_names'])} classes, {args.image_format.upper()} files; {info['cores']} cores of {info['cpu']}; "
              f"onnxruntime {info['onnxruntime']}, torch {info['torch']}; "
              f"load avg {info['load_avg_1min_at_start']:.1f}", flush=True)
        # figures 1-3 share the image folder and its decoded, preprocessed images (made once per
        # model input size, when the first figure that needs them runs)
        inputs: dict[Path, tuple[Path, np.ndarray]] = {}

        def images(bench: Bench) -> tuple[Path, np.ndarray]:
            if bench.onnx not in inputs:
                folder = image_folder(bench, "predict", n_images, args.image_format)
                inputs[bench.onnx] = folder, preprocessed(bench, folder)
            return inputs[bench.onnx]

        runners = {1: lambda: fig_predict_vs_raw(b12, *images(b12), bs, predict_reps),
                   2: lambda: fig_predict_vs_torch(b12, *images(b12), bs, predict_reps),
                   3: lambda: fig_int8(b, images(b)[1], bs, reps),
                   4: lambda: fig_training(b, steps, bs, reps),
                   5: lambda: fig_memory(b, small, large, bs)}
        for k in sorted(only - set(GPU_FIGURES)):
            log.info("figure %d ...", k)
            f = runners[k]()
            figures.append(f)
            judged += [f] if not args.quick else []
            print(f.line(not args.quick), flush=True)
    gpu_figs = sorted(only & set(GPU_FIGURES))
    if gpu_figs:
        device, about = gpu_device(args.gpu_smoke)
        info["gpu"] = about
        if device is None:
            for k in gpu_figs:
                print(f"{k}. skipped: {about}; GPU figures need an NVIDIA GPU (see docs/benchmarks.md)", flush=True)
        else:
            sz = gpu.Sizes.smoke(device) if args.gpu_smoke else gpu.Sizes(device=device)
            root = args.workdir.resolve()
            print(f"GPU training figures{' (smoke run at toy sizes: goals not checked)' if args.gpu_smoke else ''}: "
                  f"{about}", flush=True)
            runners_gpu = {6: lambda: fig_gpu_classification(root, sz, reps, False),
                           7: lambda: fig_gpu_classification(root, sz, reps, True),
                           8: lambda: fig_gpu_jpeg(root, sz, reps), 9: lambda: fig_gpu_detection(root, sz, reps)}
            for k in gpu_figs:
                log.info("figure %d ...", k)
                f = runners_gpu[k]()
                figures.append(f)
                judged += [f] if not args.gpu_smoke else []
                print(f.line(not args.gpu_smoke), flush=True)
    missed = [f for f in judged if not f.met]
    total = time.perf_counter() - t0
    print(f"{len(judged) - len(missed)}/{len(judged)} goals met; {total:.0f} s in all")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"machine": info, "quick": args.quick, "gpu_smoke": args.gpu_smoke,
                                         "reps": reps, "predict_reps": predict_reps, "image_format": args.image_format,
                                         "input_size_figures_1_2": args.input_size or GENERATED_SIZE,
                                         "images": n_images, "seconds": round(total, 1),
                                         "model_test_top1": b.test_top1 if b else None,
                                         "figures": [f.__dict__ for f in figures]}, indent=2, default=str))
    return 1 if (args.check and missed) else 0


if __name__ == "__main__":
    sys.exit(main())
