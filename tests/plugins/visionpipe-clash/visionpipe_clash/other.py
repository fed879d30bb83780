"""A plugin whose entry point takes the name of the built-in `classification` plugin."""

from visionpipe import hookimpl
from visionpipe.task import Task


class Other(Task):
    name = "clash_other"


@hookimpl
def visionpipe_register_tasks(register):
    register(Other)
