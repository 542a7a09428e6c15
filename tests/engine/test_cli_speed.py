"""--help, plugins and compare answer without importing torch (seconds of import time saved)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from .test_compare import fake_run

PROBE = "import sys\nfrom driftprompt.engine.cli import main\ntry:\n    main({argv!r})\nexcept SystemExit:\n    pass\nprint('TORCH', 'torch' in sys.modules)\n"


def imports_torch(argv: list[str]) -> bool:
    done = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True, text=True, timeout=120)
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("TORCH"), done.stdout + done.stderr
    return last.endswith("True")


@pytest.mark.parametrize("argv", [["--help"], ["plugins"], ["plugins", "l2p"], ["config", "--schema"]])
def test_the_quick_commands_do_not_import_torch(argv):
    assert not imports_torch(argv)


def test_compare_does_not_import_torch(tmp_path):
    runs = [fake_run(tmp_path, f"r{s}", ["finetune"], s, 60.0 + s) for s in (0, 1)]
    assert not imports_torch(["compare", *map(str, runs)])


def test_the_probe_sees_torch_when_a_command_imports_it():
    assert imports_torch(["plugins", "l2p", "--debug", "--schema"]) is False  # an error: still no torch
    done = subprocess.run([sys.executable, "-c", "import sys, driftprompt.engine.run; print('torch' in sys.modules)"], capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "True"  # the check can fail: the run machinery does import torch
