"""driftprompt's engine: events, the plugin contract, the state and the loops.

Strategy authors need only::

    from driftprompt.engine import hookimpl, State
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .errors import BackboneError, CheckpointError, ConfigError, DriftpromptError, PluginError, StreamError
from .events import Event
from .hookspecs import hookimpl, hookspec

if TYPE_CHECKING:
    from .prompts import Prompts
    from .state import State


def __getattr__(name: str) -> Any:
    # Prompts and State need torch; importing them on first use keeps the command line's
    # --help, plugins and compare free of torch's import time.
    if name == "Prompts":
        from .prompts import Prompts

        return Prompts
    if name == "State":
        from .state import State

        return State
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "BackboneError",
    "CheckpointError",
    "ConfigError",
    "DriftpromptError",
    "Event",
    "PluginError",
    "Prompts",
    "State",
    "StreamError",
    "hookimpl",
    "hookspec",
]
