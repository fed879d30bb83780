"""Text generation step by step from any backend that maps (tokens, state) to (logits, state)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from visionpipe.errors import VisionpipeError
from visionpipe_plugins.charrnn.text import PAD, UNK, Vocab

log = logging.getLogger(__name__)
StepFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
"""(tokens [1, T] int64, state [S, 1, H] float32) → (logits [1, T, V], new state)."""


def pick_next(logits: np.ndarray, temperature: float, top_k: int, rng: np.random.Generator) -> int:
    """One character index from next-character logits; padding and <unk> are never drawn."""
    z = logits.astype(np.float64).copy()
    z[[PAD, UNK]] = -np.inf
    if temperature <= 0:
        return int(np.argmax(z))
    with np.errstate(over="ignore"):  # a tiny temperature sends all but the best to -inf: greedy, as it should
        z = (z - z.max()) / temperature
    if 0 < top_k < np.isfinite(z).sum():
        kth = np.partition(z, -top_k)[-top_k]
        z[z < kth] = -np.inf
    p = np.exp(z)
    p /= p.sum()
    return int(rng.choice(len(p), p=p))


def generate(step: StepFn, vocab: Vocab, state_shape: tuple[int, int], prompt: str, length: int,
             temperature: float, top_k: int, rng: np.random.Generator) -> str:
    """The continuation of ``prompt`` (``length`` characters): the prompt runs in one call, then one call per character."""
    if length < 0:
        raise VisionpipeError(f"length must be >= 0 (got {length})")
    start = prompt if prompt else "\n"
    unknown = vocab.unknown(start)
    if unknown:
        log.warning("prompt characters not in the vocabulary are read as <unk>: %s", "".join(unknown))
    state = np.zeros((state_shape[0], 1, state_shape[1]), dtype=np.float32)
    tokens = np.asarray([vocab.encode(start)], dtype=np.int64)
    out: list[int] = []
    for _ in range(length):
        logits, state = step(tokens, state)
        nxt = pick_next(logits[0, -1], temperature, top_k, rng)
        out.append(nxt)
        tokens = np.asarray([[nxt]], dtype=np.int64)
    return vocab.decode(out)
