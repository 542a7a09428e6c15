"""Errors a user can cause. Each message is one sentence that names the fix."""

from __future__ import annotations


class DriftpromptError(Exception):
    """Base class of every user-facing error; the CLI prints the message without a traceback."""


class ConfigError(DriftpromptError):
    """A configuration file, key, value or override is wrong."""


class PluginError(DriftpromptError):
    """A strategy or stream cannot be found, is registered twice, or failed while running."""


class BackboneError(DriftpromptError):
    """A backbone cannot be built or its weights cannot be loaded."""


class CheckpointError(DriftpromptError):
    """A checkpoint is missing, unreadable or belongs to another run or model."""


class StreamError(DriftpromptError):
    """A stream cannot be built from the given data or options."""
