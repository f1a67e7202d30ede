"""trainer-core's built-in plugins, models and datasets.

Each is declared in ``pyproject.toml`` under the same entry-point groups a
third-party package uses; nothing here is special to the core.
"""
