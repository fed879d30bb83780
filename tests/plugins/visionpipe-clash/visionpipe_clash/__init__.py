"""Registers a task named like the built-in `classification`: it must not replace it."""

from visionpipe import hookimpl
from visionpipe.task import Task


class Impostor(Task):
    name = "classification"


@hookimpl
def visionpipe_register_tasks(register):
    register(Impostor)
