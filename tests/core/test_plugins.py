"""Plugins load through the `visionpipe` entry-point group: built-ins, a third-party package, a broken one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, run_cli
from visionpipe.manager import PluginManager

PLUGINS = REPO / "tests" / "plugins"
BUILTIN_TASKS = {"classification"}


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """Install the test plugin packages (hello: adds a task; broken: fails to import; clash: takes built-in
    names) into a site folder."""
    target = tmp_path_factory.mktemp("site")
    for pkg in ("visionpipe-hello", "visionpipe-broken", "visionpipe-clash"):
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                        "--no-index", "--target", str(target), str(PLUGINS / pkg)], check=True,
                       capture_output=True, text=True)
    return target


def env_with(site: Path) -> dict:
    return {"PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])}


def test_plugins_help_says_how_to_write_one(tmp_path):
    text = " ".join(run_cli("plugins", "--help", cwd=tmp_path, env={"COLUMNS": "200"}).stdout.split())
    assert "entry point in the 'visionpipe' group" in text and "visionpipe/hookspecs.py" in text
    assert "required methods: build_data, build_model, training_step, evaluate" in text


def test_builtin_tasks_come_from_entry_points():
    mgr = PluginManager()
    by_name = {i.name: i for i in mgr.infos}
    assert by_name["classification"].entry_point == "visionpipe.classification = visionpipe_plugins.classification"
    assert by_name["classification"].distribution == "visionpipe"
    assert BUILTIN_TASKS <= set(mgr.tasks)
    assert mgr.owner_of("classification") == "classification"


def test_registering_a_class_instead_of_an_instance_is_refused():
    from visionpipe.errors import VisionpipeError

    class NotAnInstance:
        pass

    with pytest.raises(VisionpipeError, match="is a class; register an instance or a module"):
        PluginManager(load_entry_points=False).register(NotAnInstance)


def test_plugins_command_lists_third_party_and_broken(site, tmp_path):
    proc = run_cli("plugins", "--json", cwd=tmp_path, env=env_with(site))
    rows = {r["name"]: r for r in json.loads(proc.stdout) if r["distribution"] != "visionpipe-clash"}
    assert rows["hello"]["tasks"] == ["hello"] and rows["hello"]["version"] == "0.3.0"
    assert rows["hello"]["distribution"] == "visionpipe-hello" and rows["hello"]["error"] is None
    assert "ModuleNotFoundError" in rows["broken"]["error"] and "foo_backend_that_does_not_exist" in rows["broken"]["error"]
    assert rows["classification"]["error"] is None and "resnet18" in rows["classification"]["models"]
    table = run_cli("plugins", cwd=tmp_path, env=env_with(site)).stdout
    assert "hello" in table and "failed" in table
    debug = run_cli("--debug", "plugins", cwd=tmp_path, env=env_with(site)).stderr
    assert "plugin broken: Traceback" in debug and "import foo_backend_that_does_not_exist" in debug


def test_a_plugin_taking_a_builtin_name_is_refused_and_the_builtin_still_works(site, tmp_path, tiny_pipeline):
    proc = run_cli("plugins", "--json", cwd=tmp_path, env=env_with(site))
    rows = [r for r in json.loads(proc.stdout) if r["name"] in ("classification", "zclash")]
    builtin, taken_name, taken_task = sorted(rows, key=lambda r: (r["distribution"] != "visionpipe", r["name"]))
    assert builtin["distribution"] == "visionpipe" and builtin["error"] is None and builtin["tasks"] == ["classification"]
    assert taken_name["distribution"] == "visionpipe-clash" and taken_name["error"] == (
        "the plugin name 'classification' is already taken by plugin 'classification' (visionpipe 0.1.0); "
        "rename this entry point")
    assert taken_task["name"] == "zclash" and taken_task["error"] == (
        "task 'classification' is already registered by plugin 'classification' (visionpipe 0.1.0); "
        "give this plugin's task another name")
    proc = run_cli("validate", str(tiny_pipeline()), cwd=tmp_path, env=env_with(site))
    assert "image_size" in proc.stdout  # the built-in task's schema, not the impostor's
    proc = run_cli("validate", str(tiny_pipeline()), "--set", "task=hello_typo", cwd=tmp_path, env=env_with(site),
                   check=False)
    assert proc.returncode == 2 and "plugins that failed to load: broken (ModuleNotFoundError" in proc.stderr


def test_hooks_that_are_no_hooks_and_clashing_stages_are_refused_naming_the_plugin():
    from visionpipe import hookimpl
    from visionpipe.errors import VisionpipeError
    from visionpipe.pipeline import StageDef
    from visionpipe.task import Task

    class Typo:
        @hookimpl
        def visionpipe_register_task(self, register):  # missing "s": would silently register nothing
            pass

    class Report:
        def __init__(self, stage: str) -> None:
            self.stage = stage

        @hookimpl
        def visionpipe_register_stages(self, register):
            register(StageDef(self.stage, lambda ctx, block: None))

    class Registers:
        def __init__(self, task) -> None:
            self.task = task

        @hookimpl
        def visionpipe_register_tasks(self, register):
            register(self.task)

    class PlainConfig(Task):
        name = "plain"
        Config = dict

    mgr = PluginManager(load_entry_points=False)
    with pytest.raises(VisionpipeError, match=r"task 'plain': Config must be a subclass of visionpipe.config.PipelineConfig"):
        mgr.register(Registers(PlainConfig), "plain")
    with pytest.raises(VisionpipeError, match=r"registered <function .*>, which is not a subclass of visionpipe.task.Task"):
        mgr.register(Registers(lambda: None), "func")
    with pytest.raises(VisionpipeError, match="visionpipe_register_task is not a visionpipe hook; "
                                              "did you mean 'visionpipe_register_tasks'"):
        mgr.register(Typo(), "typo")
    with pytest.raises(VisionpipeError, match="stage 'export' has the name of a built-in stage"):
        mgr.register(Report("export"), "exporter")
    class Renamed:
        @hookimpl(specname="visionpipe_on_epoch_end")  # pluggy's way to implement a hook under another name
        def log_epoch(self, ctx, epoch, metrics):
            pass

    mgr.register(Renamed(), "renamed")
    mgr.register(Report("report"), "first")
    with pytest.raises(VisionpipeError, match="stage 'report' is already registered by plugin 'first'"):
        mgr.register(Report("report"), "second")
    assert [i.name for i in mgr.infos] == ["renamed", "first"] and list(mgr.stages) == ["report"]


def test_register_hooks_under_another_function_name_are_collected_and_checked():
    """pluggy's specname= lets a plugin name its hook functions freely; the registry reads them like the others."""
    from visionpipe import hookimpl
    from visionpipe.errors import VisionpipeError
    from visionpipe.pipeline import StageDef

    Sum, _ = _sum_regression("renamed_sum", with_val=False)

    class Renamed:
        def __init__(self, stage: str) -> None:
            self.stage = stage

        @hookimpl(specname="visionpipe_register_tasks")
        def tasks(self, register):
            register(Sum)

        @hookimpl(specname="visionpipe_register_stages")
        def stages(self, register):
            register(StageDef(self.stage, lambda ctx, block: None))

    mgr = PluginManager(load_entry_points=False)
    mgr.register(Renamed("summary"), "renamed")  # its task was silently missing from mgr.tasks
    assert mgr.task("renamed_sum") is Sum and list(mgr.stages) == ["summary"]
    with pytest.raises(VisionpipeError, match="stage 'export' has the name of a built-in stage"):  # was not checked
        PluginManager(load_entry_points=False).register(Renamed("export"), "again")


def test_broken_plugin_does_not_break_other_commands(site, tmp_path, tiny_pipeline):
    proc = run_cli("validate", str(tiny_pipeline()), cwd=tmp_path, env=env_with(site))
    assert "task: classification" in proc.stdout


def test_third_party_task_runs_a_full_pipeline(site, tmp_path):
    p = tmp_path / "hello.yaml"
    p.write_text("task: hello\nload: {root: imgs, generate: 24, size: 16}\nmodel: {width: 4}\n"
                 "train: {epochs: 2, batch_size: 4, optimizer: {name: adamw, lr: 0.01}}\nevaluate: {}\nexport: {}\n"
                 "predict: {source: imgs}\n")
    run_cli("run", str(p), "--run-dir", "out", cwd=tmp_path, env=env_with(site))
    out = tmp_path / "out"
    metrics = json.loads((out / "metrics.json").read_text())
    assert "val/mae" in metrics and metrics["val/mae"] >= 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["versions"]["plugins"]["hello"]["version"] == "0.3.0"
    assert (out / "model.onnx").is_file()
    lines = (out / "predictions" / "predictions.jsonl").read_text().splitlines()
    assert len(lines) == 24 and "brightness" in json.loads(lines[0])


def test_a_plugin_whose_commands_hook_fails_leaves_the_others_commands(tmp_path):
    import typer

    from visionpipe import hookimpl

    class FailingCommands:
        @hookimpl
        def visionpipe_register_commands(self, app):
            raise RuntimeError("cmd boom")

    class GoodCommands:
        @hookimpl
        def visionpipe_register_commands(self, app):
            @app.command("hello-cmd")
            def hello_cmd() -> None:
                """Say hello."""

    mgr = PluginManager(load_entry_points=False)
    mgr.register(GoodCommands(), "good")
    mgr.register(FailingCommands(), "zbad")  # pluggy calls later registrations first
    app = typer.Typer()
    mgr.register_commands(app)
    assert [c.name for c in app.registered_commands] == ["hello-cmd"]
    infos = {i.name: i for i in mgr.infos}
    assert infos["zbad"].warnings == ["visionpipe_register_commands failed: RuntimeError: cmd boom"]
    assert infos["zbad"].error is None and infos["good"].warnings == []


def test_a_plugin_command_cannot_replace_a_builtin_one():
    import typer

    from visionpipe import hookimpl
    from visionpipe.cli import app as cli_app

    class Hijack:
        @hookimpl
        def visionpipe_register_commands(self, app):
            @app.command("run")
            def hijack() -> None:
                """Not visionpipe's run."""

            @app.command()
            def extra_thing() -> None:
                """A command of its own."""

            group = typer.Typer()
            app.add_typer(group, name="export")  # a group of sub-commands under a built-in's name

            @group.command()
            def other() -> None:
                """Not visionpipe's export."""

    app = typer.Typer()
    app.registered_commands = list(cli_app.registered_commands)  # the built-in commands, without plugins'
    mgr = PluginManager(load_entry_points=False)
    mgr.register(Hijack(), "hijack")
    mgr.register_commands(app)
    runs = [c for c in app.registered_commands if (c.name or c.callback.__name__) == "run"]
    assert len(runs) == 1 and runs[0].callback.__module__ == "visionpipe.cli"
    assert app.registered_commands[-1].callback.__name__ == "extra_thing"
    assert app.registered_groups == []
    assert mgr.infos[0].warnings == ["command 'run' is already a visionpipe command; not added",
                                     "command 'export' is already a visionpipe command; not added"]


def test_a_plugin_stage_writes_in_the_run_folder_and_cannot_leave_it(tmp_path, tiny_pipeline):
    """README's `report:` stage example, with a file name that would leave the run folder."""
    from pydantic import Field

    from visionpipe import hookimpl
    from visionpipe.config import Block
    from visionpipe.errors import UnsafePathError
    from visionpipe.io import write_json
    from visionpipe.pipeline import StageDef, run_pipeline

    class ReportConfig(Block):
        file: str = Field("report.json")

    class Report:
        @hookimpl
        def visionpipe_register_stages(self, register):
            register(StageDef("report", lambda ctx, block: write_json(ctx.path(block.file), {"ok": 1}), ReportConfig))

    mgr = PluginManager()
    mgr.register(Report(), "report")
    pipeline = tiny_pipeline(extra="report: {file: sub/report.json}\n")
    run_pipeline(str(pipeline), ["stages=[report]"], run_dir=str(tmp_path / "ok"), manager=mgr)
    assert json.loads((tmp_path / "ok" / "sub" / "report.json").read_text()) == {"ok": 1}
    with pytest.raises(UnsafePathError, match=r"run-folder path '../escape.json' resolves to .*, outside its root"):
        run_pipeline(str(pipeline), ["stages=[report]", "report.file=../escape.json"], run_dir=str(tmp_path / "bad"),
                     manager=mgr)
    assert not (tmp_path / "escape.json").exists()


def _sum_regression(task_name: str, with_val: bool, takes_pretrained: bool = True) -> tuple[type, PluginManager]:
    """A tiny in-code task learning x -> sum(x), and a plugin manager whose only plugin registers it."""
    import torch
    from torch import nn
    from torch.utils.data import TensorDataset

    from visionpipe import hookimpl
    from visionpipe.task import DataBundle, Task

    class Sum(Task):
        name = task_name

        def build_data(self):
            x = torch.rand(8, 4)
            data = TensorDataset(x, x.sum(1, keepdim=True))
            return DataBundle(train=data, val=data if with_val else None)

        def training_step(self, model, batch):
            return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1])}

    if takes_pretrained:
        Sum.build_model = lambda self, info, *, pretrained=True: nn.Linear(4, 1)
    else:  # written before `pretrained` existed
        Sum.build_model = lambda self, info: nn.Linear(4, 1)

    class Plugin:
        @hookimpl
        def visionpipe_register_tasks(self, register):
            register(Sum)

    mgr = PluginManager(load_entry_points=False)
    mgr.register(Plugin(), task_name)
    return Sum, mgr


def test_a_task_missing_a_required_method_is_named_in_the_error(tmp_path):
    from visionpipe.pipeline import run_pipeline

    _, mgr = _sum_regression("mini", with_val=True)  # no evaluate(), though it has a val split
    p = tmp_path / "mini.yaml"
    p.write_text("task: mini\ndevice: cpu\nload: {}\nmodel: {}\ntrain: {epochs: 1, batch_size: 4}\n")
    with pytest.raises(NotImplementedError, match=r"^task mini does not implement Task.evaluate\(\) \(validation"):
        run_pipeline(str(p), run_dir=str(tmp_path / "run"), manager=mgr)


def test_a_hook_that_raises_is_one_line_naming_its_plugin(tmp_path, tiny_pipeline):
    from visionpipe import hookimpl
    from visionpipe.manager import PluginHookError
    from visionpipe.pipeline import run_pipeline

    class Notifier:
        @hookimpl
        def visionpipe_before_run(self, ctx):
            raise KeyError("SLACK_TOKEN")

    mgr = PluginManager()
    mgr.register(Notifier(), "notifier")
    with pytest.raises(PluginHookError) as e:
        run_pipeline(str(tiny_pipeline()), ["stages=[load]"], run_dir=str(tmp_path / "run"), manager=mgr)
    assert str(e.value) == "plugin 'notifier': visionpipe_before_run failed: KeyError: 'SLACK_TOKEN'"
    assert isinstance(e.value.__cause__, KeyError)  # --debug shows the plugin's traceback


def test_the_example_plugin_prepares_images_the_same_in_training_and_predict(tmp_path):
    """README points plugin authors at visionpipe-hello: its training and predict inputs must agree."""
    import cv2
    import numpy as np

    sys.path.insert(0, str(PLUGINS / "visionpipe-hello"))
    try:
        from visionpipe_hello import HelloPredictor, Images
    finally:
        sys.path.pop(0)
    img = np.zeros((40, 64, 3), np.uint8)
    img[:, 32:] = 255  # dark left half, bright right half: a crop and a resize differ
    cv2.imwrite(str(tmp_path / "a.png"), img)
    x, y = Images([str(tmp_path / "a.png")], 16)[0]
    inputs, _ = HelloPredictor({"size": 16}, {}).preprocess(img)
    assert np.array_equal(x.numpy(), inputs["images"]) and abs(float(y) - 0.5) < 0.05


def test_a_task_whose_build_model_takes_no_pretrained_runs_and_resumes(tmp_path):
    from visionpipe.pipeline import run_pipeline

    _, mgr = _sum_regression("old", with_val=False, takes_pretrained=False)
    p = tmp_path / "old.yaml"
    p.write_text("task: old\ndevice: cpu\nload: {}\nmodel: {}\ntrain: {epochs: 1, batch_size: 4}\n")
    run_pipeline(str(p), run_dir=str(tmp_path / "run"), manager=mgr)
    ctx = run_pipeline(None, ["train.epochs=2"], resume=str(tmp_path / "run"), manager=mgr)
    assert ctx.metrics["train/epochs"] == 2
def test_a_builtin_task_name_stays_reserved_while_its_plugin_failed_to_load():
    from visionpipe import hookimpl
    from visionpipe.errors import VisionpipeError
    from visionpipe.manager import PluginInfo
    from visionpipe_plugins.detection.task import DetectionTask

    class Impostor(DetectionTask):
        pass

    class Registers:
        @hookimpl
        def visionpipe_register_tasks(self, register):
            register(Impostor)

    mgr = PluginManager(load_entry_points=False)
    mgr.infos.append(PluginInfo("detection", "visionpipe.detection = visionpipe_plugins.detection", "visionpipe",
                                "0.1.0", error="ModuleNotFoundError: No module named 'pycocotools'"))
    third = PluginInfo("foo", "visionpipe.foo = foo", "visionpipe-foo", "1.0")
    with pytest.raises(VisionpipeError, match="task 'detection' is the name of .*which failed to load"):
        mgr.register(Registers(), "foo", third)  # was: took over `task: detection` pipelines
