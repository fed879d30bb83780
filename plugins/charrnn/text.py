"""UTF-8 text files with clear errors, and the character vocabulary saved with every model."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from visionpipe.errors import DataError

PAD, UNK = 0, 1
SPECIALS = ("<pad>", "<unk>")


def read_text(path: str | os.PathLike, *, what: str = "text file") -> str:
    """The whole file as text; a DataError naming the file (and line/byte) if missing, empty or not UTF-8."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{p}: {what} not found")
    raw = p.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]  # a UTF-8 byte-order mark is not part of the text
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        col = e.start - (raw.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(f"{p}:{line}: not UTF-8 text: byte 0x{raw[e.start]:02x} at offset {e.start} "
                        f"(line {line}, column {col}) cannot be decoded ({e.reason}); re-save the file as UTF-8"
                        ) from None
    if not text.strip():
        raise DataError(f"{p}: empty {what} (no characters other than whitespace)")
    return text


def read_lines(path: str | os.PathLike, *, what: str = "text file", strip: bool = True) -> list[tuple[int, str]]:
    """(1-based line number, line) for every non-blank line of a UTF-8 file; ``strip`` trims whitespace."""
    text = read_text(path, what=what)
    return [(i, s.strip() if strip else s.rstrip("\r")) for i, s in enumerate(text.split("\n"), 1) if s.strip()]


class Vocab:
    """Characters ↔ indices; index 0 is padding, 1 stands for every unknown character."""

    def __init__(self, itos: Sequence[str]) -> None:
        if tuple(itos[:2]) != SPECIALS:
            raise DataError(f"vocabulary must start with {SPECIALS} (got {list(itos[:2])})")
        self.itos = list(itos)
        self.stoi = {c: i for i, c in enumerate(self.itos) if i >= len(SPECIALS)}

    @classmethod
    def build(cls, texts: Iterable[str], min_count: int = 1) -> Vocab:
        """Every character seen at least ``min_count`` times, in code-point order."""
        counts: Counter[str] = Counter()
        for t in texts:
            counts.update(t)
        return cls([*SPECIALS, *sorted(c for c, n in counts.items() if n >= min_count)])

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        """Indices of ``text``; characters outside the vocabulary become <unk>."""
        get = self.stoi.get
        return [get(c, UNK) for c in text]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; <unk> shows as U+FFFD, padding is dropped."""
        return "".join("\ufffd" if i == UNK else self.itos[i] for i in ids if i != PAD)

    def unknown(self, text: str) -> list[str]:
        """Characters of ``text`` not in the vocabulary (sorted, once each)."""
        return sorted({c for c in text if c not in self.stoi})

    def to_info(self) -> list[str]:
        """Plain data for checkpoints and ONNX metadata."""
        return list(self.itos)

    @classmethod
    def from_info(cls, info: Any) -> Vocab:
        """Inverse of :meth:`to_info`."""
        if not isinstance(info, list) or not all(isinstance(c, str) for c in info):
            raise DataError("model metadata has no valid 'vocab' (a list of characters)")
        return cls(info)
