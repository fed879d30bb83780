"""Config errors name the file, the YAML line and the field; --set overrides are typed."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import run_cli
from visionpipe.config import load_config
from visionpipe.errors import ConfigError

BASE = """\
task: classification
seed: 0
load:
  root: data
train:
  epochs: 2
  optimizer:
    name: sgd
    lr: 0.01
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "p.yaml"
    p.write_text(text)
    return p


def test_valid_config_fills_defaults(tmp_path):
    loaded = load_config(write(tmp_path, BASE))
    cfg = loaded.config
    assert cfg.train.epochs == 2 and cfg.train.batch_size == 32
    assert cfg.train.optimizer.momentum == 0.9
    assert cfg.stage_list() == ["load", "train"]
    assert cfg.name == "p"


def test_negative_lr_names_line_and_field(tmp_path):
    p = write(tmp_path, BASE.replace("lr: 0.01", "lr: -0.01"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value) == f"{p}:9: train.optimizer.lr: must be > 0 (got -0.01)"


def test_unknown_key_suggests_the_right_one(tmp_path):
    p = write(tmp_path, BASE.replace("  epochs: 2", "  epochs: 2\n  batch_sise: 4"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}:7: train.batch_sise: unknown key")
    assert "did you mean 'batch_size'?" in msg


def test_unknown_top_level_block(tmp_path):
    p = write(tmp_path, BASE + "evalute:\n  split: val\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:10: evalute: unknown key; did you mean 'evaluate'?" in str(e.value)


def test_unknown_task_lists_valid(tmp_path):
    p = write(tmp_path, BASE.replace("task: classification", "task: clasification"))
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert f"{p}:1: task: unknown task 'clasification'; did you mean 'classification'?" in str(e.value)


def test_wrong_type_and_literal(tmp_path):
    p = write(tmp_path, BASE.replace("epochs: 2", "epochs: many"))
    with pytest.raises(ConfigError, match=r":6: train.epochs: .*integer.*'many'"):
        load_config(p)
    p = write(tmp_path, BASE.replace("name: sgd", "name: lion"))
    with pytest.raises(ConfigError, match=r":8: train.optimizer.name: must be one of 'sgd', 'adamw' or 'adam'"):
        load_config(p)


def test_bad_yaml_syntax_has_line(tmp_path):
    p = write(tmp_path, BASE + "model: [unclosed\n")
    with pytest.raises(ConfigError, match=rf"^{p}:\d+: invalid YAML"):
        load_config(p)


def test_unknown_augmentation_is_caught_at_load(tmp_path):
    p = write(tmp_path, BASE + "augment:\n  train:\n    - {name: HorizontalFlop, p: 0.5}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "augment.train" in str(e.value) and "did you mean 'HorizontalFlip'" in str(e.value)
    assert f"{p}:11:" in str(e.value)


def test_set_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, BASE)
    cfg = load_config(p, ["train.epochs=7", "train.optimizer.nesterov=true", "augment.image_size=[32,48]"]).config
    assert cfg.train.epochs == 7 and cfg.train.optimizer.nesterov is True
    assert cfg.augment.image_size == (32, 48)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["train.optimizer.lr=-1"])
    assert str(e.value) == "--set: train.optimizer.lr: must be > 0 (got -1)"


def test_stages_list_is_checked(tmp_path):
    p = write(tmp_path, BASE + "stages: [load, trian]\n")
    with pytest.raises(ConfigError, match="unknown stage 'trian'; did you mean 'train'"):
        load_config(p)


def test_cli_error_is_one_line_without_traceback(tmp_path):
    p = write(tmp_path, BASE.replace("lr: 0.01", "lr: -0.01"))
    proc = run_cli("validate", str(p), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and "p.yaml:9: train.optimizer.lr: must be > 0 (got -0.01)" in lines[0]


def test_cli_validate_prints_resolved_config(tmp_path):
    proc = run_cli("validate", str(write(tmp_path, BASE)), "--set", "train.epochs=3", cwd=tmp_path)
    assert "epochs: 3" in proc.stdout and "batch_size: 32" in proc.stdout
    assert "ok" in proc.stderr


def test_yaml_is_loaded_safely(tmp_path):
    p = write(tmp_path, BASE + "model: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(p)


def test_set_of_an_unknown_key_blames_the_override_not_the_file(tmp_path):
    p = write(tmp_path, BASE)
    with pytest.raises(ConfigError) as e:
        load_config(p, ["trian.epochs=3"])
    assert str(e.value).startswith("--set: trian: unknown key; did you mean 'train'?")


def test_set_reaches_into_lists_by_index(tmp_path):
    p = write(tmp_path, BASE + "augment:\n  train:\n    - {name: HorizontalFlip, p: 0.5}\n")
    cfg = load_config(p, ["augment.train.0.p=0.25"]).config
    assert cfg.augment.train == [{"name": "HorizontalFlip", "p": 0.25}]
    with pytest.raises(ConfigError) as e:
        load_config(p, ["augment.train.3.p=0.25"])
    assert str(e.value).startswith("--set: augment.train.3: '3' is not an index of this list (it has 1 items)")


def test_set_takes_brackets_for_list_items_and_refuses_keys_inside_scalars(tmp_path):
    p = write(tmp_path, BASE + "augment:\n  train:\n    - {name: HorizontalFlip, p: 0.5}\n")
    assert load_config(p, ["augment.train[0].p=0.1"]).config.augment.train[0]["p"] == 0.1
    for override, message in (("seed.x=1", "--set: seed: cannot set 'x' inside seed: it is 0, not a mapping"),
                              ("task=[a]", "--set: task: must be a task name, not ['a']"),
                              ("seed=99999999999999999999", "--set: seed: must be <= 4294967295"),
                              ("stages=[load, trian]", "--set: stages: unknown stage 'trian'")):
        with pytest.raises(ConfigError) as e:
            load_config(p, [override])
        assert str(e.value).startswith(message), override


def test_stages_need_the_stages_they_build_on(tmp_path):
    with pytest.raises(ConfigError, match="stage 'train' needs 'load' and 'model' before it"):
        load_config(write(tmp_path, BASE + "stages: [train]\n"))
    with pytest.raises(ConfigError, match="stage 'evaluate' needs 'load' before it"):
        load_config(write(tmp_path, BASE + "stages: [model, evaluate, load]\n"))
    assert load_config(write(tmp_path, BASE + "stages: [load, augment, model, export]\n")).config.stages[-1] == "export"


@pytest.mark.parametrize("text, message", [
    (BASE + "train:\n  epochs: 5\n", "p.yaml:10: duplicate key 'train' (first at line 5)"),
    (BASE + "x: &a [*a]\n", "p.yaml:10: a YAML alias refers to a value that contains it"),
    (BASE + "a: &a [1, 1, 1, 1, 1, 1, 1, 1, 1, 1]\n"
     + "".join(f"{c}: &{c} [{', '.join(['*' + p] * 10)}]\n" for p, c in zip("abcde", "bcdef", strict=True)),
     "the YAML expands to more than 100,000 values"),
])
def test_yaml_duplicates_and_alias_bombs_are_refused(tmp_path, text, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_config(write(tmp_path, text))


def test_unknown_predict_option_is_a_config_error_at_load(tmp_path):
    p = write(tmp_path, BASE + "predict:\n  source: data\n  options: {top_kk: 3}\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:12: predict.options.top_kk: unknown predict option 'top_kk'")
    assert "did you mean 'top_k'" in str(e.value)


def test_an_unknown_classification_model_is_caught_at_load(tmp_path):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, BASE + "model:\n  name: resnet999\n"))
    assert "p.yaml:11: model.name: unknown torchvision classification model 'resnet999'" in str(e.value)


def test_predict_top_k_is_checked_by_the_task(tmp_path):
    p = write(tmp_path, BASE + "predict:\n  source: data\n  top_k: 0\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert str(e.value).startswith(f"{p}:12: predict.top_k: must be >= 1 (got 0)")
    assert load_config(p, ["predict.top_k=3"]).config.predict.top_k == 3
