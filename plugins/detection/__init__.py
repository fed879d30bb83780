"""Object detection with torchvision's Faster R-CNN family (COCO, VOC and YOLO data; COCO metrics)."""

from visionpipe import hookimpl
from visionpipe_plugins.detection.task import DetectionTask


@hookimpl
def visionpipe_register_tasks(register):
    """Register the detection task."""
    register(DetectionTask)


@hookimpl
def visionpipe_register_commands(app):
    """Add `visionpipe evaluate-coco`."""
    from visionpipe_plugins.detection.cli import register

    register(app)
