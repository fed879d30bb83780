"""Image generation with a DCGAN: generator + discriminator trained by the shared engine."""

from visionpipe import hookimpl
from visionpipe_plugins.dcgan.task import DcganTask


@hookimpl
def visionpipe_register_tasks(register):
    """Register the dcgan task."""
    register(DcganTask)
