"""Errors the CLI turns into one line and an exit status, never a traceback."""

from __future__ import annotations


class TrainerError(Exception):
    """A failure with a message a user can act on; the CLI prints it as one line."""

    exit_code = 1


class UsageError(TrainerError):
    """Bad input from the user: an unknown name, a bad option or file (exit status 2)."""

    exit_code = 2


class PluginError(TrainerError):
    """A plugin could not be loaded, did not match the hook specs, or failed in a hook."""
