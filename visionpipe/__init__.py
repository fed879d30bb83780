"""visionpipe: declarative, reproducible computer-vision pipelines."""

import os
from importlib.metadata import PackageNotFoundError, version

# No network at import time: albumentations asks PyPI for a newer version on every import
# (up to 2 s on a machine without internet, and a request users did not ask for).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

try:
    __version__ = version("visionpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from visionpipe.errors import ConfigError, VisionpipeError  # noqa: E402
from visionpipe.hookspecs import hookimpl  # noqa: E402

__all__ = ["ConfigError", "VisionpipeError", "__version__", "hookimpl"]
