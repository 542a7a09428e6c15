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
from .errors import ConfigError, DriftpromptError, RunFinished, RunInterrupted, describe
from .plugins import BLOCK_ENV, catalog

# Nothing here imports torch at module level: --help, plugins, compare and config answer in a
# fraction of a second. The commands that run a model import the engine inside them.

DESCRIPTION = """\
driftprompt: continual and test-time prompt learning on frozen ViT and CLIP backbones.

  driftprompt                         run the offline demo (finetune and ncm, tiny random ViT,
                                      synthetic class-incremental stream; about four minutes
                                      of CPU time), then compare the two runs
  driftprompt CONFIG.yaml [k=v ...]   run a config; overrides use dotted keys, values are YAML:
                                        train.epochs=3  strategies=[ncm]  strategies.0.mask_current=true
  driftprompt CONFIG.yaml --seeds 0,1,2 [--vary-stream-seed]
                                      one run per seed, in sibling directories RUN_DIR/seed-<s>
                                      (--run-dir, else runs/<name>-<time>); --seeds sets the run
                                      `seed` (initialisation, data order, augmentation) and keeps
                                      the stream; --vary-stream-seed also sets stream.options.seed
                                      (the class order, unless class_order is given); then compares
  driftprompt adapt CONFIG.yaml [k=v ...]
                                      test-time adaptation over the config's stream, one
                                      prediction per sample after its adaptation steps
  driftprompt --resume RUN_DIR        continue a killed run after its last finished experience
  driftprompt compare RUN_DIR... [--csv FILE] [--plot FILE.png]
                                      final and average incremental accuracy, forgetting, BWT,
                                      FWT and time side by side, grouped by config, mean +- std
                                      over seeds; a folder of runs stands for its runs
  driftprompt plugins [CONFIG.yaml]   list every strategy and stream, and where it comes from
                                      (with a config: its plugin_modules too)
  driftprompt plugins NAME            one strategy's or stream's options: type, default, meaning
  driftprompt config [CONFIG.yaml] [k=v ...]
                                      print the resolved config as YAML (validated)
  driftprompt config --schema         print the config's JSON schema
  driftprompt export RUN_DIR --out FILE
                                      export a finished run to FILE

Each run writes RUN_DIR/config.yaml (resolved), metrics.jsonl, tensorboard/, checkpoint.pt
(after every experience, written atomically) and summary.json.
"""

DEBUG_ENV = "DRIFTPROMPT_DEBUG"

EPILOG = (
    f"Set {BLOCK_ENV}=name1,name2 to keep named external plugins from loading. On a shared machine set "
    "runtime.threads=N (or OMP_NUM_THREADS=N) to the cores the run may use. Errors print one line; "
    f"--debug or {DEBUG_ENV}=1 adds the traceback. What each error means: docs/failures.md."
)

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
    parser.add_argument("items", nargs="*", metavar="CONFIG|COMMAND [ARG|key=value ...]", help="a YAML config and overrides, or a command: adapt, compare, plugins, config, export")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue the run stored in RUN_DIR")
    parser.add_argument("--run-dir", metavar="DIR", help="where to write this run (default runs/<name>-<time>); with --seeds, the parent of the seed runs")
    parser.add_argument("--seeds", metavar="S1,S2,...", help="run the config once per seed (run `seed`), in sibling directories, then compare them")
    parser.add_argument("--vary-stream-seed", action="store_true", help="with --seeds: also set stream.options.seed to each seed (a new class order per run)")
    parser.add_argument("--csv", metavar="FILE", help="compare: also write the table as CSV")
    parser.add_argument("--plot", metavar="FILE.png", help="compare: also draw accuracy after each experience, one line per config, bands of +- std over seeds")
    parser.add_argument("--schema", action="store_true", help="config: print the JSON schema of a config instead of a resolved config")
    parser.add_argument("--out", metavar="FILE", help="export: the file to write")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and the final table")
    parser.add_argument("--debug", action="store_true", help=f"print the full traceback of an error (or set {DEBUG_ENV}=1)")
    return parser


def _print_result(summaries: list[dict[str, Any]]) -> None:
    from .loggers import format_accuracy_matrix, format_summary, side_by_side
    from .metrics import AccuracyMatrix

    blocks = []
    for summary in summaries:
        values = AccuracyMatrix.from_list(summary["accuracy"]).values
        title = f"{'+'.join(summary['strategies'])}: accuracy (%)"
        blocks.append(format_accuracy_matrix(values, title) + "\n\n" + format_summary({k: summary.get(k) for k in ("final_average_accuracy", "average_incremental_accuracy", "forgetting", "backward_transfer", "forward_transfer")}))
    print(side_by_side(blocks, gap=6))


def _is_config_path(arg: str) -> bool:
    return arg.endswith((".yaml", ".yml")) or os.sep in arg or Path(arg).is_file()


def cmd_plugins(config_path: str | None = None) -> int:
    """List every strategy and stream; built-in ones from their generated metadata, unimported."""
    modules = load_config(config_path).plugin_modules if config_path else []
    registry = catalog(modules)
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
    print("driftprompt plugins NAME shows one strategy's or stream's options.")
    return 0


def cmd_plugin_options(name: str) -> int:
    """One strategy's (or stream's) options: name, type, default, and the docstring's description."""
    from .reference import lr_override, options_of

    registry = catalog()
    entry = registry.strategies.get(name) or registry.streams.get(name)
    if entry is None:
        registry.strategy(name)  # raises: unknown, with the names available
    kind = "strategy" if name in registry.strategies else "stream"
    options = entry.static["options"] if entry.static is not None else options_of(entry.obj)
    print(f"{kind} {name} ({f'{entry.source} {entry.version}'.strip()}): {entry.summary}")
    if not options:
        print("no options")
    rows = [("option", "type", "default")] + [(o["name"], o["type"] or "-", o["default"]) for o in options]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    for row, option in zip(rows, [None, *options]):
        line = "  ".join(col.ljust(w) for col, w in zip(row, widths))
        print((line + "  " + (option["description"] if option else "description")).rstrip())
    note = lr_override(options) if kind == "strategy" else None
    if note:
        print(note.replace("`", ""))
    where = f"strategies: [{{name: {name}, <option>: <value>}}]" if kind == "strategy" else f"stream: {{name: {name}, options: {{<option>: <value>}}}}"
    print(f"set them in a config as {where}; the full page: docs/reference/{'strategies/' + name if kind == 'strategy' else 'streams'}.md")
    return 0


def cmd_config(config_path: str | None, overrides: Sequence[str], schema: bool) -> int:
    import json

    import yaml

    if schema:
        if config_path or overrides:
            raise ConfigError("config --schema takes no config or overrides; run driftprompt config --schema alone.")
        from .reference import config_schema

        print(json.dumps(config_schema(), indent=2))
        return 0
    config = load_config(config_path, overrides)
    print(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), end="")
    return 0


def cmd_compare(paths: Sequence[str], csv_path: str | None, plot_path: str | None) -> int:
    from .compare import compare, format_table, plot, write_csv

    comparison = compare(paths)
    print(format_table(comparison))
    if csv_path:
        print(f"table written to {write_csv(comparison, csv_path)}")
    if plot_path:
        print(f"plot written to {plot(comparison, plot_path)}")
    return 0


def cmd_export(items: Sequence[str], out: str | None) -> int:
    if len(items) != 1 or not out:
        raise ConfigError("export takes one run directory and --out FILE: driftprompt export RUN_DIR --out FILE.")
    try:
        from .export import export_run
    except ImportError:
        raise DriftpromptError("This installation has no exporter (driftprompt.engine.export is missing); update driftprompt.") from None
    print(f"exported {items[0]} to {export_run(items[0], out)}")
    return 0


def cmd_demo(run_root: str | None) -> int:
    from .run import build

    print("driftprompt demo: finetune vs ncm on a synthetic 5-experience class-incremental stream, tiny random ViT (no download).")
    summaries, dirs = [], []
    for strategy in DEMO_STRATEGIES:
        config = validate(demo_config(strategy))
        with build(config, Path(run_root) / config.name if run_root else "auto", mode="fit") as run:
            _current_run_dir[:] = [run.run_dir] if run.run_dir else []
            summaries.append(run.fit())
            dirs.append(str(run.run_dir))
            print(f"{strategy}: logs in {run.run_dir}")
    _print_result(summaries)
    print(f"\n$ driftprompt compare {' '.join(dirs)}")
    return cmd_compare(dirs, None, None)


def cmd_run(config_path: str | None, overrides: Sequence[str], run_dir: str | None) -> int:
    from .run import build

    config = load_config(config_path, overrides)
    with build(config, run_dir or "auto", mode="fit") as run:
        _current_run_dir[:] = [run.run_dir] if run.run_dir else []
        print(f"run directory: {run.run_dir}")
        summary = run.fit()
    _print_result([summary])
    return 0


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` (or ``"0-4"`` for a range) to a list of distinct integers."""
    seeds: list[int] = []
    try:
        for part in (p.strip() for p in text.split(",")):
            if not part:
                continue
            if "-" in part[1:]:
                lo, hi = part.split("-", 1) if not part.startswith("-") else ("-" + part[1:].split("-", 1)[0], part[1:].split("-", 1)[1])
                seeds.extend(range(int(lo), int(hi) + 1))
            else:
                seeds.append(int(part))
    except ValueError:
        raise ConfigError(f"--seeds '{text}' is not a list of integers; write --seeds 0,1,2 (or 0-4).") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds '{text}' must name at least one seed and no seed twice; write --seeds 0,1,2.")
    return seeds


def cmd_seeds(config_path: str | None, overrides: Sequence[str], run_dir: str | None, seeds_text: str, vary_stream: bool) -> int:
    """Run one config once per seed into ``<run_dir>/seed-<s>``, then compare the runs.

    ``--seeds`` sets the run's ``seed`` (model initialisation, data order, augmentation and
    every other draw of the run); the stream, and so its class order, stays the same unless
    ``--vary-stream-seed`` also sets ``stream.options.seed``.
    """
    from .run import build, default_run_dir

    seeds = parse_seeds(seeds_text)
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key == "seed" or (vary_stream and key == "stream.options.seed"):
            raise ConfigError(f"Override '{override}' conflicts with --seeds, which sets {key} itself; remove one of them.")
    base_config = load_config(config_path, overrides)
    base = Path(run_dir) if run_dir else Path(base_config.run_dir) if base_config.run_dir else default_run_dir(base_config)
    dirs = []
    summaries = []
    for seed in seeds:
        extra = [f"seed={seed}"] + ([f"stream.options.seed={seed}"] if vary_stream else [])
        config = load_config(config_path, [*overrides, *extra])
        target = base / f"seed-{seed}"
        with build(config, target, mode="fit") as run:
            _current_run_dir[:] = [run.run_dir] if run.run_dir else []
            print(f"seed {seed}: run directory {run.run_dir}")
            summaries.append(run.fit())
        dirs.append(str(target))
    _print_result(summaries)
    print(f"\n$ driftprompt compare {base}")
    return cmd_compare(dirs, None, None)


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


#: Which command each option belongs to (None: running a config).
_FLAG_COMMANDS = {"seeds": (None,), "vary_stream_seed": (None,), "csv": ("compare",), "plot": ("compare",), "schema": ("config",), "out": ("export",)}


def _check_flags(args: argparse.Namespace, command: str | None) -> None:
    """An option given to a command that does not take it is one sentence, not ignored."""
    running = None if command not in ("plugins", "compare", "export", "adapt", "config") else command
    for name, commands in _FLAG_COMMANDS.items():
        value = getattr(args, name)
        if value in (None, False):
            continue
        flag = "--" + name.replace("_", "-")
        if running not in commands or (running is None and args.resume):
            where = "running a config" if commands == (None,) else commands[0]
            raise ConfigError(f"{flag} belongs to {where}; see driftprompt --help.")
    if args.vary_stream_seed and args.seeds is None:
        raise ConfigError("--vary-stream-seed needs --seeds; write driftprompt CONFIG.yaml --seeds 0,1,2 --vary-stream-seed.")


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
        command = items[0] if items else None
        _check_flags(args, command)
        if args.resume:
            return cmd_resume(args.resume, items)
        if command == "plugins":
            if len(items) > 2:
                raise ConfigError("plugins takes one config or one plugin name: driftprompt plugins [CONFIG.yaml | NAME].")
            if len(items) == 2 and not _is_config_path(items[1]):
                return cmd_plugin_options(items[1])
            return cmd_plugins(items[1] if len(items) > 1 else None)
        if command == "compare":
            return cmd_compare(items[1:], args.csv, args.plot)
        if command == "export":
            return cmd_export(items[1:], args.out)
        if command in ("adapt", "config"):
            rest = items[1:]
            path = rest[0] if rest and "=" not in rest[0] else None
            if command == "config":
                return cmd_config(path, rest[1:] if path else rest, args.schema)
            return cmd_adapt(path, rest[1:] if path else rest, args.run_dir)
        if not items:
            return cmd_demo(args.run_dir)
        config_path = None if "=" in items[0] else items[0]
        overrides = items[1:] if config_path is not None else items
        if args.seeds is not None:
            return cmd_seeds(config_path, overrides, args.run_dir, args.seeds, args.vary_stream_seed)
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
