"""Fast checks of the char-RNN building blocks: text reading errors, vocabulary, packing, chunking, sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from visionpipe.errors import DataError
from visionpipe_plugins.charrnn.config import RnnModelConfig
from visionpipe_plugins.charrnn.data import ChunkDataset, collate
from visionpipe_plugins.charrnn.models import CharClassifier, CharLM, ClassifierExport, LMExport
from visionpipe_plugins.charrnn.sampling import generate, pick_next
from visionpipe_plugins.charrnn.text import PAD, UNK, Vocab, read_lines, read_text


def test_empty_file_is_a_clear_error(tmp_path):
    for name, content in (("empty.txt", b""), ("blank.txt", b"  \n\n \t\n")):
        p = tmp_path / name
        p.write_bytes(content)
        with pytest.raises(DataError, match=rf"{name}: empty text file"):
            read_text(p)


def test_non_utf8_file_names_file_line_and_byte(tmp_path):
    p = tmp_path / "latin1.txt"
    p.write_bytes("Anna\nBob\nJos\u00e9\n".encode("latin-1"))  # é is 0xe9 in Latin-1
    with pytest.raises(DataError) as e:
        read_text(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:3: not UTF-8 text")
    assert "0xe9" in msg and "offset 12" in msg and "column 4" in msg


def test_missing_file_and_bom(tmp_path):
    with pytest.raises(DataError, match="not found"):
        read_text(tmp_path / "nope.txt")
    p = tmp_path / "bom.txt"
    p.write_bytes(b"\xef\xbb\xbfab\r\n\r\ncd\n")
    assert read_lines(p) == [(1, "ab"), (3, "cd")]


def test_vocab_maps_unknown_characters_and_round_trips():
    v = Vocab.build(["abca", "b\u00e9"])
    assert v.itos[:2] == ["<pad>", "<unk>"] and set(v.itos[2:]) == {"a", "b", "c", "\u00e9"}
    ids = v.encode("abz\u00e9")
    assert ids[2] == UNK and PAD not in ids
    assert v.decode(ids) == "ab\ufffd\u00e9"
    assert v.unknown("xyza") == ["x", "y", "z"]
    assert Vocab.from_info(v.to_info()).encode("cab") == v.encode("cab")
    rare = Vocab.build(["aaab"], min_count=2)
    assert rare.encode("ab") == [2, UNK]


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
@pytest.mark.parametrize("inp", ["embedding", "onehot"])
def test_classifier_packed_equals_padded_export_path(cell, inp):
    torch.manual_seed(0)
    m = CharClassifier(12, 3, RnnModelConfig(cell=cell, layers=2, hidden_size=8, input=inp, dropout=0.0)).eval()
    items = [(torch.randint(2, 12, (n,)), 0) for n in (5, 1, 9, 3)]
    tokens, lengths, _ = collate(items)
    assert tokens.shape == (4, 9) and lengths.tolist() == [5, 1, 9, 3] and (tokens[1, 1:] == PAD).all()
    with torch.no_grad():
        packed = m(tokens, lengths)
        padded = ClassifierExport(m)(tokens, lengths)[0]
        alone = torch.cat([m(x[None], torch.tensor([len(x)])) for x, _ in items])
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed, alone, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_language_model_state_carries_across_steps(cell):
    torch.manual_seed(0)
    m = CharLM(10, 10, RnnModelConfig(cell=cell, layers=2, hidden_size=8, dropout=0.0)).eval()
    assert m.zero_state(3).shape == (m.state_layers, 3, 8) == ((4 if cell == "lstm" else 2), 3, 8)
    x = torch.randint(2, 10, (1, 7))
    wrap = LMExport(m)
    with torch.no_grad():
        full, st_full = wrap(x, m.zero_state(1))
        st = m.zero_state(1)
        steps = []
        for t in range(7):
            lo, st = wrap(x[:, t:t + 1], st)
            steps.append(lo)
        # packed variable-length batch: each row equals its own unpacked run
        tokens, lengths, _ = collate([(x[0, :7], 0), (x[0, :3], 0)])
        packed, _ = m(tokens, lengths)
    torch.testing.assert_close(torch.cat(steps, 1), full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(st, st_full, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(packed[1, :3], full[0, :3], atol=1e-5, rtol=1e-5)


def test_chunks_cover_every_target_once_per_epoch():
    ids = torch.arange(2, 2 + 50)
    ds = ChunkDataset(ids, seq_len=8, shift=True)
    for epoch in range(3):
        ds.set_epoch(epoch, seed=1)
        targets = torch.cat([ds[i][1] for i in range(len(ds))])
        inputs = torch.cat([ds[i][0] for i in range(len(ds))])
        assert targets.tolist() == ids[1:].tolist() and inputs.tolist() == ids[:-1].tolist()
        assert max(len(ds[i][0]) for i in range(len(ds))) <= 8
    offsets = set()
    for epoch in range(6):
        ds.set_epoch(epoch, seed=1)
        offsets.add(ds.offset)
    assert len(offsets) > 1, "chunk boundaries move between epochs"


def test_sampling_top_k_temperature_and_greedy():
    rng = np.random.default_rng(0)
    logits = np.array([9.0, 9.0, 1.0, 3.0, 2.0, 0.5])  # pad and unk are never drawn, however likely
    assert pick_next(logits, 0.0, 0, rng) == 3
    draws = {pick_next(logits, 1.0, 2, rng) for _ in range(200)}
    assert draws == {3, 4}
    draws = {pick_next(logits, 5.0, 0, rng) for _ in range(400)}
    assert draws == {2, 3, 4, 5}
    assert {pick_next(logits, 1e-310, 0, rng) for _ in range(20)} == {3}  # tiny but positive: greedy, no NaN

    v = Vocab(["<pad>", "<unk>", "a", "b"])

    def step(tokens, state):  # a deterministic fake "model": always predicts the character after the last one
        last = tokens[0, -1]
        logits = np.full((1, tokens.shape[1], 4), -5.0, dtype=np.float32)
        logits[0, -1, 2 + (last - 1) % 2] = 5.0
        return logits, state + 1

    assert generate(step, v, (1, 3), "a", 4, 0.0, 0, rng) == "baba"
