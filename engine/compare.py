"""``driftprompt compare``: key figures of several runs side by side, grouped by config.

Runs whose resolved configs are equal except for the seeds (``seed`` and
``stream.options.seed``), their name and directory, and the keys that only touch where and how
fast a run goes (:data:`~driftprompt.engine.config.SAFE_TO_CHANGE`, ``runtime``) form one
group; each figure is shown as mean +- sample standard deviation (n - 1) over the group's runs.

This module reads ``config.yaml`` and ``summary.json`` only; it imports neither torch nor
numpy, and matplotlib only to draw ``--plot``.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import yaml

from .config import SAFE_TO_CHANGE, flatten
from .errors import DriftpromptError

#: (summary key, column title, CSV name); percentages unless the title says otherwise.
FIGURES: tuple[tuple[str, str, str], ...] = (
    ("final_average_accuracy", "final acc", "final_accuracy"),
    ("average_incremental_accuracy", "avg inc acc", "average_incremental_accuracy"),
    ("forgetting", "forgetting", "forgetting"),
    ("backward_transfer", "BWT", "backward_transfer"),
    ("forward_transfer", "FWT", "forward_transfer"),
    ("online_accuracy", "online acc", "online_accuracy"),
    ("time_s", "time (s)", "time_s"),
)

#: Keys that never separate two runs into different groups (besides SAFE_TO_CHANGE).
IGNORED_KEYS: tuple[str, ...] = ("name", "seed", "stream.options.seed", *SAFE_TO_CHANGE)

#: Stream options that may differ between the runs of one comparison (they reorder, not change, the stream).
STREAM_ORDER_KEYS: tuple[str, ...] = ("seed", "class_order")


class CompareError(DriftpromptError):
    """A directory that cannot take part in a comparison."""


@dataclass
class RunRecord:
    """One run directory as ``compare`` sees it."""

    path: Path
    config: dict[str, Any]
    summary: dict[str, Any] | None

    @property
    def status(self) -> str:
        if self.summary is None:
            return "unfinished (no summary.json: still running, or killed)"
        return str(self.summary.get("status", "unknown"))

    @property
    def finished(self) -> bool:
        return self.summary is not None and self.summary.get("status") == "finished"

    @property
    def seed(self) -> Any:
        return self.config.get("seed")

    def figures(self) -> dict[str, float | None]:
        """The summary's figures, with ``time_s`` the total train and evaluation seconds."""
        summary = self.summary or {}
        out: dict[str, float | None] = {}
        for key, _, _ in FIGURES:
            value = summary.get(key)
            out[key] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) else None
        timings = summary.get("timings")
        if isinstance(timings, list) and timings:
            out["time_s"] = sum(float(t.get("train_seconds", 0.0)) + float(t.get("eval_seconds", 0.0)) for t in timings if isinstance(t, dict))
        elif isinstance(summary.get("seconds"), (int, float)):
            out["time_s"] = float(summary["seconds"])
        return out

    def accuracy_curve(self) -> list[float] | None:
        """Average accuracy over the experiences seen so far, after each experience (a[i, :i+1])."""
        matrix = (self.summary or {}).get("accuracy")
        if not isinstance(matrix, list) or not matrix:
            return None
        curve = []
        for i, row in enumerate(matrix):
            seen = [v for v in row[: i + 1] if isinstance(v, (int, float)) and math.isfinite(v)]
            if not seen:
                break
            curve.append(sum(seen) / len(seen))
        return curve or None


def read_run(path: str | Path) -> RunRecord:
    """Read a run directory; a folder that is not a run is one sentence naming it."""
    path = Path(path)
    if not path.is_dir():
        raise CompareError(f"'{path}' is not a directory; pass run directories (the folders under runs/ that driftprompt wrote).")
    config_file, summary_file = path / "config.yaml", path / "summary.json"
    if not config_file.is_file():
        raise CompareError(f"'{path}' is not a run directory (it has no config.yaml); pass folders that a driftprompt run wrote.")
    try:
        config = yaml.safe_load(config_file.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise CompareError(f"'{path}' has a config.yaml that cannot be read ({type(exc).__name__}); it is not a usable run directory.") from None
    if not isinstance(config, dict):
        raise CompareError(f"'{path}' has a config.yaml that is not a mapping; it is not a usable run directory.")
    summary = None
    if summary_file.is_file():
        try:
            summary = json.loads(summary_file.read_text())
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise CompareError(f"'{path}' has a damaged summary.json ({type(exc).__name__}); rerun it or leave it out of the comparison.") from None
        if not isinstance(summary, dict):
            raise CompareError(f"'{path}' has a summary.json that is not a JSON object; rerun it or leave it out of the comparison.")
    return RunRecord(path, config, summary)


def expand(paths: Sequence[str | Path]) -> list[Path]:
    """Run directories from the arguments: a folder holding run directories (such as the parent
    of ``--seeds`` runs) stands for them, in name order."""
    out: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not (path / "config.yaml").is_file():
            children = sorted(p for p in path.iterdir() if p.is_dir() and (p / "config.yaml").is_file())
            if children:
                out.extend(children)
                continue
        out.append(path)
    return out


def _stream_identity(config: dict[str, Any]) -> dict[str, Any]:
    stream = config.get("stream") or {}
    options = {k: v for k, v in (stream.get("options") or {}).items() if k not in STREAM_ORDER_KEYS}
    return {"name": stream.get("name", "synthetic"), "options": options}


def _ignored(key: str) -> bool:
    return any(key == k or key.startswith(k + ".") for k in IGNORED_KEYS)


def group_key(config: dict[str, Any]) -> str:
    """Canonical JSON of the config without the keys that do not separate groups."""
    flat = {k: v for k, v in flatten(config).items() if not _ignored(k)}
    return json.dumps(flat, sort_keys=True, default=str)


@dataclass
class Group:
    """Runs of one config over different seeds."""

    label: str
    runs: list[RunRecord] = field(default_factory=list)

    def values(self, key: str) -> list[float]:
        return [v for v in (r.figures()[key] for r in self.runs) if v is not None]

    def stat(self, key: str) -> tuple[float | None, float | None]:
        """(mean, sample standard deviation), ``None`` where undefined."""
        vals = self.values(key)
        if not vals:
            return None, None
        return statistics.fmean(vals), statistics.stdev(vals) if len(vals) > 1 else None

    @property
    def seeds(self) -> list[Any]:
        return [r.seed for r in self.runs]


@dataclass
class Comparison:
    """Finished runs grouped by config, and the runs left out with the reason."""

    groups: list[Group]
    left_out: list[RunRecord]

    def columns(self) -> list[tuple[str, str, str]]:
        """The figures that at least one run has."""
        return [f for f in FIGURES if any(g.values(f[0]) for g in self.groups)]


def _labels(keys: list[str], configs: list[dict[str, Any]]) -> list[str]:
    """Strategy names, with the config keys that tell apart groups of the same strategies."""
    base = ["+".join(_strategy_names(c)) or "(no strategy)" for c in configs]
    flats = [json.loads(k) for k in keys]
    out = []
    for i, label in enumerate(base):
        twins = [j for j, other in enumerate(base) if other == label]
        if len(twins) > 1:
            differing = sorted({k for j in twins for k in set(flats[j]) | set(flats[i]) if flats[j].get(k, "<unset>") != flats[i].get(k, "<unset>")})
            shown = ", ".join(f"{k}={flats[i].get(k, '-')}" for k in differing[:3]) + (", ..." if len(differing) > 3 else "")
            label = f"{label} ({shown})" if shown else f"{label} #{twins.index(i) + 1}"
        out.append(label)
    return out


def _strategy_names(config: dict[str, Any]) -> list[str]:
    names = []
    for item in config.get("strategies") or []:
        names.append(item if isinstance(item, str) else str(item.get("name", "?")) if isinstance(item, dict) else "?")
    return names


def compare(paths: Sequence[str | Path]) -> Comparison:
    """Read and group run directories.

    Raises :class:`CompareError` (one sentence naming the directory) for a folder that is not
    a run, runs of different streams, or when no run has finished. Failed and unfinished runs
    are left out of the statistics and listed in :attr:`Comparison.left_out`.
    """
    dirs = expand(paths)
    if not dirs:
        raise CompareError("compare needs at least one run directory; pass folders under runs/.")
    records = [read_run(p) for p in dirs]
    first = records[0]
    reference = _stream_identity(first.config)
    for record in records[1:]:
        other = _stream_identity(record.config)
        if other != reference:
            raise CompareError(
                f"Run '{record.path}' uses stream {json.dumps(other, sort_keys=True)} but '{first.path}' uses {json.dumps(reference, sort_keys=True)}; "
                "compare runs of one stream (only its seed and class order may differ)."
            )
    finished = [r for r in records if r.finished]
    left_out = [r for r in records if not r.finished]
    if not finished:
        raise CompareError(f"No run to compare has finished ('{left_out[0].path}' is {left_out[0].status}); compare finished runs.")
    keys: list[str] = []
    members: dict[str, list[RunRecord]] = {}
    for record in finished:
        key = group_key(record.config)
        if key not in members:
            keys.append(key)
            members[key] = []
        members[key].append(record)
    labels = _labels(keys, [members[k][0].config for k in keys])
    return Comparison([Group(label, members[k]) for label, k in zip(labels, keys)], left_out)


# --- output -----------------------------------------------------------------------------


def _fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f} +- {std:.2f}" if std is not None else f"{mean:.2f}"


def format_table(comparison: Comparison) -> str:
    """The comparison as a text table: one row per group, mean +- std over its runs."""
    columns = comparison.columns()
    header = ["method", "runs", "seeds", *[title for _, title, _ in columns]]
    rows = [header]
    for group in comparison.groups:
        rows.append([group.label, str(len(group.runs)), ",".join(str(s) for s in group.seeds), *[_fmt(*group.stat(key)) for key, _, _ in columns]])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i < 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    text = "\n".join(lines)
    text += "\naccuracies in %; mean +- sample standard deviation over the runs of each config (seeds); time is training plus evaluation."
    for record in comparison.left_out:
        reason = record.status
        error = (record.summary or {}).get("error")
        text += f"\nleft out: {record.path}: {reason}" + (f" ({error})" if error else "")
    return text


def write_csv(comparison: Comparison, path: str | Path) -> Path:
    """One row per group: label, number of runs, seeds, mean and std of each figure, directories."""
    path = Path(path)
    fields = ["method", "runs", "seeds"]
    for _, _, name in FIGURES:
        fields += [f"{name}_mean", f"{name}_std"]
    fields.append("run_dirs")
    from .errors import naming

    with naming(path), path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(fields)
        for group in comparison.groups:
            row: list[Any] = [group.label, len(group.runs), " ".join(str(s) for s in group.seeds)]
            for key, _, _ in FIGURES:
                mean, std = group.stat(key)
                row += ["" if mean is None else f"{mean:.6f}", "" if std is None else f"{std:.6f}"]
            row.append(" ".join(str(r.path) for r in group.runs))
            writer.writerow(row)
    return path


def plot(comparison: Comparison, path: str | Path) -> Path:
    """Average accuracy after each experience, one line per group, a band of +- one std over seeds."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise CompareError("--plot needs matplotlib, which is not installed; pip install matplotlib.") from None
    path = Path(path)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    drawn = 0
    for group in comparison.groups:
        curves = [c for c in (r.accuracy_curve() for r in group.runs) if c]
        if not curves:
            continue
        length = min(len(c) for c in curves)
        xs = list(range(1, length + 1))
        means = [statistics.fmean(c[i] for c in curves) for i in range(length)]
        line = ax.plot(xs, means, marker="o", label=f"{group.label} (n={len(curves)})")[0]
        if len(curves) > 1:
            stds = [statistics.stdev(c[i] for c in curves) for i in range(length)]
            ax.fill_between(xs, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], color=line.get_color(), alpha=0.2)
        drawn += 1
    if not drawn:
        plt.close(fig)
        raise CompareError("None of these runs has an accuracy matrix to plot (test-time runs have none); leave out --plot.")
    ax.set_xlabel("experiences trained")
    ax.set_ylabel("average accuracy on seen experiences (%)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    from .errors import naming

    with naming(path):
        fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
