"""Discovery, instantiation and error reporting of plugins."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from driftprompt.engine import ConfigError, PluginError, State, hookimpl
from driftprompt.engine.cli import main
from driftprompt.engine.plugins import BLOCK_ENV, discover
from driftprompt.engine.run import build

from ..conftest import registry_with, tiny_config

ROOT = Path(__file__).resolve().parents[2]

THIRD_PARTY = '''
"""A third-party strategy shipped in its own distribution."""
import json, os
from driftprompt.engine import hookimpl

class Scaled:
    """Cross-entropy on temperature-scaled logits; records the events it receives."""

    def __init__(self, temperature: float = 2.0):
        self.temperature = temperature
        self.events = []

    @hookimpl
    def trainable_parameters(self, state):
        return [{"params": list(state.head.parameters()), "name": "head", "role": "head"}]

    @hookimpl
    def loss_terms(self, state):
        import torch.nn.functional as F
        return {"scaled_ce": F.cross_entropy(state.logits.float() / self.temperature, state.targets)}

    @hookimpl
    def experience_start(self, state):
        self.events.append("experience_start")

    @hookimpl
    def before_optimizer_step(self, state):
        self.events.append("before_optimizer_step")

    @hookimpl
    def eval_end(self, state):
        self.events.append("eval_end")

    @hookimpl
    def fit_end(self, state):
        path = os.environ.get("SCALED_EVENTS_FILE")
        if path:
            with open(path, "w") as f:
                json.dump(self.events, f)

class Exploding:
    """Raises if it is ever constructed: proves unrequested plugins are never instantiated."""

    def __init__(self):
        raise RuntimeError("an unrequested plugin was instantiated")

@hookimpl
def register_strategies(register):
    register("scaled", Scaled)
    register("exploding", Exploding)
'''


@pytest.fixture
def third_party(tmp_path, monkeypatch):
    """A distribution 'acme-prompts' with an entry point, on sys.path (as pip would leave it)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "acme_strategy.py").write_text(THIRD_PARTY)
    info = site / "acme_prompts-1.2.3.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-prompts\nVersion: 1.2.3\n")
    (info / "entry_points.txt").write_text("[driftprompt]\nacme = acme_strategy\n")
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return site


def test_third_party_plugin_is_discovered_with_its_distribution(third_party):
    registry = discover()
    assert registry.strategies["scaled"].source == "acme-prompts"
    assert registry.strategies["scaled"].version == "1.2.3"
    assert registry.strategies["finetune"].source == "driftprompt"


def test_plugins_command_lists_strategies_and_distributions(third_party, capsys):
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[1]: line for line in out.splitlines()[1:] if line.strip()}
    assert "acme-prompts 1.2.3" in lines["scaled"] and "driftprompt" in lines["finetune"]
    assert "synthetic" in lines


def test_third_party_plugin_runs_through_launch_py_in_documented_order(third_party, tmp_path):
    cfg = tiny_config(strategies=[{"name": "scaled", "temperature": 3.0}], log={"tensorboard": False, "progress": False})
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(json.dumps(cfg))
    events_file = tmp_path / "events.json"
    env = {**os.environ, "SCALED_EVENTS_FILE": str(events_file)}
    proc = subprocess.run([sys.executable, str(ROOT / "launch.py"), str(cfg_path), "--run-dir", str(tmp_path / "run"), "-q"], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    per_exp = ["experience_start", "before_optimizer_step", "before_optimizer_step", "eval_end"]
    assert json.loads(events_file.read_text()) == per_exp * 2
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["strategies"] == ["scaled"] and len(summary["accuracy"]) == 2


def test_installed_plugin_never_changes_a_run_that_did_not_ask_for_it(third_party, make_config, monkeypatch):
    # 'exploding' raises when constructed: an unrequested strategy is never instantiated.
    with_plugin = build(make_config(), run_dir=None).fit()
    monkeypatch.setenv(BLOCK_ENV, "acme-prompts")
    without = build(make_config(), run_dir=None).fit()
    assert with_plugin["accuracy"] == without["accuracy"]


def test_block_env_var_hides_a_distribution(third_party, monkeypatch):
    monkeypatch.setenv(BLOCK_ENV, "acme-prompts")
    registry = discover()
    assert "scaled" not in registry.strategies
    assert any("acme" in b for b in registry.blocked)
    monkeypatch.setenv(BLOCK_ENV, "acme")  # the entry-point name works too
    assert "scaled" not in discover().strategies


def test_two_distributions_registering_one_name_is_an_error_naming_both(third_party):
    clash = third_party / "clash_strategy.py"
    clash.write_text("from driftprompt.engine import hookimpl\n\n@hookimpl\ndef register_strategies(register):\n    register('finetune', object)\n")
    info = third_party / "clash-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[driftprompt]\nclash = clash_strategy\n")
    with pytest.raises(PluginError, match=r"'finetune' is registered by both '(driftprompt|clash)' and '(clash|driftprompt)'"):
        discover()


def test_unknown_strategy_lists_the_available_ones(make_config):
    with pytest.raises(PluginError, match=r"Unknown strategy 'finetuned'; available: .*finetune.*ncm"):
        build(make_config(strategies=["finetuned"]), run_dir=None)


def test_unknown_strategy_option_names_the_options(make_config):
    with pytest.raises(ConfigError, match=r"Strategy 'finetune' has no option 'mask'; its options are: mask_current"):
        build(make_config(strategies=[{"name": "finetune", "mask": True}]), run_dir=None)


class Boom:
    @hookimpl
    def before_forward(self, state: State) -> None:
        if state.phase == "eval":
            raise ZeroDivisionError("bad maths")


def test_a_failing_plugin_is_named_with_its_event(make_config):
    run = build(make_config(strategies=["finetune", "boom"]), run_dir=None, registry=registry_with(boom=Boom))
    with pytest.raises(PluginError, match=r"Strategy 'boom' failed while handling 'before_forward': ZeroDivisionError: bad maths") as info:
        run.fit()
    assert isinstance(info.value.__cause__, ZeroDivisionError)


class Typo:
    @hookimpl
    def befor_forward(self, state: State) -> None:  # misspelt hook name
        pass


def test_a_misspelt_hook_is_rejected_before_training(make_config):
    with pytest.raises(PluginError, match="does not exist"):
        build(make_config(strategies=["typo"]), run_dir=None, registry=registry_with(typo=Typo))


def test_plugin_modules_load_a_local_file(tmp_path, make_config):
    path = tmp_path / "local_strategy.py"
    path.write_text(textwrap.dedent('''
        from driftprompt.engine import hookimpl
        class Noop:
            """Does nothing."""
        @hookimpl
        def register_strategies(register):
            register("noop_local", Noop)
    '''))
    registry = discover([str(path)])
    assert registry.strategies["noop_local"].source == str(path)


def test_wrapper_forward_sees_and_changes_the_result(make_config):
    class Halve:
        @hookimpl(wrapper=True)
        def forward(self, state):
            logits = yield
            return logits * 0.5

    seen = {}

    class Check:
        @hookimpl
        def after_forward(self, state):
            seen["ratio"] = float((state.logits / state.head(state.features)).detach().mean())

    run = build(make_config(strategies=["finetune", "halve", "check"]), run_dir=None, registry=registry_with(halve=Halve, check=Check))
    run.fit()
    assert seen["ratio"] == pytest.approx(0.5, rel=1e-5)


def test_a_plugin_stream_is_built_from_the_config(tmp_path, make_config):
    path = tmp_path / "my_stream.py"
    path.write_text(textwrap.dedent('''
        import torch
        from driftprompt.engine import hookimpl
        from driftprompt.streams import TensorImageDataset, class_incremental

        def stripes(n_experiences=2, image_size=16):
            """Horizontal or vertical stripes, two orientations per experience."""
            images, targets = [], []
            for c in range(4):
                img = torch.zeros(3, image_size, image_size, dtype=torch.uint8)
                if c % 2:
                    img[:, :, :: c + 1] = 255
                else:
                    img[:, :: c + 1, :] = 255
                images += [img] * 6
                targets += [c] * 6
            data = TensorImageDataset(torch.stack(images), targets)
            return class_incremental(data, data, n_experiences, seed=None, name="stripes")

        @hookimpl
        def register_streams(register):
            register("stripes", stripes)
    '''))
    config = make_config(plugin_modules=[str(path)], stream={"name": "stripes", "options": {"n_experiences": 2}}, strategies=["ncm"])
    summary = build(config, run_dir=None).fit()
    assert summary["accuracy"][0][0] == 100.0  # identical train and test images: the class means are exact
    with pytest.raises(ConfigError, match=r"Stream 'stripes' has no option 'n_exp'; its options are: n_experiences, image_size"):
        build(make_config(plugin_modules=[str(path)], stream={"name": "stripes", "options": {"n_exp": 2}}), run_dir=None)


def test_a_loss_that_reaches_no_trainable_parameter_is_explained(make_config):
    class Detached:
        @hookimpl
        def trainable_parameters(self, state):
            if state.phase == "train":
                return [{"params": list(state.head.parameters()), "name": "head", "role": "head"}]

        @hookimpl
        def loss_terms(self, state):
            return {"ce": torch.nn.functional.cross_entropy(state.logits.detach(), state.targets)}

    run = build(make_config(strategies=["detached"]), run_dir=None, registry=registry_with(detached=Detached))
    with pytest.raises(PluginError, match=r"loss terms \['ce'\] do not depend on any trainable parameter"):
        run.fit()


def test_an_adapter_inside_the_backbone_gets_gradients(make_config):
    grads = []

    class NormAdapter:
        """Trains the backbone's final-norm bias: a stand-in for adapters such as LoRA."""

        @hookimpl
        def init(self, state):
            state.backbone.model.norm.bias.requires_grad_(True)

        @hookimpl
        def trainable_parameters(self, state):
            if state.phase == "train":
                return [{"params": [state.backbone.model.norm.bias], "name": "norm_bias", "role": "adapter"}]

        @hookimpl
        def after_backward(self, state):
            grads.append(state.backbone.model.norm.bias.grad)

    run = build(make_config(strategies=["finetune", "adapter"]), run_dir=None, registry=registry_with(adapter=NormAdapter))
    run.fit()
    assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)


def test_same_entry_point_name_in_two_distributions_still_clashes_loudly(third_party):
    other = third_party / "acme2_strategy.py"
    other.write_text("from driftprompt.engine import hookimpl\n\n@hookimpl\ndef register_strategies(register):\n    register('scaled', object)\n")
    info = third_party / "acme_two-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-two\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[driftprompt]\nacme = acme2_strategy\n")
    with pytest.raises(PluginError, match=r"'scaled' is registered by both 'acme-(prompts|two)' and 'acme-(two|prompts)'"):
        discover()
