"""Command line: ``python launch.py`` and the ``driftprompt`` console script."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
import traceback
from pathlib import Path
from typing import Any, Sequence

from .config import load_config, validate
from .errors import DriftpromptError, RunFinished, RunInterrupted, describe
from .loggers import format_accuracy_matrix, format_summary, side_by_side
from .metrics import AccuracyMatrix
from .plugins import BLOCK_ENV, discover

DESCRIPTION = """\
driftprompt: continual and test-time prompt learning on frozen ViT and CLIP backbones.

  driftprompt                         run the offline demo (two strategies, tiny random ViT,
                                      synthetic class-incremental stream; about a minute on a CPU)
  driftprompt CONFIG.yaml [k=v ...]   run a config; overrides use dotted keys, values are YAML:
                                        train.epochs=3  strategies=[ncm]  strategies.0.mask_current=true
  driftprompt adapt CONFIG.yaml [k=v ...]
                                      test-time adaptation over the config's stream, one
                                      prediction per sample after its adaptation steps
  driftprompt --resume RUN_DIR        continue a killed run after its last finished experience
  driftprompt plugins [CONFIG.yaml]   list every strategy and stream, and where it comes from
                                      (with a config: its plugin_modules too)

Each run writes RUN_DIR/config.yaml (resolved), metrics.jsonl, tensorboard/, checkpoint.pt
(after every experience, written atomically) and summary.json.
"""

DEBUG_ENV = "DRIFTPROMPT_DEBUG"

EPILOG = f"Set {BLOCK_ENV}=name1,name2 to keep named external plugins from loading. Errors print one line; --debug or {DEBUG_ENV}=1 adds the traceback. What each error means: docs/failures.md."

# the run directory of the command in progress, for the resume hint after an interrupt
_current_run_dir: list[Path] = []

DEMO_STRATEGIES = ("finetune", "ncm")


def demo_config(strategy: str) -> dict[str, Any]:
    """The demo's config for one strategy: small enough for two CPU cores, real all the same."""
    return {
        "name": f"demo-{strategy}",
        "device": "auto",
        "backbone": {"name": "vit_small_patch16_224", "weights": "random", "kwargs": {"img_size": 32, "patch_size": 4, "depth": 4}},
        "stream": {"name": "synthetic", "options": {"num_classes": 10, "n_experiences": 5, "train_per_class": 100, "test_per_class": 50, "seed": 0}},
        "train": {"epochs": 3, "batch_size": 32, "optimizer": {"name": "adam", "lr": 0.001}},
        "eval": {"batch_size": 250},
        "strategies": [strategy],
    }


class _Parser(argparse.ArgumentParser):
    """argparse with the CLI's one-line errors (no usage block)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"error: {message[0].upper() + message[1:]}; see driftprompt --help.", file=sys.stderr)
        sys.exit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="driftprompt", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("items", nargs="*", metavar="CONFIG|plugins [key=value ...]", help="a YAML config, or 'plugins', followed by overrides")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    parser.add_argument("--run-dir", metavar="DIR", help="where to write this run (default runs/<name>-<time>)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    parser.add_argument("--debug", action="store_true", help=f"print the full traceback of an error (or set {DEBUG_ENV}=1)")
    return parser


def _print_result(summaries: list[dict[str, Any]]) -> None:
    blocks = []
    for summary in summaries:
        values = AccuracyMatrix.from_list(summary["accuracy"]).values
        title = f"{'+'.join(summary['strategies'])}: accuracy (%)"
        blocks.append(format_accuracy_matrix(values, title) + "\n\n" + format_summary({k: summary.get(k) for k in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer", "forward_transfer")}))
    print(side_by_side(blocks, gap=6))


def cmd_plugins(config_path: str | None = None) -> int:
    modules = load_config(config_path).plugin_modules if config_path else []
    registry = discover(modules)
    rows = [("kind", "name", "from", "description")]
    rows += [("strategy", e.name, f"{e.source} {e.version}".strip(), e.summary) for e in sorted(registry.strategies.values(), key=lambda e: e.name)]
    rows += [("stream", e.name, f"{e.source} {e.version}".strip(), e.summary) for e in sorted(registry.streams.values(), key=lambda e: e.name)]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row in rows:
        print("  ".join(col.ljust(w) for col, w in zip(row[:3], widths)) + "  " + row[3])
    for name in registry.blocked:
        print(f"blocked by {BLOCK_ENV}: {name}")
    for name, why in registry.broken.items():
        print(f"failed to load: {name}: {why}")
    return 0


def cmd_demo(run_root: str | None) -> int:
    from .run import build

    print("driftprompt demo: finetune vs ncm on a synthetic 5-experience class-incremental stream, tiny random ViT (no download).")
    summaries = []
    for strategy in DEMO_STRATEGIES:
        config = validate(demo_config(strategy))
        with build(config, Path(run_root) / config.name if run_root else "auto", mode="fit") as run:
            _current_run_dir[:] = [run.run_dir] if run.run_dir else []
            summaries.append(run.fit())
            print(f"{strategy}: logs in {run.run_dir}")
    _print_result(summaries)
    return 0


def cmd_run(config_path: str | None, overrides: Sequence[str], run_dir: str | None) -> int:
    from .run import build

    config = load_config(config_path, overrides)
    with build(config, run_dir or "auto", mode="fit") as run:
        _current_run_dir[:] = [run.run_dir] if run.run_dir else []
        print(f"run directory: {run.run_dir}")
        summary = run.fit()
    _print_result([summary])
    return 0


def cmd_adapt(config_path: str | None, overrides: Sequence[str], run_dir: str | None) -> int:
    from .run import build

    config = load_config(config_path, overrides)
    with build(config, run_dir or "auto", mode="adapt") as run:
        _current_run_dir[:] = [run.run_dir] if run.run_dir else []
        print(f"run directory: {run.run_dir}")
        result = run.adapt_stream()
    if run.state.dist.is_main:
        print(f"online accuracy: {result['online_accuracy']:.2f} over {result['samples']} samples, {result['seconds_per_sample'] * 1000:.1f} ms per sample")
        for domain, acc in result["per_domain"].items():
            print(f"  {domain}: {acc:.2f}")
    return 0


def cmd_resume(run_dir: str, extra: Sequence[str]) -> int:
    from .run import resume

    if extra:
        raise DriftpromptError("--resume takes no config or overrides: a resumed run keeps the config saved in its directory.")
    try:
        run = resume(run_dir)
    except RunFinished as done:
        print(done)
        return 0
    with run:
        _current_run_dir[:] = [Path(run_dir)]
        print(f"resuming {run.run_dir} at experience {run.loop.start}")
        summary = run.fit()
    _print_result([summary])
    return 0


def _on_sigterm(signum: int, frame: Any) -> None:
    raise RunInterrupted()


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python launch.py`` and ``driftprompt``; returns the exit status.

    Every failure ends in one line on stderr, ``error: <sentence>``, and a nonzero status:
    2 for errors a user can fix (config, plugins, data, checkpoints, files; an exception
    inside a strategy is named with the strategy and the event), 1 for any other exception,
    130 after SIGINT and 143 after SIGTERM (both finish the checkpoint being written and
    print the resume command). ``--debug`` or ``DRIFTPROMPT_DEBUG=1`` adds the traceback.
    """
    args = _parser().parse_intermixed_args(argv)
    debug = args.debug or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    items = list(args.items)
    _current_run_dir.clear()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        if args.resume:
            return cmd_resume(args.resume, items)
        if items[:1] == ["plugins"]:
            return cmd_plugins(items[1] if len(items) > 1 else None)
        if items[:1] == ["adapt"]:
            rest = items[1:]
            path = rest[0] if rest and "=" not in rest[0] else None
            return cmd_adapt(path, rest[1:] if path else rest, args.run_dir)
        if not items:
            return cmd_demo(args.run_dir)
        config_path = None if "=" in items[0] else items[0]
        overrides = items[1:] if config_path is not None else items
        return cmd_run(config_path, overrides, args.run_dir)
    except (KeyboardInterrupt, RunInterrupted) as exc:
        what = "SIGTERM" if isinstance(exc, RunInterrupted) else "SIGINT"
        where = _current_run_dir[0] if _current_run_dir else None
        if where is not None and (where / "checkpoint.pt").exists():
            hint = f"continue from the last checkpoint with: driftprompt --resume {where}"
        elif where is not None:
            hint = f"no checkpoint was written yet, so start again (or delete {where})"
        else:
            hint = "nothing was written"
        print(f"interrupted by {what}: {hint}", file=sys.stderr)
        return 143 if isinstance(exc, RunInterrupted) else 130
    except BaseException as exc:  # noqa: BLE001 - the last line of defence: one sentence, never a traceback
        if debug:
            traceback.print_exception(exc, file=sys.stderr)
        if isinstance(exc, SystemExit):  # argparse exits before this block: this came from a plugin
            print(f"error: Something called sys.exit({exc.code!r}) in the middle of the command; a plugin must raise an exception instead (--debug shows where).", file=sys.stderr)
            return 1
        print(f"error: {describe(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, (DriftpromptError, OSError)) else 1
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(main())
