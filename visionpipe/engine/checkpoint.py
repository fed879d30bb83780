"""Checkpoints: one dict of plain data and tensors, written atomically, read with weights_only."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np
import torch

from visionpipe.errors import VisionpipeError
from visionpipe.io import atomic_path


def save_checkpoint(state: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``state`` to ``path`` atomically (a killed run never leaves half a file)."""
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True``; never falls back to full unpickling."""
    p = Path(path)
    if not p.is_file():
        raise VisionpipeError(f"{p}: checkpoint not found")
    try:
        obj = torch.load(p, map_location=map_location, weights_only=True)
    except Exception as e:  # corrupt file or disallowed global: refuse, say why (never "use weights_only=False")
        raise VisionpipeError(f"{p}: {_why_not_loadable(e)}") from None
    if not isinstance(obj, dict):
        raise VisionpipeError(f"{p}: not a visionpipe checkpoint or state dict (got {type(obj).__name__})")
    return obj


_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


def _why_not_loadable(e: Exception) -> str:
    """torch.load's refusal in one line: the unpickler's reason, without torch's advice to turn the check off."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    # torch >= 2.6 numbers its advice "(1) ... weights_only=False ...", "(2) ..."; the unpickler's own line says why
    unpickler = [ln.removeprefix("WeightsUnpickler error:").strip() for ln in lines
                 if ln.startswith("WeightsUnpickler error:")]
    reasons = unpickler or [ln for ln in lines if not ln.startswith((*_TORCH_ADVICE, "(1)", "(2)"))]
    reason = next((r for r in reasons if r), None) or (lines[0] if lines else type(e).__name__)
    reason = reason.split(". Please use `torch.serialization")[0]  # drop the advice to allowlist the class
    if "global" in reason.lower():  # a class or function reference: the file holds pickled Python objects
        return (f"refused: it holds pickled Python objects, which are never loaded ({reason.rstrip('.')}); "
                "a checkpoint must hold only tensors and plain data (e.g. a state dict)")
    return f"not a readable PyTorch checkpoint (corrupt, truncated or another format; {type(e).__name__}: {reason[:200]})"


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as tensors and plain data."""
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)


def extract_state_dict(obj: dict[str, Any], path: str | os.PathLike = "weights") -> dict[str, torch.Tensor]:
    """The model weights inside a visionpipe checkpoint or a plain/nested state dict file."""
    sd = next((obj[k] for k in ("ema", "model", "state_dict", "model_state_dict")
               if isinstance(obj.get(k), dict) and obj[k]), obj)
    if not sd:
        raise VisionpipeError(f"{path}: no model weights found (expected a state dict, or a dict with "
                              "'model'/'state_dict')")
    odd = next((k for k, v in sd.items() if not isinstance(v, torch.Tensor)), None)
    if odd is not None:
        raise VisionpipeError(f"{path}: no model weights found: '{odd}' is a {type(sd[odd]).__name__}, not a tensor "
                              "(expected a state dict, or a dict with 'model'/'state_dict')")
    return sd


_weights_read: ContextVar[tuple[list[Path], ...]] = ContextVar("visionpipe_weights_read", default=())


@contextmanager
def recording_weights_files() -> Iterator[list[Path]]:
    """The weights files :func:`load_weights_file` reads inside the block (resolved), e.g. for the manifest.

    Per context (thread): pipelines run side by side in one process each record only their own.
    """
    files: list[Path] = []
    token = _weights_read.set((*_weights_read.get(), files))
    try:
        yield files
    finally:
        _weights_read.reset(token)


def load_weights_file(model: torch.nn.Module, path: str | os.PathLike, *, strict: bool = False,
                      prefix: str = "", skip_mismatched: bool = True) -> dict[str, list[str]]:
    """Load local weights into ``model``; shape-mismatched keys (e.g. a new head) are skipped and reported."""
    sd = extract_state_dict(load_checkpoint(path), path)
    for files in _weights_read.get():
        files.append(Path(path).expanduser().resolve())
    if prefix:
        sd = {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    own = model.state_dict()
    for wrapper in ("module.", "_orig_mod."):  # saved from a DistributedDataParallel / torch.compile wrapper
        if not set(sd) & set(own) and all(k.startswith(wrapper) for k in sd):
            sd = {k[len(wrapper):]: v for k, v in sd.items()}
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    if mismatched and not skip_mismatched:
        raise VisionpipeError(f"{path}: shape mismatch for {', '.join(mismatched[:5])}")
    sd = {k: v for k, v in sd.items() if k not in mismatched}
    res = model.load_state_dict(sd, strict=False)
    if strict and (res.missing_keys or res.unexpected_keys):
        raise VisionpipeError(f"{path}: missing {res.missing_keys[:5]}, unexpected {res.unexpected_keys[:5]}")
    if not set(sd) & set(own):
        raise VisionpipeError(f"{path}: none of its tensors fit this model ({len(mismatched)} with a matching name "
                              f"but another shape, {len(sd)} others with names the model does not have)")
    return {"missing": list(res.missing_keys), "unexpected": list(res.unexpected_keys), "mismatched": mismatched}


def state_mismatch(own: dict[str, torch.Tensor], saved: dict[str, torch.Tensor]) -> str | None:
    """A short description of how ``saved`` does not fit a model whose state dict is ``own`` (None: it fits)."""
    missing = [k for k in own if k not in saved]
    unexpected = [k for k in saved if k not in own]
    shapes = [f"{k}: {list(saved[k].shape)} in the checkpoint, {list(own[k].shape)} in the model"
              for k in own if k in saved and hasattr(saved[k], "shape") and saved[k].shape != own[k].shape]
    parts = []
    if shapes:
        parts.append(shapes[0] + (f" (+{len(shapes) - 1} more)" if len(shapes) > 1 else ""))
    for what, keys in (("missing", missing), ("unexpected", unexpected)):
        if keys:
            parts.append(f"{what} {', '.join(keys[:3])}" + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else ""))
    return "; ".join(parts) or None
