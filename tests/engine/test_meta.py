"""Every hook of the plugin contract is documented and exercised by a test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from driftprompt.engine import hookspecs

ROOT = Path(__file__).resolve().parents[2]
ALL_HOOKS = hookspecs.EVENT_HOOKS + hookspecs.QUERY_HOOKS + hookspecs.DISCOVERY_HOOKS


def test_hook_lists_match_the_hookspec_module():
    declared = {name for name, obj in vars(hookspecs).items() if callable(obj) and hasattr(obj, "driftprompt_spec")}
    assert declared == set(ALL_HOOKS)


@pytest.mark.parametrize("hook", ALL_HOOKS)
def test_every_hook_has_an_entry_in_docs(hook):
    text = (ROOT / "docs" / "events.md").read_text()
    assert f"### `{hook}`" in text, f"docs/events.md has no section for '{hook}'"


@pytest.mark.parametrize("hook", ALL_HOOKS)
def test_every_hook_is_exercised_by_a_test(hook):
    # Event hooks are all implemented by the recorder of test_events.py (built from EVENT_HOOKS);
    # query and discovery hooks must be implemented explicitly by some test or test fixture.
    if hook in hookspecs.EVENT_HOOKS:
        source = (ROOT / "tests" / "engine" / "test_events.py").read_text()
        assert "for _name in EVENT_HOOKS" in source
        return
    pattern = re.compile(rf"def {hook}\(")
    hits = [p for p in (ROOT / "tests").rglob("*.py") if p.name != "test_meta.py" and pattern.search(p.read_text())]
    assert hits, f"no test implements the '{hook}' hook"
