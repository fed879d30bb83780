"""visionpipe: declarative, reproducible computer-vision pipelines."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("visionpipe")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0"

from visionpipe.errors import ConfigError, VisionpipeError  # noqa: E402
from visionpipe.hookspecs import hookimpl  # noqa: E402

__all__ = ["ConfigError", "VisionpipeError", "__version__", "hookimpl"]
