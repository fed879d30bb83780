"""Character RNNs (RNN / GRU / LSTM) over packed variable-length sequences, and their ONNX wrappers."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from visionpipe_plugins.charrnn.config import RnnModelConfig
from visionpipe_plugins.charrnn.text import PAD

CELLS: dict[str, type[nn.RNNBase]] = {"rnn": nn.RNN, "gru": nn.GRU, "lstm": nn.LSTM}


class CharRNN(nn.Module):
    """Characters → embedding (or one-hot) → stacked recurrent layers → linear layer."""

    def __init__(self, vocab_size: int, num_outputs: int, cfg: RnnModelConfig) -> None:
        super().__init__()
        self.cell, self.layers, self.hidden_size = cfg.cell, cfg.layers, cfg.hidden_size
        if cfg.input == "embedding":
            self.embed: nn.Module = nn.Embedding(vocab_size, cfg.embedding_dim, padding_idx=PAD)
            in_dim = cfg.embedding_dim
        else:
            self.embed = OneHot(vocab_size)
            in_dim = vocab_size
        self.rnn = CELLS[cfg.cell](in_dim, cfg.hidden_size, num_layers=cfg.layers, batch_first=True,
                                   dropout=cfg.dropout if cfg.layers > 1 else 0.0)
        self.drop = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(cfg.hidden_size, num_outputs)

    @property
    def state_layers(self) -> int:
        """Rows of the packed hidden state: layers, or 2 × layers for LSTM (h then c)."""
        return self.layers * (2 if self.cell == "lstm" else 1)

    def zero_state(self, batch: int) -> torch.Tensor:
        """An all-zero hidden state [state_layers, batch, hidden]."""
        p = next(self.parameters())
        return torch.zeros(self.state_layers, batch, self.hidden_size, dtype=p.dtype, device=p.device)

    def _split(self, state: torch.Tensor | None) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor] | None:
        if state is None or self.cell != "lstm":
            return state
        h, c = state.chunk(2, 0)
        return h.contiguous(), c.contiguous()

    def _join(self, state: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        return torch.cat(state, 0) if isinstance(state, tuple) else state

    def run(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
            state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Top-layer outputs [B, T, H] (zeros past each length) and the final state [S, B, H].

        With ``lengths`` the batch runs as a packed sequence: padding is never computed and the
        final state of each sequence is taken at its own last character."""
        x = self.embed(tokens)
        if lengths is not None and int(lengths.min()) == tokens.shape[1]:
            lengths = None  # no padding in this batch: packing would only cost time
        if lengths is None:
            out, st = self.rnn(x, self._split(state))
            return out, self._join(st)
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        out, st = self.rnn(packed, self._split(state))
        out, _ = pad_packed_sequence(out, batch_first=True, total_length=tokens.shape[1])
        return out, self._join(st)


class OneHot(nn.Module):
    """One-hot characters (padding is all zeros), exportable as a constant lookup."""

    def __init__(self, size: int) -> None:
        super().__init__()
        eye = torch.eye(size)
        eye[PAD] = 0
        self.register_buffer("table", eye, persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return nn.functional.embedding(tokens, self.table)


class CharClassifier(CharRNN):
    """A string → class logits, from the top layer's state after the string's last character."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        _, state = self.run(tokens, lengths)
        last = state[self.layers - 1]  # top layer's h (for LSTM, h rows come first)
        return self.head(self.drop(last))

    def forward_padded(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Same result without packing (for ONNX): run over the padding, read the output at length - 1."""
        out, _ = self.run(tokens)
        idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[2])
        return self.head(self.drop(out.gather(1, idx).squeeze(1)))


class CharLM(CharRNN):
    """Next-character logits at every position, carrying the hidden state."""

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        out, state = self.run(tokens, lengths, state)
        return self.head(self.drop(out)), state


def build_model(kind: str, vocab_size: int, num_classes: int, cfg: RnnModelConfig) -> CharRNN:
    """A classifier (``kind='classify'``) or a language model (``kind='generate'``)."""
    if kind == "classify":
        return CharClassifier(vocab_size, num_classes, cfg)
    return CharLM(vocab_size, vocab_size, cfg)


class ClassifierExport(nn.Module):
    """(tokens [B, T] int64, lengths [B] int64) → (logits [B, C], probs [B, C])."""

    def __init__(self, model: CharClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model.forward_padded(tokens, lengths)
        return logits, logits.softmax(-1)


class LMExport(nn.Module):
    """(tokens [B, T] int64, state [S, B, H]) → (logits [B, T, V], state [S, B, H]): one call per step or prompt."""

    def __init__(self, model: CharLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, tokens: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model(tokens, None, state)
