"""visionpipe's built-in task plugins (import name ``visionpipe_plugins``), one package each.

Each is registered through the ``visionpipe`` entry-point group in pyproject.toml, exactly
like a third-party plugin package.
"""
