"""Character-level RNNs: classify short strings, and a language model that generates text."""

from visionpipe import hookimpl
from visionpipe_plugins.charrnn.classify import CharRnnClassifyTask
from visionpipe_plugins.charrnn.generate import CharRnnGenerateTask
from visionpipe_plugins.charrnn.threads import (  # noqa: F401  (run hooks of this plugin)
    visionpipe_after_run,
    visionpipe_before_run,
    visionpipe_on_stage_error,
)


@hookimpl
def visionpipe_register_tasks(register):
    """Register the charrnn_classify and charrnn_generate tasks."""
    register(CharRnnClassifyTask)
    register(CharRnnGenerateTask)
