"""A plugin that cannot be imported: its backend is missing."""

import foo_backend_that_does_not_exist  # noqa: F401
