"""driftprompt's engine: events, the plugin contract, the state and the loops.

Strategy authors need only::

    from driftprompt.engine import hookimpl, State
"""

from .errors import BackboneError, CheckpointError, ConfigError, DriftpromptError, PluginError, StreamError
from .events import Event
from .hookspecs import hookimpl, hookspec
from .prompts import Prompts
from .state import State

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
