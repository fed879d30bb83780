"""Config blocks of the char-RNN tasks (classify short strings; character language model)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from visionpipe.config import Block, PipelineConfig, TrainConfig


class NamesCorpusConfig(Block):
    """Built-in "names" corpus (invented languages) written to ``load.root`` when it does not exist."""

    per_class: int = Field(700, ge=10, description="distinct names per language")
    unseen_per_class: int = Field(100, ge=0, description="extra names per language written to root/unseen/ for predict")
    seed: int = 0


class TextCorpusConfig(Block):
    """Built-in grammar corpus written to ``load.root`` when it does not exist."""

    train_chars: int = Field(300_000, ge=1000, description="approximate size of train.txt in characters")
    val_chars: int = Field(30_000, ge=200, description="approximate size of val.txt in characters")
    seed: int = 0


class ClassifyLoadConfig(Block):
    """A folder of ``<label>.txt`` files, one sample (a name, a word) per line."""

    root: str = Field(description="folder holding one <label>.txt per class (not recursive)")
    classes: list[str] | None = Field(None, description="class names in label order; default: sorted file stems")
    val_fraction: float = Field(0.1, ge=0, lt=1, description="lines of each class held out for validation")
    test_fraction: float = Field(0.1, ge=0, lt=1, description="lines of each class held out for the test split")
    max_length: int = Field(64, gt=0, description="longer lines are cut to this many characters")
    lowercase: bool = Field(False, description="lower-case every line (also at predict time)")
    dedupe: bool = Field(True, description="drop repeated lines within a class, so held-out lines are unseen")
    min_count: int = Field(1, gt=0, description="characters seen fewer times in train map to <unk>")
    generate: NamesCorpusConfig | None = Field(None, description="create the built-in corpus at root if missing")

    @model_validator(mode="after")
    def _fractions(self) -> ClassifyLoadConfig:
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must leave at least 10% of the lines for training")
        return self


class GenerateLoadConfig(Block):
    """A UTF-8 text file to model character by character."""

    root: str = Field(description="folder holding the text files")
    train: str = Field("train.txt", description="training text, relative to root")
    val: str | None = Field("val.txt", description="validation text; null to hold out the end of train")
    val_fraction: float = Field(0.1, gt=0, lt=1, description="tail of train held out when val is null")
    test: str | None = Field(None, description="optional test text, relative to root")
    seq_len: int = Field(128, ge=2, description="characters per training sequence (BPTT length)")
    min_count: int = Field(1, gt=0, description="characters seen fewer times in train map to <unk>")
    generate: TextCorpusConfig | None = Field(None, description="create the built-in corpus at root if missing")


class RnnModelConfig(Block):
    """A recurrent network over characters."""

    cell: Literal["rnn", "gru", "lstm"] = Field("gru", description="recurrent cell")
    layers: int = Field(2, gt=0, le=8, description="stacked recurrent layers")
    hidden_size: int = Field(128, gt=0, description="hidden units per layer")
    input: Literal["embedding", "onehot"] = Field("embedding", description="learned embedding or one-hot characters")
    embedding_dim: int = Field(32, gt=0, description="embedding size (input: embedding)")
    dropout: float = Field(0.1, ge=0, lt=1, description="dropout between layers and before the output layer")
    weights: str | None = Field(None, description="local weights file (.pt state dict or visionpipe checkpoint)")


class CharRnnTrainConfig(TrainConfig):
    """Train block plus character-level regularization."""

    unk_dropout: float = Field(
        0.0, ge=0, lt=1, description="replace this fraction of input characters by <unk> while training, "
                                    "so characters never seen in training still get a sensible input")
    cpu_threads: int | None = Field(
        None, gt=0, description="PyTorch CPU threads while this pipeline runs on the CPU (small RNNs are "
                                "often fastest on 1, above all on a busy machine); default: PyTorch's choice")


class SamplingConfig(Block):
    """How text is sampled: per-epoch samples in the run and defaults of `visionpipe predict`."""

    prompt: str = Field("", description="text the samples start from; empty = a newline")
    length: int = Field(200, gt=0, description="characters to generate")
    temperature: float = Field(0.8, ge=0, description="softmax temperature; 0 = greedy")
    top_k: int = Field(5, ge=0, description="sample among the k likeliest characters; 0 = all "
                                          "(`visionpipe predict` takes --top-k / -o top_k instead)")
    every: int = Field(1, ge=0, description="write a sample every N evaluated epochs (0 = only at the end)")


class CharRnnClassifyConfig(PipelineConfig):
    """A char-RNN classification pipeline file."""

    task: Literal["charrnn_classify"] = "charrnn_classify"
    load: ClassifyLoadConfig | None = None
    model: RnnModelConfig | None = None
    train: CharRnnTrainConfig | None = None


class CharRnnGenerateConfig(PipelineConfig):
    """A char-RNN language-model pipeline file."""

    task: Literal["charrnn_generate"] = "charrnn_generate"
    load: GenerateLoadConfig | None = None
    model: RnnModelConfig | None = None
    train: CharRnnTrainConfig | None = None
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
