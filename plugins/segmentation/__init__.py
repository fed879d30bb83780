"""Semantic segmentation with torchvision models (FCN, DeepLabV3, LR-ASPP)."""

from visionpipe import hookimpl
from visionpipe_plugins.segmentation.task import SegmentationTask


@hookimpl
def visionpipe_register_tasks(register):
    """Register the segmentation task."""
    register(SegmentationTask)
