"""Built-in strategies. Each module registers itself through the ``driftprompt`` entry points,
exactly as a third-party plugin does."""
