"""Run configuration: YAML files validated by pydantic, with ``key.sub=value`` overrides.

Every error a user can make here (a typo in a key, a wrong type, a missing file) becomes a
:class:`~driftprompt.engine.errors.ConfigError` with one sentence naming the key and what is
allowed, which the CLI prints without a traceback.
"""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


NORMALIZE_CHOICES = "'model' (the weights' own pretrained mean/std), 'none' (0-1 pixels), or {mean: [r, g, b], std: [r, g, b]} with positive std"


class NormalizeSpec(_Strict):
    """Explicit per-channel normalisation: the model sees ``(pixel - mean) / std``, pixels in 0-1."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]


class BackboneConfig(_Strict):
    """Which frozen backbone to use and where its weights come from."""

    kind: Literal["timm", "clip"] = Field("timm", description="a timm ViT, or an open_clip CLIP model")
    name: str = "vit_base_patch16_224.augreg_in21k"
    weights: str = Field("pretrained", description="'pretrained', 'random', or a path to a .safetensors/.pth file (timm) or checkpoint (clip)")
    pretrained: str | None = Field(None, description="clip only: the open_clip pretrained tag, e.g. 'openai'")
    clip_config: str | None = Field(None, description="clip only: an open_clip model config JSON, for offline checkpoints")
    kwargs: dict[str, Any] = Field(default_factory=dict, description="extra timm.create_model options (img_size, depth, ...)")
    normalize: Literal["model", "none"] | NormalizeSpec = Field(
        "model", description=f"input normalisation after scaling pixels to 0-1: {NORMALIZE_CHOICES}"
    )

    @field_validator("normalize", mode="before")
    @classmethod
    def _check_normalize(cls, value: Any) -> Any:
        # One sentence for every wrong shape, instead of pydantic's per-branch union errors.
        if isinstance(value, str) and value in ("model", "none"):
            return value
        if isinstance(value, NormalizeSpec):
            return value
        ok = isinstance(value, dict) and set(value) == {"mean", "std"}
        if ok:
            try:
                mean = [float(v) for v in value["mean"]]
                std = [float(v) for v in value["std"]]
            except (TypeError, ValueError):
                ok = False
            else:
                ok = len(mean) == 3 and len(std) == 3 and all(s > 0 for s in std)
        if not ok:
            raise ConfigError(f"Config key 'backbone.normalize' cannot be {value!r}; use {NORMALIZE_CHOICES}, one value per RGB channel.")
        return value

    @field_validator("normalize")
    @classmethod
    def _clip_normalises_itself(cls, value: Any, info: Any) -> Any:
        if info.data.get("kind") == "clip" and value != "model":
            raise ConfigError("Config key 'backbone.normalize' applies to timm backbones only (CLIP uses its own preprocessing); remove it or set it to 'model'.")
        return value


class StreamConfig(_Strict):
    """A registered stream builder and its options (see ``driftprompt plugins``)."""

    name: str = "synthetic"
    options: dict[str, Any] = Field(default_factory=dict)


class OptimizerConfig(_Strict):
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    momentum: float = Field(0.9, ge=0, description="SGD only")
    betas: tuple[float, float] = (0.9, 0.999)


class TrainConfig(_Strict):
    epochs: int = Field(1, ge=1)
    batch_size: int = Field(16, ge=1)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    grad_clip: float | None = Field(None, gt=0, description="max gradient norm, or null")
    scheduler: Literal["constant", "cosine", "cosine_epoch"] = Field(
        "constant", description="learning-rate schedule within each experience: constant, cosine (per step, to zero) or cosine_epoch (CODA-Prompt's per-epoch cosine)"
    )
    reset_optimizer: bool = Field(True, description="build a fresh optimizer at every experience")
    num_workers: int = Field(0, ge=0)
    nonfinite: Literal["stop", "skip"] = Field(
        "stop", description="a step whose loss or gradient is not finite: stop the run naming it, or skip it (the update is not applied) and count it"
    )
    compile: bool | Literal["auto"] = Field(
        False,
        description="torch.compile the prompted backbone (one graph per prompt layout and batch shape); auto: on CUDA only; falls back to eager, with one warning, where compilation fails. "
        "Off by default until the GPU suite has checked compiled against eager results on a GPU",
    )
    compile_backend: str = Field("inductor", description="torch.compile backend: inductor, or aot_eager/eager to check a graph without code generation")
    cuda_graphs: bool = Field(False, description="with compile on CUDA, replay CUDA graphs (torch.compile mode 'reduce-overhead'); for static shapes only")
    data_on_device: bool | Literal["auto"] = Field(
        "auto", description="keep in-memory datasets on the training device as uint8 and cut batches there; auto: on CUDA only"
    )


class EvalConfig(_Strict):
    batch_size: int = Field(64, ge=1)
    future: bool = Field(False, description="also evaluate experiences not trained yet (needed for forward transfer)")
    classes: Literal["seen", "all"] = Field(
        "seen", description="classes a prediction may take at evaluation: 'seen' (those trained so far) or 'all' (every class of the stream, trained or not)"
    )
    resize: int | None = Field(
        None, ge=1, description="resize the shorter side to this many pixels, then centre-crop to the backbone's input size (256 for a 224 input); null resizes straight to the input size"
    )
    interpolation: Literal["model", "bicubic", "bilinear"] = Field("model", description="resampling of evaluation images; 'model' is the weights' own (bicubic for timm ViTs)")


class TestTimeConfig(_Strict):
    steps: int = Field(1, ge=0, description="adaptation steps per test sample")
    batch_size: int = Field(1, ge=1, description="1 for sample-wise streams")
    optimizer: OptimizerConfig = Field(default_factory=lambda: OptimizerConfig(**TestTimeConfig.default_optimizer()), description="merged onto AdamW, lr 5e-3, weight decay 0.01 (TPT's torch.optim.AdamW(params, lr))")
    reset_optimizer: bool = Field(True, description="fresh optimizer state for every sample")
    episodic: bool = Field(False, description="samples are independent (strategies reset per sample): processes may share the stream out")
    head_checkpoint: str | None = Field(None, description="a driftprompt checkpoint.pt whose trained head the deployed classifier uses, or a .safetensors file from 'driftprompt export', whose head and trained prompt strategies classify")

    @staticmethod
    def default_optimizer() -> dict[str, Any]:
        """AdamW, lr 5e-3, weight decay 0.01: TPT's ``torch.optim.AdamW(params, lr)``."""
        return {"name": "adamw", "lr": 5e-3, "weight_decay": 0.01}

    @field_validator("optimizer", mode="before")
    @classmethod
    def _merge_optimizer(cls, value: Any) -> Any:
        """A partial optimizer (e.g. only ``lr``) keeps the test-time default's other fields.

        The default is TPT's ``torch.optim.AdamW(params, lr)`` (azshue/TPT
        tpt_classification.py:145), whose weight decay is PyTorch's 0.01.
        """
        if isinstance(value, dict):
            return {**cls.default_optimizer(), **value}
        return value


class DistributedConfig(_Strict):
    """Multi-process runs under torchrun (ignored in a single process)."""

    timeout_s: float = Field(600.0, gt=0, description="seconds a collective may wait for the other processes")


class LogConfig(_Strict):
    tensorboard: bool = True
    jsonl: bool = True
    progress: bool | None = Field(None, description="progress bars; null shows them only on a terminal")
    # 50 as Lightning's Trainer logs by default (log_every_n_steps; its docs, "Track and Visualize
    # Experiments (advanced)"): readable curves without a record (and an fsync) per step.
    every_steps: int = Field(50, ge=1, description="training curves (loss terms, learning rates, accuracy) every N optimizer steps; test-time online accuracy every N test batches")


class CheckpointConfig(_Strict):
    """When the continual loop writes ``checkpoint.pt`` (always after every experience)."""

    every_steps: int | None = Field(None, ge=1, description="also checkpoint every N optimizer steps inside an experience (null: only after experiences)")


class StrategySpec(_Strict):
    """One strategy to instantiate: its registered name and constructor options."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)


class QueryCacheConfig(_Strict):
    """The exact cache of frozen query features by sample (``engine/query_cache.py``)."""

    enabled: bool = Field(True, description="reuse the frozen [CLS] query of an image already seen in an identical evaluation batch")
    max_mb: float = Field(1024.0, ge=0, description="memory bound in MiB on the device that computed the queries; least recently used entries are evicted beyond it")
    train: bool = Field(False, description="also cache training batches by sample; exact only up to last-bit rounding, since batch composition changes the sums")


class RuntimeConfig(_Strict):
    """How the process runs, never what it computes (``engine/runtime.py``)."""

    threads: int | None = Field(
        None, ge=1, description="CPU threads of torch's intra-op pool (torch.set_num_threads); null leaves torch's default, one per core, or OMP_NUM_THREADS when set"
    )


class RunConfig(_Strict):
    """Everything one run needs; the resolved copy is saved as ``config.yaml`` in the run dir."""

    name: str = "run"
    seed: int = 0
    deterministic: bool = Field(False, description="torch.use_deterministic_algorithms(True)")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda' or 'cuda:N'")
    precision: Literal["auto", "bf16", "fp32"] = Field("auto", description="auto: bf16 autocast on CUDA, fp32 on CPU")
    run_dir: str | None = Field(None, description="default: runs/<name>-<timestamp>")
    backbone: BackboneConfig = Field(default_factory=BackboneConfig)
    stream: StreamConfig = Field(default_factory=StreamConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    test_time: TestTimeConfig = Field(default_factory=TestTimeConfig)
    strategies: list[StrategySpec] = Field(default_factory=lambda: [StrategySpec(name="finetune")])
    plugin_modules: list[str] = Field(default_factory=list, description="extra plugin modules or .py files to load")
    log: LogConfig = Field(default_factory=LogConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    query_cache: QueryCacheConfig = Field(default_factory=QueryCacheConfig)
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)

    @field_validator("name")
    @classmethod
    def _plain_name(cls, value: str) -> str:
        # the name becomes a folder under runs/: it must not climb out of it
        if not value or value in (".", "..") or any(c in value for c in ("/", "\\", "\0")):
            raise ValueError("a run name is a plain file name: no path separators, no '..', not empty")
        return value

    @field_validator("strategies", mode="before")
    @classmethod
    def _normalise_strategies(cls, value: Any) -> Any:
        if not isinstance(value, list):
            return value
        out = []
        for item in value:
            if isinstance(item, str):
                out.append({"name": item})
            elif isinstance(item, dict) and "name" in item and "options" not in item:
                out.append({"name": item["name"], "options": {k: v for k, v in item.items() if k != "name"}})
            else:
                out.append(item)
        return out


# --- errors ------------------------------------------------------------------------------


def _model_at(loc: tuple[Any, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for part in loc:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:
            return None
        ann = field.annotation
        inner = getattr(ann, "__args__", (ann,))
        nxt = next((a for a in inner if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if nxt is None:
            return None
        model = nxt
    return model


def _explain(exc: ValidationError) -> str:
    err = exc.errors()[0]
    loc = tuple(err["loc"])
    key = ".".join(str(p) for p in loc)
    if err["type"] == "extra_forbidden":
        parent = _model_at(loc[:-1])
        allowed = sorted(parent.model_fields) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
        where = f"under '{'.'.join(map(str, loc[:-1]))}'" if len(loc) > 1 else "at the top level"
        hint = f"did you mean '{close[0]}'? " if close else ""
        return f"Unknown config key '{key}'; {hint}allowed keys {where} are: {', '.join(allowed)}."
    msg = err["msg"][0].lower() + err["msg"][1:]
    got = err.get("input")
    shown = "" if isinstance(got, (dict, list)) else f" (got {got!r})"
    return f"Config key '{key}': {msg}{shown}."


def validate(data: dict[str, Any]) -> RunConfig:
    """Validate a raw mapping into a :class:`RunConfig`, or raise a one-sentence ConfigError."""
    try:
        return RunConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_explain(exc)) from None


# --- files and overrides -----------------------------------------------------------------


MAX_CONFIG_BYTES = 1 << 20  # a config is a page of YAML; anything bigger is a mistake


def read_yaml(path: str | Path) -> dict[str, Any]:
    """Read a YAML mapping with ``yaml.safe_load``.

    Refuses files that are not UTF-8 text, files over a megabyte, and YAML aliases (``*name``):
    an alias can expand a kilobyte of YAML into gigabytes (the "billion laughs"), and configs
    never need one.
    """
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"Config file '{path}' is a folder; pass the path of a YAML file (see configs/).")
    if not path.is_file():
        raise ConfigError(f"Config file '{path}' does not exist; pass the path of a YAML file (see configs/).")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise ConfigError(f"Config file '{path}' cannot be read ({exc.strerror or exc}); check its permissions.") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"Config file '{path}' is {len(raw)} bytes, more than a config can be ({MAX_CONFIG_BYTES}); pass the YAML config, not a data file.")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"Config file '{path}' is not UTF-8 text (byte {exc.start} cannot be decoded); pass a YAML file.") from None
    if "\0" in text:
        raise ConfigError(f"Config file '{path}' holds NUL bytes, so it is not a text file; pass a YAML file.")
    try:
        for event in yaml.parse(text, Loader=yaml.SafeLoader):
            if isinstance(event, yaml.AliasEvent):
                line = event.start_mark.line + 1 if event.start_mark else "?"
                raise ConfigError(f"Config file '{path}' uses a YAML alias (*{event.anchor}) at line {line}; configs do not allow aliases, so write the value out.")
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"Config file '{path}' is not valid YAML{where}; fix the syntax there.") from None
    except RecursionError:
        raise ConfigError(f"Config file '{path}' is nested too deeply to be a config; flatten it.") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"Config file '{path}' must hold a mapping of keys to values, not a {type(data).__name__}.")
    return data


def apply_override(data: dict[str, Any], override: str) -> None:
    """Apply one ``key.sub=value`` override in place; the value is parsed as YAML.

    List items are addressed by index (``strategies.0.pool_size=5``); a strategy given by
    name alone is expanded to its mapping form first.
    """
    if "=" not in override:
        raise ConfigError(f"Override '{override}' has no '='; write it as key.sub=value.")
    key, raw = override.split("=", 1)
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError(f"Override '{override}' names no key; write it as key.sub=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(f"Override '{override}': '{part}' is not an index of a list of {len(node)} items.")
            idx = int(part)
            if isinstance(node[idx], str):  # strategies: [l2p] -> [{name: l2p}]
                node[idx] = {"name": node[idx]}
            node = node[idx]
        else:
            if part not in node or node[part] is None:
                node[part] = {}
            node = node[part]
        if not isinstance(node, (dict, list)):
            raise ConfigError(f"Override '{override}': '{'.'.join(parts[: i + 1])}' is a value, not a section.")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ConfigError(f"Override '{override}': '{last}' is not an index of a list of {len(node)} items.")
        node[int(last)] = value
    else:
        node[last] = value


def load_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Read ``path`` (or start from defaults), apply overrides, validate."""
    data = read_yaml(path) if path is not None else {}
    for override in overrides:
        apply_override(data, override)
    return validate(data)


def dump_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved configuration as YAML (key order kept)."""
    from .errors import naming

    with naming(path):
        Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))


# --- fingerprints for --resume -------------------------------------------------------------

#: Keys a resumed run may change: they touch where and how fast a run goes, never its result.
#: A prefix covers its whole section. Documented in docs/failures.md.
SAFE_TO_CHANGE: tuple[str, ...] = ("run_dir", "device", "log", "eval.batch_size", "train.num_workers", "distributed", "checkpoint", "runtime", "query_cache.enabled", "query_cache.max_mb")


def flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted keys to leaf values (list items by index: ``strategies.0.options.pool_size``)."""
    if isinstance(data, dict) and data:
        out: dict[str, Any] = {}
        for key, value in data.items():
            out.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
        return out
    if isinstance(data, list) and data:
        out = {}
        for i, value in enumerate(data):
            out.update(flatten(value, f"{prefix}.{i}" if prefix else str(i)))
        return out
    return {prefix: data}


def is_safe_change(key: str) -> bool:
    """Whether ``key`` (dotted) is on the :data:`SAFE_TO_CHANGE` list."""
    return any(key == safe or key.startswith(safe + ".") for safe in SAFE_TO_CHANGE)


def config_record(config: RunConfig) -> str:
    """The resolved config as canonical JSON, stored in every checkpoint."""
    import json

    return json.dumps(config.model_dump(mode="json"), sort_keys=True)


def changed_keys(recorded: str, config: RunConfig) -> list[str]:
    """Dotted keys whose values differ between a :func:`config_record` and ``config``,
    leaving out the keys that are safe to change."""
    import json

    old, new = flatten(json.loads(recorded)), flatten(json.loads(config_record(config)))
    keys = sorted(k for k in set(old) | set(new) if old.get(k, "<unset>") != new.get(k, "<unset>"))
    return [k for k in keys if not is_safe_change(k)]
