"""driftprompt launcher: ``python launch.py --help``. The CLI itself is driftprompt.engine.cli."""

import sys

from driftprompt.engine.cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
