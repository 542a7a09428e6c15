"""Merge the items of ``benchmarks/gpu_suite.sh`` into one JSON file.

Each item's log ends with the JSON object its script printed; ``manifest.tsv`` holds one line
per item (name, exit status or ``skipped``, seconds). The merged file records, per item, its
status, seconds and figures, and at the top the GPU's name, the torch version, the date, and a
``summary`` of the headline figures (train and eval img/s and fraction of the dense bf16 peak
per prompt strategy, TPT ms/sample, DynaPrompt peak memory, query-cache speedup).

    python benchmarks/gpu_suite.py --logs gpu_suite_logs --out gpu_suite.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path
from typing import Any

STATUS = {"0": "ok", "124": "timed out", "137": "timed out (killed)", "skipped": "skipped: budget spent"}


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that parses as a JSON object."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                value = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(value, dict):
                return value
    return None


def read_items(logs: Path) -> dict[str, dict[str, Any]]:
    items: dict[str, dict[str, Any]] = {}
    manifest = logs / "manifest.tsv"
    for row in manifest.read_text().splitlines() if manifest.is_file() else []:
        name, rc, seconds = (row.split("\t") + ["", ""])[:3]
        log = logs / f"{name}.log"
        text = log.read_text(errors="replace") if log.is_file() else ""
        figures = last_json(text)
        entry: dict[str, Any] = {"status": STATUS.get(rc, f"failed (exit {rc})"), "seconds": int(seconds or 0), "figures": figures}
        if figures is None and rc != "skipped":
            entry["log_tail"] = text.strip().splitlines()[-5:]
        items[name] = entry
    return items


def summary(items: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The headline figures, by name, from whichever items finished."""
    out: dict[str, Any] = {}

    def fig(item: str) -> dict[str, Any]:
        return (items.get(item) or {}).get("figures") or {}

    for strategy in ("l2p", "dualprompt", "coda_prompt"):
        f = fig(f"{strategy}_compiled")
        for key in ("ours_train_img_per_s", "ours_eval_img_per_s", "train_peak_fraction", "eval_peak_fraction", "train_gflop_per_image", "compiled", "compile_failure", "batch_size", "ours_peak_memory_mb"):
            if key in f:
                out[f"{strategy}_{key.removeprefix('ours_')}"] = f[key]
    wanted = ("per_sample", "_mb", "speedup", "ratio", "img_per_s", "fraction")
    for item, prefix in (("tpt_latency", "tpt"), ("dynaprompt_memory", "dynaprompt"), ("query_cache", "query_cache"), ("tta_batching", "tta_batching"), ("l2p_eager_vs_reference", "l2p_eager")):
        flat: dict[str, Any] = {}
        for key, value in fig(item).items():  # one level of nesting (tta_batching's per-method figures)
            flat.update({f"{key}.{k}": v for k, v in value.items()} if isinstance(value, dict) else {key: value})
        for key, value in flat.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool) and any(w in key for w in wanted):
                out[f"{prefix}.{key}"] = value
    seconds = fig("tpt_latency").get("ours_seconds_per_sample")
    if isinstance(seconds, (int, float)):
        out["tpt_ms_per_sample"] = 1000.0 * seconds
        out["tpt_classes"] = fig("tpt_latency").get("classes")
    return out


def environment(device: str) -> dict[str, Any]:
    env: dict[str, Any] = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "python": sys.version.split()[0]}
    try:
        import torch

        env["torch"] = torch.__version__
        env["cuda"] = torch.version.cuda
        if device == "cuda" and torch.cuda.is_available():
            env["gpu"] = torch.cuda.get_device_name(0)
            env["gpu_count"] = torch.cuda.device_count()
        else:
            env["gpu"] = None
    except ImportError:
        env["torch"] = None
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    try:
        from l2p_throughput import BF16_DENSE_TFLOPS  # the one peak table the fractions use

        env["bf16_dense_peak_tflop_per_s"] = BF16_DENSE_TFLOPS
    except ImportError:
        pass
    return env


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--logs", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--budget-s", type=int, default=None)
    parser.add_argument("--device", default="cuda")
    args = parser.parse_args(argv)
    items = read_items(args.logs)
    merged = {**environment(args.device), "device": args.device, "budget_s": args.budget_s, "summary": summary(items), "items": items}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(args.out.suffix + ".tmp")
    tmp.write_text(json.dumps(merged, indent=2) + "\n")
    tmp.replace(args.out)
    print(json.dumps(merged["summary"]))
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
