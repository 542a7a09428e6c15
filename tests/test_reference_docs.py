"""The reference pages and the built-in plugin metadata are generated from the code: the
committed files must equal what the code generates now."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from driftprompt.engine import reference
from driftprompt.engine.cli import main

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs" / "reference"
STALE = f"is out of date with the code; regenerate it with: {reference.REGENERATE}"


@pytest.fixture(scope="module")
def pages():
    return reference.reference_pages()


def test_every_committed_reference_page_matches_the_code(pages):
    for rel, text in pages.items():
        path = DOCS / rel
        assert path.is_file(), f"docs/reference/{rel} is missing; generate it with: {reference.REGENERATE}"
        assert path.read_text() == text, f"docs/reference/{rel} {STALE}"
    committed = {str(p.relative_to(DOCS)) for p in DOCS.rglob("*.md")}
    assert committed == set(pages), f"docs/reference holds pages the code no longer generates ({', '.join(sorted(committed - set(pages)))}); {reference.REGENERATE}"


def test_the_builtin_plugin_metadata_matches_the_code():
    assert reference.BUILTIN_JSON.read_text() == reference.builtin_json(), f"engine/builtin_plugins.json {STALE}"


def test_the_config_page_is_the_schema_rendered(pages):
    schema = reference.config_schema()
    text = pages["config.md"]
    for key in schema["properties"]:
        assert f"| `{key}` |" in text
    assert "| `runtime.threads` |" in text and "| `train.optimizer.lr` |" in text


def test_config_schema_prints_the_json_schema(capsys):
    assert main(["config", "--schema"]) == 0
    assert json.loads(capsys.readouterr().out) == reference.config_schema()


def test_a_strategy_that_sets_its_own_learning_rate_says_so(pages):
    assert "overrides `train.optimizer.lr`" in pages["strategies/l2p.md"]
    assert "overrides `train.optimizer.lr`" in pages["strategies/dualprompt.md"]
    assert "overrides" not in pages["strategies/ncm.md"]


def test_the_api_names_on_the_api_page_exist():
    from driftprompt.engine.adapter import OnlineAdapter
    from driftprompt.engine.config import load_config
    from driftprompt.engine.run import Run, build

    assert callable(load_config) and callable(build) and callable(Run.fit) and callable(OnlineAdapter)
    assert "strategies" in Run.__dataclass_fields__
    for module, qualname in reference.API:
        reference._resolve(module, qualname)  # raises AttributeError when a name went away


def test_plugins_name_prints_each_option_with_type_default_and_description(capsys):
    assert main(["plugins", "l2p"]) == 0
    out = capsys.readouterr().out
    line = next(x for x in out.splitlines() if x.startswith("pool_size"))
    assert line.split()[:3] == ["pool_size", "int", "10"] and "prompts in the pool" in line
    assert "overrides train.optimizer.lr" in out
    assert main(["plugins", "synthetic"]) == 0
    assert "num_classes" in capsys.readouterr().out
    assert main(["plugins", "no_such_strategy"]) == 2
    assert "Unknown strategy 'no_such_strategy'" in capsys.readouterr().err


def test_args_sections_are_parsed_with_continuation_lines():
    doc = """Summary.

    Args:
        alpha: first line
            and its continuation.
        beta (int): second.

    Returns:
        nothing: not an option.
    """
    assert reference.parse_args_section(doc) == {"alpha": "first line and its continuation.", "beta": "second."}


def test_the_example_adapt_config_validates():
    from driftprompt.engine.config import load_config

    config = load_config(ROOT / "configs" / "tpt_adapt_demo.yaml")
    assert config.backbone.kind == "clip" and [s.name for s in config.strategies] == ["tpt"]
    assert config.backbone.weights == "random"  # runs offline
