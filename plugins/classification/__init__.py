"""Image classification with torchvision models (ResNet and friends)."""

from visionpipe import hookimpl
from visionpipe_plugins.classification.task import ClassificationTask


@hookimpl
def visionpipe_register_tasks(register):
    """Register the classification task."""
    register(ClassificationTask)
