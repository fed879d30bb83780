"""`visionpipe predict` for char-RNN models: classify lines of text files, or generate text from prompts."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from visionpipe.errors import DataError, VisionpipeError
from visionpipe.infer.backends import Backend
from visionpipe.io import atomic_open, write_json, write_text
from visionpipe_plugins.charrnn.data import clean_line
from visionpipe_plugins.charrnn.sampling import generate
from visionpipe_plugins.charrnn.text import PAD, Vocab, read_lines

log = logging.getLogger(__name__)


def _text_files(source: str) -> tuple[list[Path], bool]:
    """The files to read and whether ``source`` was a folder."""
    p = Path(source)
    if p.is_dir():
        files = sorted(f for f in p.glob("*.txt") if f.is_file())
        if not files:
            raise DataError(f"{p}: no .txt files to classify")
        return files, True
    if not p.is_file():
        raise DataError(f"{p}: text file not found")
    return [p], False


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), size):
        yield items[i:i + size]


def classify_lines(backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Classify every non-blank line of a file (or of each .txt in a folder); write predictions.jsonl."""
    if source is None:
        raise VisionpipeError("charrnn_classify: predict needs a SOURCE: a text file with one sample per line, "
                              "or a folder of <label>.txt files")
    vocab = Vocab.from_info(metadata.get("vocab"))
    names: list[str] = metadata["class_names"]
    k = min(int(options.get("top_k") or 5), len(names))
    bs = int(options.get("batch_size") or 64)
    files, is_dir = _text_files(source)
    items, errors = [], []
    for f in files:
        try:
            lines = read_lines(f, what="text file")
        except DataError as e:
            if not is_dir:
                raise
            errors.append({"path": str(f), "error": str(e)})
            log.warning("skipped %s", e)
            continue
        truth = f.stem if is_dir and f.stem in names else None
        for n, line in lines:
            items.append((f, n, clean_line(line, metadata["max_length"], metadata["lowercase"]), truth))
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    records, correct, labelled, unknown = [], 0, 0, 0
    for batch in _batches(items, bs):
        ids = [vocab.encode(text) for _, _, text, _ in batch]
        lengths = np.array([len(x) for x in ids], dtype=np.int64)
        tokens = np.full((len(ids), int(lengths.max())), PAD, dtype=np.int64)
        for i, x in enumerate(ids):
            tokens[i, :len(x)] = x
        probs = backend.run({"tokens": tokens, "lengths": lengths})[1]
        for (f, n, text, truth), p in zip(batch, probs, strict=True):
            top = np.argsort(-p)[:k]
            rec = {"path": str(f), "line": n, "text": text, "label": names[top[0]],
                   "labels": [names[i] for i in top], "scores": [round(float(p[i]), 6) for i in top]}
            unk = vocab.unknown(text)
            if unk:
                rec["unknown_chars"] = "".join(unk)
                unknown += 1
            if truth is not None:
                rec["true"] = truth
                labelled += 1
                correct += rec["label"] == truth
            records.append(rec)
    seconds = time.perf_counter() - t0
    pred_file, err_file = out_dir / "predictions.jsonl", out_dir / "errors.jsonl"
    _write_jsonl(pred_file, records)
    _write_jsonl(err_file, errors)
    summary: dict[str, Any] = {"lines": len(records), "files": len(files), "errors": len(errors),
                               "lines_with_unknown_chars": unknown, "seconds": round(seconds, 3),
                               "predictions": str(pred_file), "errors_file": str(err_file),
                               "backend": getattr(backend, "name", "?")}
    if labelled:
        summary["accuracy"] = correct / labelled
        summary["labelled_lines"] = labelled
    write_json(out_dir / "summary.json", summary)
    log.info("classified %d line(s) from %d file(s)%s -> %s", len(records), len(files),
             f", accuracy {correct / labelled:.4f} against file names" if labelled else "", pred_file)
    return summary


def generate_texts(backend: Backend, metadata: dict[str, Any], source: str | None, out_dir: Path,
                   options: dict[str, Any]) -> dict[str, Any]:
    """Generate ``num`` continuations of ``--prompt`` (or of each line of SOURCE); write them as text and JSONL."""
    vocab = Vocab.from_info(metadata.get("vocab"))
    defaults = metadata.get("sampling", {})
    if options.get("prompt") is not None:
        prompts = [str(options["prompt"])]
    elif source is not None:
        prompts = [s for _, s in read_lines(source, what="prompt file", strip=False)]
    else:
        prompts = [defaults.get("prompt", "")]
    length = int(options.get("length", defaults.get("length", 200)))
    temperature = float(options.get("temperature", defaults.get("temperature", 0.8)))
    top_k = int(options["top_k"] if options.get("top_k") is not None else defaults.get("top_k", 0))
    num = int(options.get("num") or 1)
    seed = int(options.get("seed") or 0)
    if temperature < 0 or length < 0 or top_k < 0 or num < 1:
        raise VisionpipeError("predict options: temperature, length and top_k must be >= 0 and num >= 1")
    rng = np.random.default_rng(seed)

    def step(tokens: np.ndarray, state: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        logits, new_state = backend.run({"tokens": tokens, "state": state})
        return logits, new_state

    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    records = []
    for prompt in prompts:
        for i in range(num):
            cont = generate(step, vocab, tuple(metadata["state_shape"]), prompt, length, temperature, top_k, rng)
            records.append({"prompt": prompt, "sample": i, "text": prompt + cont, "generated": cont})
    seconds = time.perf_counter() - t0
    pred_file = out_dir / "predictions.jsonl"
    _write_jsonl(pred_file, records)
    write_text(out_dir / "generated.txt", "\n\n".join(r["text"] for r in records) + "\n")
    chars = sum(len(r["generated"]) for r in records)
    summary = {"samples": len(records), "chars": chars, "seconds": round(seconds, 3),
               "chars_per_second": round(chars / seconds, 1) if seconds > 0 else None, "seed": seed,
               "length": length, "temperature": temperature, "top_k": top_k, "predictions": str(pred_file),
               "text": str(out_dir / "generated.txt"), "backend": getattr(backend, "name", "?")}
    write_json(out_dir / "summary.json", summary)
    log.info("generated %d sample(s), %d characters (%.0f chars/s) -> %s", len(records), chars,
             summary["chars_per_second"] or 0, out_dir / "generated.txt")
    return summary


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    with atomic_open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
