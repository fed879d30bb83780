"""Both char-RNN tasks end to end on tiny generated corpora: train, evaluate, export parity, predict, errors."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch

from tests.conftest import run_cli
from visionpipe.errors import DataError
from visionpipe.export.checkpoint_model import task_and_model_from_checkpoint
from visionpipe_plugins.charrnn.config import ClassifyLoadConfig, GenerateLoadConfig
from visionpipe_plugins.charrnn.corpus import LANGUAGES
from visionpipe_plugins.charrnn.data import collate, load_classify, load_generate
from visionpipe_plugins.charrnn.generate import torch_step
from visionpipe_plugins.charrnn.sampling import generate
from visionpipe_plugins.charrnn.text import PAD, Vocab

pytestmark = pytest.mark.slow

TINY_CLASSIFY = """\
task: charrnn_classify
name: cls
seed: 0
load:
  root: data/names
  max_length: 20
  generate: {{per_class: 60, unseen_per_class: 10}}
model: {{cell: {cell}, layers: 1, hidden_size: 32, input: {input}, embedding_dim: 16, dropout: 0.0}}
train:
  epochs: 6
  batch_size: 16
  optimizer: {{name: adam, lr: 0.01}}
  unk_dropout: 0.02
  cpu_threads: 1
evaluate: {{split: test}}
export: {{opset: 17}}
predict: {{source: data/names/unseen, top_k: 2}}
"""

TINY_GENERATE = """\
task: charrnn_generate
name: gen
seed: 0
load:
  root: data/text
  seq_len: 40
  generate: {train_chars: 12000, val_chars: 2000}
model: {cell: lstm, layers: 2, hidden_size: 48, embedding_dim: 16, dropout: 0.0}
train:
  epochs: 3
  batch_size: 16
  optimizer: {name: adam, lr: 0.01}
  grad_clip: 1.0
  cpu_threads: 1
sampling: {prompt: "The ", length: 40, temperature: 0.8, top_k: 5, every: 1}
evaluate: {split: val}
export: {opset: 17}
predict: {source: data/text/prompts.txt, top_k: 5}
"""


@pytest.fixture(scope="module")
def cls_run(tmp_path_factory):
    """The tiny classification pipeline (GRU, embedding input), run through the CLI."""
    tmp = tmp_path_factory.mktemp("charrnn_cls")
    (tmp / "cls.yaml").write_text(TINY_CLASSIFY.format(cell="gru", input="embedding"))
    run_cli("run", "cls.yaml", cwd=tmp)
    return tmp, tmp / "runs" / "cls"


@pytest.fixture(scope="module")
def gen_run(tmp_path_factory):
    """The tiny language-model pipeline (LSTM), run through the CLI."""
    tmp = tmp_path_factory.mktemp("charrnn_gen")
    (tmp / "gen.yaml").write_text(TINY_GENERATE)
    run_cli("run", "gen.yaml", cwd=tmp)
    return tmp, tmp / "runs" / "gen"


# ----------------------------------------------------------------------------- classify


def test_classify_trains_far_above_chance_with_per_class_metrics(cls_run):
    tmp, run = cls_run
    assert sorted(p.stem for p in (tmp / "data" / "names").glob("*.txt")) == sorted(LANGUAGES)
    m = json.loads((run / "metrics.json").read_text())
    classes = sorted(LANGUAGES)
    cm = np.array(m["test/confusion_matrix"])
    assert cm.shape == (6, 6) and cm.sum() == 6 * 6  # 10% of 60 lines per class held out for test
    assert m["test/acc"] == pytest.approx(np.trace(cm) / cm.sum())
    assert m["test/acc"] > 2 * m["test/chance_acc"], m["test/acc"]
    for c in classes:
        assert 0 <= m[f"test/f1/{c}"] <= 1
    assert (run / "plots" / "confusion_matrix.png").stat().st_size > 1000
    assert "PyTorch CPU threads: 1 (train.cpu_threads)" in (run / "run.log").read_text()
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == list(range(1, 7)) and "val/acc" in epochs[0]
    ckpt = torch.load(run / "checkpoints" / "best.pt", weights_only=True)
    assert ckpt["info"]["class_names"] == classes and ckpt["info"]["vocab"][:2] == ["<pad>", "<unk>"]


def test_classify_onnx_matches_packed_pytorch_on_new_lines(cls_run):
    tmp, run = cls_run
    _, model, state = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    vocab = Vocab.from_info(state["info"]["vocab"])
    lines = ["Zhenko", "A", "Quetzalcoatl", "Kotamishi", "Émile", "Grimdur#"]  # varied lengths, unknown chars
    items = [(torch.tensor(vocab.encode(s)), 0) for s in lines]
    tokens, lengths, _ = collate(items)
    with torch.no_grad():
        ref = model(tokens, lengths).softmax(-1).numpy()
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    for sl in (slice(0, 6), slice(2, 3)):  # dynamic batch and time
        t = tokens[sl][:, : int(lengths[sl].max())].numpy()
        got = sess.run(None, {"tokens": t, "lengths": lengths[sl].numpy()})[1]
        np.testing.assert_allclose(got, ref[sl], atol=1e-4)
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["visionpipe"])
    assert meta["task"] == "charrnn_classify" and meta["vocab"] == state["info"]["vocab"]
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["export"]["max_abs_diff"] < 1e-4 and manifest["export"]["parity_inputs"] == 2


def test_classify_predict_stage_and_cli(cls_run, tmp_path):
    tmp, run = cls_run
    summary = json.loads((run / "predictions" / "summary.json").read_text())
    assert summary["lines"] == 60 and summary["labelled_lines"] == 60 and 0 <= summary["accuracy"] <= 1
    src = tmp_path / "names.txt"
    src.write_text("Thorin\n\n  Kotaro  \nÉléonore™\n", encoding="utf-8")
    for model in ("model.onnx", "checkpoints/best.pt"):
        out = tmp_path / Path(model).stem
        run_cli("predict", str(run / model), str(src), "--out", str(out), "--top-k", "3", cwd=tmp)
        recs = [json.loads(x) for x in (out / "predictions.jsonl").read_text(encoding="utf-8").splitlines()]
        assert [r["line"] for r in recs] == [1, 3, 4] and recs[1]["text"] == "Kotaro"
        assert all(r["label"] == r["labels"][0] and len(r["labels"]) == 3 for r in recs)
        assert set(r["label"] for r in recs) <= set(LANGUAGES)
        assert sum(recs[0]["scores"]) <= 1 + 1e-5 and recs[0]["scores"] == sorted(recs[0]["scores"], reverse=True)
        assert "™" in recs[2]["unknown_chars"]
        if model == "model.onnx":
            onnx_labels = [r["labels"] for r in recs]
    assert [r["labels"] for r in recs] == onnx_labels  # the checkpoint backend agrees with onnxruntime


def test_classify_predict_rejects_empty_and_non_utf8_files(cls_run, tmp_path):
    tmp, run = cls_run
    (tmp_path / "empty.txt").write_text("\n \n")
    (tmp_path / "bad.txt").write_bytes(b"Ana\nJos\xe9\n")
    proc = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "empty.txt"), "--out", str(tmp_path / "o"),
                   cwd=tmp, check=False)
    assert proc.returncode == 1 and "empty.txt: empty text file" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("predict", str(run / "model.onnx"), str(tmp_path / "bad.txt"), "--out", str(tmp_path / "o"),
                   cwd=tmp, check=False)
    assert proc.returncode == 1 and "bad.txt:2: not UTF-8" in proc.stderr.replace("\n", "")


def test_classify_load_errors_name_the_file(tmp_path):
    root = tmp_path / "d"
    root.mkdir()
    (root / "a.txt").write_text("x\ny\nz\nw\n")
    (root / "b.txt").write_text("")
    with pytest.raises(DataError, match=r"b\.txt: empty class file"):
        load_classify(ClassifyLoadConfig(root=str(root)), 0)
    (root / "b.txt").write_bytes("p\nM\u00fcller\nr\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"b\.txt:2: not UTF-8 text: byte 0xfc"):
        load_classify(ClassifyLoadConfig(root=str(root)), 0)
    (root / "b.txt").write_text("p\nq\n")
    with pytest.raises(DataError, match=r"b\.txt: only 2 line\(s\), too few to hold out"):
        load_classify(ClassifyLoadConfig(root=str(root)), 0)
    (root / "b.txt").unlink()
    with pytest.raises(DataError, match="at least 2"):
        load_classify(ClassifyLoadConfig(root=str(root)), 0)


@pytest.mark.parametrize("cell,inp", [("lstm", "onehot"), ("rnn", "embedding")])
def test_other_cells_train_and_export(tmp_path, cell, inp):
    cfg = TINY_CLASSIFY.format(cell=cell, input=inp).replace("epochs: 6", "epochs: 1")
    (tmp_path / "c.yaml").write_text(cfg.replace("predict: {source: data/names/unseen, top_k: 2}\n", ""))
    run_cli("run", "c.yaml", cwd=tmp_path)
    manifest = json.loads((tmp_path / "runs" / "cls" / "manifest.json").read_text())
    assert manifest["stages_done"][-1] == "export" and manifest["export"]["max_abs_diff"] < 1e-4
    meta = json.loads(ort.InferenceSession(str(tmp_path / "runs" / "cls" / "model.onnx"))
                      .get_modelmeta().custom_metadata_map["visionpipe"])
    assert (meta["cell"], meta["input"]) == (cell, inp)


# ----------------------------------------------------------------------------- generate


def test_language_model_beats_unigram_baseline(gen_run):
    tmp, run = gen_run
    m = json.loads((run / "metrics.json").read_text())
    assert m["val/bpc"] < m["val/unigram_bpc"] - 0.5, (m["val/bpc"], m["val/unigram_bpc"])
    assert m["val/ppl"] == pytest.approx(math.exp(m["val/loss"]), rel=1e-6)
    assert m["val/bpc"] == pytest.approx(m["val/loss"] / math.log(2), rel=1e-6)
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all("val/bpc" in e and "val/unigram_bpc" in e for e in epochs)
    for name in ("epoch_001.txt", "epoch_003.txt", "final.txt"):
        assert (run / "samples" / name).read_text().startswith("The ")


def test_step_by_step_generation_in_onnxruntime_matches_pytorch(gen_run):
    tmp, run = gen_run
    _, model, state = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    sess = ort.InferenceSession(str(run / "model.onnx"), providers=["CPUExecutionProvider"])
    meta = json.loads(sess.get_modelmeta().custom_metadata_map["visionpipe"])
    assert meta["state_shape"] == [4, 48] and meta["cell"] == "lstm"
    vocab = Vocab.from_info(meta["vocab"])
    t_step = torch_step(model, torch.device("cpu"))
    diffs = []

    def o_step(tokens, st):
        logits, new = sess.run(None, {"tokens": tokens, "state": st})
        ref_logits, ref_state = t_step(tokens, st)
        diffs.append(max(np.abs(logits - ref_logits).max(), np.abs(new - ref_state).max()))
        return logits, new

    for temperature, top_k in ((0.0, 0), (0.8, 5)):
        a = generate(t_step, vocab, (4, 48), "Does the ", 60, temperature, top_k, np.random.default_rng(7))
        b = generate(o_step, vocab, (4, 48), "Does the ", 60, temperature, top_k, np.random.default_rng(7))
        assert a == b and len(a) == 60
    assert max(diffs) < 1e-4 and len(diffs) == 120


def test_generate_predict_cli_prompt_seed_and_prompt_file(gen_run, tmp_path):
    tmp, run = gen_run
    args = ["predict", str(run / "model.onnx"), "--prompt", "Yesterday , ", "-o", "length=50", "-o",
            "temperature=0.8", "--top-k", "5", "--num", "2"]
    texts = {}
    for seed, name in ((3, "a"), (3, "b"), (4, "c")):
        run_cli(*args, "--seed", str(seed), "--out", str(tmp_path / name), cwd=tmp)
        recs = [json.loads(x) for x in (tmp_path / name / "predictions.jsonl").read_text().splitlines()]
        assert len(recs) == 2 and all(r["text"].startswith("Yesterday , ") and len(r["generated"]) == 50 for r in recs)
        texts[name] = [r["text"] for r in recs]
    assert texts["a"] == texts["b"], "same seed, same text"
    assert texts["a"] != texts["c"], "another seed, other text"
    summary = json.loads((run / "predictions" / "summary.json").read_text())  # the pipeline's predict stage
    assert summary["samples"] == 6 and summary["top_k"] == 5 and summary["length"] == 40
    assert (run / "predictions" / "generated.txt").read_text().startswith("The ")


def test_generate_errors_for_empty_and_non_utf8_text(tmp_path, gen_run):
    root = tmp_path / "t"
    root.mkdir()
    (root / "train.txt").write_text("   \n")
    with pytest.raises(DataError, match=r"train\.txt: empty training text"):
        load_generate(GenerateLoadConfig(root=str(root), val=None))
    (root / "train.txt").write_bytes(b"hello world\nthe cat \xff\xfe sat\n")
    with pytest.raises(DataError, match=r"train\.txt:2: not UTF-8 text: byte 0xff at offset 20"):
        load_generate(GenerateLoadConfig(root=str(root), val=None))
    (tmp_path / "g.yaml").write_text(f"task: charrnn_generate\nload: {{root: {root}, val: null}}\nmodel: {{}}\n")
    proc = run_cli("run", "g.yaml", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "not UTF-8 text" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli("predict", str(gen_run[1] / "model.onnx"), str(root / "train.txt"), "--out", str(tmp_path / "o"),
                   cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "train.txt:2: not UTF-8" in proc.stderr.replace("\n", "")


def test_unknown_prompt_characters_are_read_as_unk(gen_run):
    _, run = gen_run
    _, model, state = task_and_model_from_checkpoint(run / "checkpoints" / "best.pt")
    vocab = Vocab.from_info(state["info"]["vocab"])
    assert vocab.encode("Th€") == [vocab.stoi["T"], vocab.stoi["h"], 1]
    out = generate(torch_step(model, torch.device("cpu")), vocab, (4, 48), "Th€ ", 20, 0.8, 5,
                   np.random.default_rng(0))
    assert len(out) == 20 and "\ufffd" not in out and PAD not in vocab.encode(out)


def test_static_int8_for_a_text_model_is_refused_before_anything_is_written(cls_run, tmp_path):
    tmp, run = cls_run
    proc = run_cli("export", str(run), "--out", str(tmp_path / "m.onnx"), "--quantize", "int8", cwd=tmp, check=False)
    assert proc.returncode == 2 and "has no image inputs to calibrate on; add --calibration dynamic" in proc.stderr
    assert not (tmp_path / "m.onnx").exists()


def test_generate_top_k_defaults_to_the_models_and_takes_zero(gen_run, tmp_path):
    tmp, run = gen_run
    base = ["predict", str(run / "model.onnx"), "--prompt", "The ", "-o", "length=5"]
    run_cli(*base, "--out", str(tmp_path / "default"), cwd=tmp)
    run_cli(*base, "--top-k", "0", "--out", str(tmp_path / "all"), cwd=tmp)
    meta_top_k = json.loads((run / "predictions" / "summary.json").read_text())["top_k"]
    assert json.loads((tmp_path / "default" / "summary.json").read_text())["top_k"] == meta_top_k
    assert json.loads((tmp_path / "all" / "summary.json").read_text())["top_k"] == 0


def test_a_text_model_does_not_take_over_another_models_out(cls_run, gen_run, tmp_path):
    out = tmp_path / "out"
    tmp, gen = gen_run
    run_cli("predict", str(gen / "model.onnx"), "--prompt", "The ", "-o", "length=5", "--out", str(out), cwd=tmp)
    before = (out / "predictions.jsonl").read_bytes()
    run_cli("predict", str(gen / "model.onnx"), "--prompt", "A ", "-o", "length=7", "--out", str(out), cwd=tmp)
    assert (out / "predictions.jsonl").read_bytes() != before  # same model, other options: rewritten
    src = tmp_path / "names.txt"
    src.write_text("Thorin\n", encoding="utf-8")
    _, cls = cls_run
    proc = run_cli("predict", str(cls / "model.onnx"), str(src), "--out", str(out), cwd=tmp, check=False)
    assert proc.returncode == 1 and "holds predictions made with other settings (model sha256" in proc.stderr
    assert json.loads((out / "fingerprint.json").read_text())["task"] == "charrnn_generate"
    run_cli("predict", str(cls / "model.onnx"), str(src), "--out", str(out), "--overwrite", cwd=tmp)
    assert json.loads((out / "fingerprint.json").read_text())["task"] == "charrnn_classify"
