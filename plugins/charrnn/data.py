"""Text datasets: labelled lines (classify) and chunks of one long text (language model).

Both yield variable-length sequences; :func:`collate` pads them and returns their lengths,
so the models can run them as packed sequences.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from visionpipe.errors import DataError
from visionpipe.paths import resolve_under
from visionpipe_plugins.charrnn.config import ClassifyLoadConfig, GenerateLoadConfig
from visionpipe_plugins.charrnn.corpus import generate_names, generate_text
from visionpipe_plugins.charrnn.text import PAD, Vocab, read_lines, read_text

log = logging.getLogger(__name__)
Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


def collate(items: list[tuple[torch.Tensor, Any]]) -> Batch:
    """(tokens [B, T] padded with 0, lengths [B], targets): targets are labels [B] or padded [B, T]."""
    seqs = [x for x, _ in items]
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.long)
    tokens = torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=PAD)
    targets = [y for _, y in items]
    if isinstance(targets[0], torch.Tensor):
        target = torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=PAD)
    else:
        target = torch.tensor(targets, dtype=torch.long)
    return tokens, lengths, target


# ----------------------------------------------------------------------------- classify


class LineDataset(Dataset):
    """(encoded line, class index) pairs."""

    def __init__(self, samples: list[tuple[str, int]], vocab: Vocab, class_names: list[str]) -> None:
        self.samples = samples
        self.class_names = class_names
        self.encoded = [torch.tensor(vocab.encode(s), dtype=torch.long) for s, _ in samples]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.encoded[i], self.samples[i][1]


def clean_line(line: str, max_length: int, lowercase: bool) -> str:
    """The form a line is classified in (train and predict alike)."""
    line = line.strip()
    return (line.lower() if lowercase else line)[:max_length]


def read_label_files(root: Path, classes: list[str] | None, cfg: ClassifyLoadConfig) -> dict[str, list[str]]:
    """Class name → its cleaned lines, from root/<class>.txt."""
    files = {p.stem: p for p in sorted(root.glob("*.txt")) if p.is_file()}
    if not files:
        raise DataError(f"{root}: no <label>.txt files (expected one text file per class, one sample per line)")
    names = list(classes) if classes else sorted(files)
    missing = [c for c in names if c not in files]
    if missing:
        raise DataError(f"load.classes: no file {root / (missing[0] + '.txt')} for class '{missing[0]}'")
    if len(names) < 2:
        raise DataError(f"{root}: found only {len(names)} class file(s); classification needs at least 2 <label>.txt")
    out: dict[str, list[str]] = {}
    for c in names:
        lines = [clean_line(s, cfg.max_length, cfg.lowercase) for _, s in read_lines(files[c], what="class file")]
        if cfg.dedupe:
            before = len(lines)
            lines = list(dict.fromkeys(lines))
            if len(lines) < before:
                log.info("%s: dropped %d repeated line(s)", files[c], before - len(lines))
        out[c] = lines
    return out


def split_lines(lines: list[str], val: float, test: float, rng: np.random.Generator,
                what: str = "lines") -> dict[str, list[str]]:
    """Shuffle ``lines`` and cut off val/test fractions (at least one line each when asked)."""
    order = rng.permutation(len(lines))
    n_val = max(1, round(len(lines) * val)) if val > 0 else 0
    n_test = max(1, round(len(lines) * test)) if test > 0 else 0
    if n_val + n_test >= len(lines):
        raise DataError(f"{what}: only {len(lines)} line(s), too few to hold out {n_val} for val and {n_test} for test")
    picked = [lines[i] for i in order]
    return {"val": picked[:n_val], "test": picked[n_val:n_val + n_test], "train": picked[n_val + n_test:]}


def load_classify(cfg: ClassifyLoadConfig, seed: int) -> tuple[dict[str, LineDataset], dict[str, Any], list[Path]]:
    """Datasets per split, info (vocab, class names, preprocessing) and the files read."""
    root = Path(cfg.root).expanduser().resolve()
    if cfg.generate is not None and not root.exists():
        generate_names(root, cfg.generate.per_class, cfg.generate.unseen_per_class, cfg.generate.seed)
    if not root.is_dir():
        raise DataError(f"load.root: {root} is not a folder")
    by_class = read_label_files(root, cfg.classes, cfg)
    classes = list(by_class)
    rng = np.random.default_rng(seed)
    splits: dict[str, list[tuple[str, int]]] = {"train": [], "val": [], "test": []}
    for ci, c in enumerate(classes):
        for split, lines in split_lines(by_class[c], cfg.val_fraction, cfg.test_fraction, rng,
                                        what=str(root / f"{c}.txt")).items():
            splits[split] += [(s, ci) for s in lines]
    vocab = Vocab.build((s for s, _ in splits["train"]), cfg.min_count)
    info = {"vocab": vocab.to_info(), "class_names": classes, "max_length": cfg.max_length,
            "lowercase": cfg.lowercase}
    data = {k: LineDataset(v, vocab, classes) for k, v in splits.items() if v}
    return data, info, [root / f"{c}.txt" for c in classes]


# ----------------------------------------------------------------------------- language model


class ChunkDataset(Dataset):
    """(input, target) character chunks of one text; target is the input shifted by one.

    For training, ``set_epoch`` moves the chunk boundaries by an offset that depends only on
    (seed, epoch), so each epoch sees different contexts and the first chunk is shorter.
    """

    def __init__(self, ids: torch.Tensor, seq_len: int, shift: bool = False) -> None:
        if len(ids) < 2:
            raise DataError("text too short: a language model needs at least 2 characters")
        self.ids, self.seq_len, self.shift = ids, seq_len, shift
        self.offset = 0
        self._bounds()

    def set_epoch(self, epoch: int, seed: int) -> None:
        """Pick this epoch's chunk boundaries."""
        if self.shift:
            ss = np.random.SeedSequence([seed, epoch, 7919])
            self.offset = int(np.random.default_rng(ss).integers(self.seq_len))
            self._bounds()

    def _bounds(self) -> None:
        n, L = len(self.ids) - 1, self.seq_len  # n targets in all
        starts = ([0] if self.offset else []) + list(range(self.offset, n, L))
        self.starts = starts
        self.ends = starts[1:] + [n]

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s, e = self.starts[i], self.ends[i]
        return self.ids[s:e], self.ids[s + 1:e + 1]


def unigram_counts(ids: torch.Tensor, size: int) -> list[int]:
    """How often each vocabulary index occurs in ``ids``."""
    return torch.bincount(ids, minlength=size).tolist()


def load_generate(cfg: GenerateLoadConfig) -> tuple[dict[str, ChunkDataset], dict[str, Any], list[Path]]:
    """Chunk datasets per split, info (vocab, unigram counts) and the files read."""
    root = Path(cfg.root).expanduser().resolve()
    if cfg.generate is not None and not root.exists():
        generate_text(root, cfg.generate.train_chars, cfg.generate.val_chars, cfg.generate.seed)
    if not root.is_dir():
        raise DataError(f"load.root: {root} is not a folder")
    files = {"train": resolve_under(root, cfg.train, what="load.train")}
    texts = {"train": read_text(files["train"], what="training text")}
    for split in ("val", "test"):
        name = getattr(cfg, split)
        if name is not None:
            files[split] = resolve_under(root, name, what=f"load.{split}")
            texts[split] = read_text(files[split], what=f"{split} text")
    if cfg.val is None:
        cut = int(len(texts["train"]) * (1 - cfg.val_fraction))
        texts["train"], texts["val"] = texts["train"][:cut], texts["train"][cut:]
        if len(texts["val"]) < 2 or len(texts["train"]) < 2:
            raise DataError(f"{files['train']}: too short to hold out {cfg.val_fraction:g} of it for validation")
    vocab = Vocab.build([texts["train"]], cfg.min_count)
    ids = {k: torch.tensor(vocab.encode(t), dtype=torch.long) for k, t in texts.items()}
    data = {k: ChunkDataset(v, cfg.seq_len, shift=k == "train") for k, v in ids.items()}
    info = {"vocab": vocab.to_info(), "unigram_counts": unigram_counts(ids["train"][1:], len(vocab)),
            "seq_len": cfg.seq_len}
    return data, info, list(files.values())
