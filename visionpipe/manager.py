"""Plugin manager: loads every plugin of the ``visionpipe`` entry-point group, one path for all."""

from __future__ import annotations

import functools
import logging
import traceback
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pluggy

from visionpipe import hookspecs
from visionpipe.errors import VisionpipeError, did_you_mean, unknown_name

if TYPE_CHECKING:
    from visionpipe.pipeline import StageDef
    from visionpipe.task import Task

log = logging.getLogger(__name__)
ENTRY_POINT_GROUP = "visionpipe"


@dataclass
class PluginInfo:
    """What `visionpipe plugins` shows for one plugin."""

    name: str
    entry_point: str
    distribution: str | None
    version: str | None
    tasks: list[str] = field(default_factory=list)
    stages: list[str] = field(default_factory=list)
    error: str | None = None
    detail: str | None = None
    warnings: list[str] = field(default_factory=list)


def _builtin(info: PluginInfo) -> bool:
    """Whether ``info`` is one of visionpipe's own plugins (its distribution is visionpipe)."""
    return info.distribution == "visionpipe"


class PluginManager:
    """A pluggy manager plus the registries that plugins fill."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager("visionpipe")
        self.pm.add_hookspecs(hookspecs)
        self.infos: list[PluginInfo] = []
        self._tasks: dict[str, type[Task]] | None = None
        self._stages: dict[str, StageDef] | None = None
        self._task_owner: dict[str, str] = {}
        if load_entry_points:
            self.load_entry_points()

    @property
    def hook(self) -> Any:
        """The pluggy hook relay (``manager.hook.visionpipe_before_stage(...)``)."""
        return self.pm.hook

    def load_entry_points(self) -> None:
        """Import every entry point of the group; record failures instead of raising.

        visionpipe's own plugins load first, so a third-party plugin that takes one of their names
        (plugin, task or stage) is the one refused."""
        def builtin_first(ep: Any) -> tuple[bool, str]:
            dist = getattr(ep, "dist", None)
            return (dist is None or dist.name != "visionpipe", ep.name)

        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=builtin_first):
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, f"{ep.group}.{ep.name} = {ep.value}",
                              dist.name if dist else None, dist.version if dist else None)
            # a built-in keeps its name even when it failed to load (e.g. a missing dependency)
            taken = next((i for i in self.infos if i.name == ep.name and (not i.error or _builtin(i))), None)
            self.infos.append(info)
            if taken is not None:
                info.error = (f"the plugin name '{ep.name}' is already taken by {_origin(taken)}; "
                              "rename this entry point")
                continue
            try:
                plugin = ep.load()
                self.register(plugin, ep.name, info)
            except Exception as e:  # a broken plugin must not break the tool
                why = str(e) if isinstance(e, VisionpipeError) else f"{type(e).__name__}: {e}"
                info.error = " ".join(why.split())  # one line (pluggy's messages have several)
                info.detail = traceback.format_exc()
                log.debug("plugin %s failed to load", ep.name, exc_info=True)

    def register(self, plugin: ModuleType | object, name: str | None = None, info: PluginInfo | None = None) -> None:
        """Register a plugin object or module (tests use this for in-process plugins)."""
        if isinstance(plugin, type):
            raise VisionpipeError(f"plugin {plugin.__name__} is a class; register an instance or a module")
        self.pm.register(plugin, name=name)
        if info is None:
            info = PluginInfo(name or str(plugin), "<registered in code>", None, None)
        self._tasks = self._stages = None
        # collect what this plugin registers right away, so failures are attributed to it
        try:
            tasks = self._registered_by(plugin, "visionpipe_register_tasks")
            stages = self._registered_by(plugin, "visionpipe_register_stages")
            problem = self._clash(plugin, info, tasks, stages)
        except Exception as e:
            self.pm.unregister(plugin)
            raise e
        if problem:
            self.pm.unregister(plugin)
            raise VisionpipeError(problem)
        if not any(i is info for i in self.infos):
            self.infos.append(info)
        for caller in self.pm.get_hookcallers(plugin) or []:  # a failing hook names its plugin
            for impl in caller.get_hookimpls():
                if impl.plugin is plugin and not (impl.hookwrapper or impl.wrapper) \
                        and caller.name not in _REGISTRATION_HOOKS:
                    impl.function = _naming(impl.function, info, caller.name)
        info.tasks = [t.name for t in tasks]
        info.stages = [s.name for s in stages]

    def _clash(self, plugin: object, info: PluginInfo, tasks: list, stages: list) -> str | None:
        """Why ``plugin`` cannot be registered next to the plugins already loaded (None: it can)."""
        from visionpipe.config import STAGE_ORDER, PipelineConfig
        from visionpipe.task import Task

        specs = [n for n in dir(hookspecs) if n.startswith("visionpipe_")]
        for attr in dir(plugin):
            opts = self.pm.parse_hookimpl_opts(plugin, attr)
            hook = (opts or {}).get("specname") or attr
            if opts is not None and hook not in specs and not opts.get("optionalhook"):
                return f"{hook} is not a visionpipe hook{did_you_mean(hook, specs)} (hooks: {', '.join(specs)})"
        loaded = [i for i in self.infos if i is not info and not i.error]
        for t in tasks:
            name = getattr(t, "name", None)
            if not (isinstance(t, type) and issubclass(t, Task)):
                return f"registered {t!r}, which is not a subclass of visionpipe.task.Task"
            if not isinstance(name, str) or not name:
                return f"task class {getattr(t, '__name__', t)!r} has no name (set the class attribute `name`)"
            if not (isinstance(t.Config, type) and issubclass(t.Config, PipelineConfig)):
                return f"task '{name}': Config must be a subclass of visionpipe.config.PipelineConfig (got {t.Config!r})"
            owner = next((i for i in loaded if name in i.tasks), None)
            if owner is not None:
                return f"task '{name}' is already registered by {_origin(owner)}; give this plugin's task another name"
            broken = next((i for i in self.infos if i is not info and i.error and _builtin(i) and i.name == name), None)
            if broken is not None and not _builtin(info):  # a built-in task's name, while that plugin failed to load
                return f"task '{name}' is the name of {_origin(broken)}, which failed to load; give this plugin's " \
                       "task another name"
        for st in stages:
            if st.name in STAGE_ORDER or st.name in PipelineConfig.model_fields:
                return f"stage '{st.name}' has the name of a built-in stage or pipeline key; give it another name"
            owner = next((i for i in loaded if st.name in i.stages), None)
            if owner is not None:
                return f"stage '{st.name}' is already registered by {_origin(owner)}; give this plugin's stage another name"
        return None

    def _registered_by(self, plugin: object, hook_name: str) -> list[Any]:
        """What ``plugin``'s implementations of register hook ``hook_name`` register (under any function name)."""
        found: list[Any] = []
        for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
            if impl.plugin is plugin:
                impl.function(register=found.append)
        return found

    @property
    def tasks(self) -> dict[str, type[Task]]:
        """Task name → task class, from every loaded plugin."""
        if self._tasks is None:
            out: dict[str, type[Task]] = {}
            for info in self.infos:
                if info.error:
                    continue
                plugin = self.pm.get_plugin(info.name)
                if plugin is None:
                    continue
                for t in self._registered_by(plugin, "visionpipe_register_tasks"):
                    if t.name in out:
                        log.warning("task %r from plugin %r shadows one registered earlier", t.name, info.name)
                    out[t.name] = t
                    self._task_owner[t.name] = info.name
            self._tasks = out
        return self._tasks

    @property
    def stages(self) -> dict[str, StageDef]:
        """Extra stage name → StageDef, from every loaded plugin."""
        if self._stages is None:
            found: list = []
            self.pm.hook.visionpipe_register_stages(register=found.append)
            self._stages = {s.name: s for s in found}
        return self._stages

    def register_commands(self, app: Any) -> None:
        """Let each loaded plugin add CLI commands; one that fails is recorded and warned about, the rest still run.

        A command named like one already there (``run``, another plugin's) is not added, and said so."""
        from typer.main import get_command_name

        def name_of(command: Any) -> str:
            return command.name or get_command_name(command.callback.__name__)

        def group_name(group: Any) -> str | None:  # app.add_typer(sub, name=...): a command with sub-commands
            info = getattr(getattr(group, "typer_instance", None), "info", None)
            return group.name or getattr(info, "name", None)

        infos = {i.name: i for i in self.infos}
        for impl in self.pm.hook.visionpipe_register_commands.get_hookimpls():
            before, before_groups = len(app.registered_commands), len(app.registered_groups)
            taken = {name_of(c) for c in app.registered_commands} | {group_name(g) for g in app.registered_groups}
            problems = []
            try:
                impl.function(**{name: app for name in impl.argnames})  # the spec's only argument is `app`
            except Exception as e:  # a plugin's CLI must not break ours or another plugin's
                problems.append(f"visionpipe_register_commands failed: {type(e).__name__}: {e}")
            added = app.registered_commands[before:]
            clashing = [c for c in added if name_of(c) in taken]
            if clashing:
                app.registered_commands[before:] = [c for c in added if c not in clashing]
                problems += [f"command '{name_of(c)}' is already a visionpipe command; not added" for c in clashing]
            groups = app.registered_groups[before_groups:]
            clashing_groups = [g for g in groups if group_name(g) in taken]
            if clashing_groups:
                app.registered_groups[before_groups:] = [g for g in groups if g not in clashing_groups]
                problems += [f"command '{group_name(g)}' is already a visionpipe command; not added"
                             for g in clashing_groups]
            for problem in problems:
                if impl.plugin_name in infos:
                    infos[impl.plugin_name].warnings.append(problem)
                log.warning("plugin %s: %s", impl.plugin_name, problem)

    def task(self, name: str) -> type[Task]:
        """The task class called ``name``; a clear error listing valid names otherwise."""
        tasks = self.tasks
        if name not in tasks:
            raise VisionpipeError(self.unknown_task(name))
        return tasks[name]

    def unknown_task(self, name: str) -> str:
        """The message for a task no loaded plugin registers; names the plugins that failed to load."""
        failed = [f"{i.name} ({i.error})" for i in self.infos if i.error]
        return unknown_name("task", name, self.tasks) + (
            f"; plugins that failed to load: {'; '.join(failed)} (see `visionpipe plugins`)" if failed else "")

    def owner_of(self, task: str) -> str | None:
        """Name of the plugin that registered ``task``."""
        _ = self.tasks  # loads plugins on first use
        return self._task_owner.get(task)


_REGISTRATION_HOOKS = ("visionpipe_register_tasks", "visionpipe_register_stages", "visionpipe_register_commands")


class PluginHookError(VisionpipeError):
    """A plugin's hook implementation raised something other than a VisionpipeError."""


def _naming(function: Any, info: PluginInfo, hook: str) -> Any:
    """``function``, with an unexpected exception turned into one line naming the plugin and the hook."""

    @functools.wraps(function)
    def call(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except VisionpipeError:
            raise
        except Exception as e:
            raise PluginHookError(f"{_origin(info)}: {hook} failed: {type(e).__name__}: {e}") from e

    return call


def _origin(info: PluginInfo) -> str:
    """``plugin 'x' (dist 1.0)`` for messages."""
    dist = f" ({info.distribution} {info.version or ''})".replace(" )", ")") if info.distribution else ""
    return f"plugin '{info.name}'{dist}"


_manager: PluginManager | None = None


def get_manager() -> PluginManager:
    """The process-wide plugin manager, created (and entry points loaded) on first use."""
    global _manager
    if _manager is None:
        _manager = PluginManager()
    return _manager


def reset_manager() -> None:
    """Forget the process-wide manager (tests; after installing a plugin)."""
    global _manager
    _manager = None
