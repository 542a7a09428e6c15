"""Frozen backbones that expose their token stream.

``ViTBackbone`` wraps any timm (>= 1.0) ``VisionTransformer`` without copying or forking its
code: the wrapper calls the model's own patch embedding, position embedding, blocks and final
norm, one stage at a time, so that strategies can insert prompts between the stages.
"""

from __future__ import annotations

import difflib
import logging
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .errors import BackboneError, load_error_cause
from .prompts import POOLS, Prompts

log = logging.getLogger(__name__)

WEIGHT_CHOICES = "'pretrained' (download by name, or use the local cache), a path to a .safetensors/.pth file, or 'random'"


def _looks_like_text(path: Path) -> bool:
    try:
        head = path.open("rb").read(512)
    except OSError:
        return False
    if not head or b"\0" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file or a torch state dict (``weights_only=True``), unwrapping nesting.

    Every failure is one sentence naming the file and the cause: a text file, a truncated
    or foreign file, a file that holds no dict, or a dict with something other than tensors.
    """
    if not path.is_file():
        raise BackboneError(f"Backbone weights file '{path}' does not exist; set backbone.weights to an existing file, 'pretrained' or 'random'.")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any reader failure is reported the same way
        what = "it is a text file, not saved weights" if _looks_like_text(path) else f"it is truncated, corrupt or not a weights file ({load_error_cause(exc)})"
        raise BackboneError(f"Could not read backbone weights from '{path}': {what}; use a .safetensors file or a state dict saved with torch.save.") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict):
        raise BackboneError(f"'{path}' holds a {type(state).__name__}, not a state dict; save the model's state_dict() instead.")
    if not state:
        raise BackboneError(f"'{path}' holds an empty dict, not the model's weights; save the model's state_dict() instead.")
    for key, value in state.items():
        if not isinstance(key, str) or not torch.is_tensor(value):
            raise BackboneError(
                f"'{path}' is not a state dict of tensors: entry {key!r} holds a {type(value).__name__}; save the model's state_dict() (names to tensors) instead."
            )
    return {k.removeprefix("module."): v for k, v in state.items()}


RESIZE_MODES = ("bicubic", "bilinear", "nearest")


def normalization_stats(normalize: Any, pretrained_cfg: dict[str, Any] | None) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel (mean, std) that :meth:`ViTBackbone.preprocess` applies to 0-1 pixels.

    Args:
        normalize: ``"model"`` for the weights' own pretrained mean/std (timm's
            ``pretrained_cfg``), ``"none"`` to feed 0-1 pixels unchanged (what the L2P,
            DualPrompt and CODA-Prompt reference code does), or a mapping / object with ``mean``
            and ``std`` of three values each.
        pretrained_cfg: the timm model's ``pretrained_cfg``.
    """
    if normalize is None or normalize == "model":
        cfg = pretrained_cfg or {}
        return tuple(cfg.get("mean", (0.5, 0.5, 0.5))), tuple(cfg.get("std", (0.5, 0.5, 0.5)))
    if normalize == "none":
        return (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)
    get = normalize.get if isinstance(normalize, dict) else lambda k: getattr(normalize, k, None)
    mean, std = get("mean"), get("std")
    try:
        mean, std = tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except (TypeError, ValueError):
        mean = std = ()
    if len(mean) != 3 or len(std) != 3 or any(s <= 0 for s in std):
        raise BackboneError(
            f"backbone.normalize {normalize!r} cannot be applied to RGB input; use 'model', 'none' or {{mean: [r, g, b], std: [r, g, b]}} with positive std."
        )
    return mean, std


def resize_and_crop(x: torch.Tensor, size: tuple[int, int], resize: int | None = None, interpolation: str = "bicubic") -> torch.Tensor:
    """Bring float images (B, 3, H, W) to ``size``, with torchvision's tensor resize.

    ``resize=None`` resizes straight to ``size`` (nothing happens when it already fits).
    ``resize=N`` is torchvision's ``Resize(N)`` (shorter side to N, aspect kept) followed by
    ``CenterCrop(size)``: the evaluation transform of the L2P and DualPrompt reference ports
    (l2p-pytorch datasets.py:208-213, resize 256 then crop 224). Values are clamped to 0-1
    afterwards, as an 8-bit image resized by PIL would be.
    """
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    if interpolation not in RESIZE_MODES:
        raise BackboneError(f"Unknown interpolation '{interpolation}'; use one of {', '.join(RESIZE_MODES)}.")
    mode = InterpolationMode(interpolation)
    if resize is None:
        if tuple(x.shape[-2:]) == tuple(size):
            return x
        out = TF.resize(x, list(size), interpolation=mode, antialias=interpolation != "nearest")
    else:
        out = TF.center_crop(TF.resize(x, [int(resize)], interpolation=mode, antialias=interpolation != "nearest"), list(size))
    return out.clamp_(0.0, 1.0)


class ViTBackbone(nn.Module):
    """A frozen timm Vision Transformer whose forward pass accepts prompts.

    Args:
        name: any timm model name that builds a ``VisionTransformer`` (``vit_base_patch16_224``,
            ``vit_base_patch16_224.augreg_in21k``, ``vit_small_patch16_224``, ...).
        weights: ``"pretrained"`` to load the timm weights by name (from the network or the
            local Hugging Face cache), a path to a ``.safetensors`` or ``.pth`` file, or
            ``"random"`` for random initialisation (tests and offline demos only).
        normalize: input normalisation (see :func:`normalization_stats`): ``"model"``
            (default, the weights' own mean/std), ``"none"``, or explicit mean and std.
        **model_kwargs: passed to ``timm.create_model`` (``img_size``, ``depth``, ...).
    """

    def __init__(self, name: str, weights: str | Path = "pretrained", normalize: Any = "model", **model_kwargs: Any) -> None:
        super().__init__()
        import timm
        from timm.models.vision_transformer import VisionTransformer

        base = name.split(".")[0]
        if not timm.is_model(base):
            close = difflib.get_close_matches(base, timm.list_models("vit*"), n=3)
            hint = f" (did you mean {', '.join(close)}?)" if close else ""
            raise BackboneError(f"timm has no model named '{name}'{hint}; pick a name from timm.list_models('vit*').")
        weights = str(weights)
        pretrained = weights == "pretrained"

        def kwargs_error(exc: BaseException) -> BackboneError:
            return BackboneError(f"timm model '{name}' cannot be built with backbone.kwargs {dict(model_kwargs)} ({load_error_cause(exc)}); fix backbone.kwargs.")

        try:
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **model_kwargs)
        except TypeError as exc:
            if "keyword argument" not in str(exc):  # an option of the wrong type, not an unknown one
                raise kwargs_error(exc) from exc
            raise BackboneError(f"timm model '{name}' does not accept the options {sorted(model_kwargs)} ({exc}); fix backbone.kwargs.") from exc
        except Exception as exc:  # noqa: BLE001 - bad kwargs, download and cache failures come in many types
            if not pretrained:
                raise kwargs_error(exc) from exc
            if model_kwargs:  # the options, not the download, may be at fault: ask a random build
                try:
                    timm.create_model(name, pretrained=False, num_classes=0, **model_kwargs)
                except Exception as bad:  # noqa: BLE001
                    raise kwargs_error(bad) from bad
            raise BackboneError(
                f"Could not load pretrained weights for '{name}' ({type(exc).__name__}); connect to the network once so timm can cache them, "
                f"or set backbone.weights to a local .safetensors/.pth file, or to 'random' for a randomly initialised backbone."
            ) from exc
        if not isinstance(model, VisionTransformer):
            raise BackboneError(f"'{name}' builds a {type(model).__name__}, not a VisionTransformer; choose a ViT model name.")
        if weights not in ("pretrained", "random"):
            self._load_file(model, Path(weights), name)
        elif weights == "random":
            log.warning("Backbone '%s' is randomly initialised (backbone.weights=random): results say nothing about pretrained accuracy.", name)
        self.name = name
        self.weights = weights
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        cfg = model.pretrained_cfg or {}
        self.embed_dim: int = model.embed_dim
        self.num_prefix_tokens: int = model.num_prefix_tokens
        self.depth: int = len(model.blocks)
        self.image_size: tuple[int, int] = tuple(model.patch_embed.img_size)  # type: ignore[assignment]
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        mean, std = normalization_stats(normalize, cfg)
        self.normalize = normalize if isinstance(normalize, str) else {"mean": list(mean), "std": list(std)}
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        # evaluation resize (shorter side before the centre crop) and resampling; see evaluating()
        self.view: tuple[int | None, str | None] = (None, None)

    @staticmethod
    def _load_file(model: nn.Module, path: Path, name: str) -> None:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = _read_state_dict(path)
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
        try:
            state = checkpoint_filter_fn(state, model)
            result = model.load_state_dict(state, strict=False)
        except Exception as exc:  # noqa: BLE001 - shape mismatches surface from timm's filter or from load_state_dict
            raise BackboneError(f"Weights in '{path}' do not fit model '{name}' ({load_error_cause(exc)}); set backbone.name to the model they were saved from, with its backbone.kwargs.") from exc
        missing = [k for k in result.missing_keys if not k.startswith("head")]
        if missing:
            raise BackboneError(
                f"Weights in '{path}' lack {len(missing)} tensors of model '{name}' (first: {missing[0]}); set backbone.name to the model they were saved from."
            )

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records to refuse loading into a different backbone."""
        return {"name": self.name, "embed_dim": self.embed_dim, "depth": self.depth, "image_size": list(self.image_size)}

    def train(self, mode: bool = True) -> ViTBackbone:
        """Keep the frozen model in eval mode (no dropout, no drop-path) whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    # --- inputs ------------------------------------------------------------------------------

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """Turn a batch of images into model input, on whatever device ``images`` lives.

        Accepts uint8 (0-255) or float (0-1) tensors of shape (B, 3, H, W); resizes to the
        model's resolution with its pretrained interpolation and normalises with the mean/std
        chosen by ``normalize`` (all zeros and ones for ``"none"``). Inside
        :meth:`evaluating` the resize follows that view instead (e.g. shorter side to 256,
        then a 224 centre crop).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise BackboneError(f"Expected a batch of RGB images shaped (B, 3, H, W), got {tuple(images.shape)}; convert grey images to 3 channels.")
        x = images.float().div_(255.0) if images.dtype == torch.uint8 else images.float()
        resize, interpolation = self.view
        mode = interpolation or ("bicubic" if self.interpolation == "bicubic" else "bilinear")
        if resize is not None or tuple(x.shape[-2:]) != self.image_size:
            x = resize_and_crop(x, self.image_size, resize, mode)
        return (x - self.mean) / self.std

    @contextmanager
    def evaluating(self, resize: int | None = None, interpolation: str | None = None) -> Iterator[None]:
        """Within this block :meth:`preprocess` gives the evaluation view of each image.

        Args:
            resize: shorter side before a centre crop to the input size (torchvision's
                ``Resize(resize)`` + ``CenterCrop``); ``None`` resizes straight to the input size.
            interpolation: ``"bicubic"``, ``"bilinear"`` or ``None`` for the weights' own.
        """
        if interpolation is not None and interpolation not in RESIZE_MODES:
            raise BackboneError(f"Unknown interpolation '{interpolation}'; use one of {', '.join(RESIZE_MODES)}.")
        previous = self.view
        self.view = (resize, interpolation)
        try:
            yield
        finally:
            self.view = previous

    # --- token stream ------------------------------------------------------------------------

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Patch embedding, class token and position embedding: (B, 3, H, W) -> (B, N, D)."""
        m = self.model
        x = m.patch_embed(x)
        x = m._pos_embed(x)
        x = m.patch_drop(x)
        return m.norm_pre(x)

    def insert_tokens(self, x: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Insert (B, L, D) prompt tokens right after the prefix (class/register) tokens."""
        p = self.num_prefix_tokens
        return torch.cat([x[:, :p], tokens.to(x.dtype), x[:, p:]], dim=1)

    def blocks(self, x: torch.Tensor, start: int = 0, end: int | None = None) -> torch.Tensor:
        """Run transformer blocks ``start`` to ``end`` (exclusive) on the token stream."""
        for block in self.model.blocks[start:end]:
            x = block(x)
        return x

    def check_layers(self, layers: list[int] | tuple[int, ...], what: str) -> None:
        """Raise one clear sentence if a strategy names blocks this backbone does not have."""
        bad = [i for i in layers if not 0 <= int(i) < self.depth]
        if bad:
            raise BackboneError(f"{what} names block(s) {bad}, but '{self.name}' has blocks 0..{self.depth - 1}; choose layers inside that range.")

    def attention_with_prefix(self, block: nn.Module, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """timm ``Attention`` of ``block`` with (B, Lp, D) key/value prefixes prepended per head.

        Uses the block's own projections and the fused ``scaled_dot_product_attention``. The
        prefixes are split into heads with a reshape over the channel axis followed by a
        transpose of the length and head axes, so batch, key/value and head axes stay apart.
        """
        attn = block.attn
        B, N, C = x.shape
        H = attn.num_heads
        Dh = attn.head_dim
        qkv = attn.qkv(x).reshape(B, N, 3, H, Dh).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = attn.q_norm(q), attn.k_norm(k)
        pk = key.to(k.dtype).reshape(B, -1, H, Dh).transpose(1, 2)
        pv = value.to(v.dtype).reshape(B, -1, H, Dh).transpose(1, 2)
        k = torch.cat([pk, k], dim=2)
        v = torch.cat([pv, v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).reshape(B, N, H * Dh)
        out = attn.norm(out)
        gate = getattr(attn, "gate", None)
        if gate is not None:
            out = out * gate(x).sigmoid()
        return attn.proj_drop(attn.proj(out))

    def block_with_prefix(self, block: nn.Module, x: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """One timm ``Block`` whose attention sees extra key/value prefixes."""
        x = x + block.drop_path1(block.ls1(self.attention_with_prefix(block, block.norm1(x), key, value)))
        return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))

    def forward_tokens(self, x: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """Prompted forward pass; returns the final-norm token stream (B, N [+L], D).

        Token order: prefix (class/register) tokens, layer-0 prompt tokens, the deep-prompt
        slot (present from the first block that has deep prompts), then patch tokens. After
        :func:`driftprompt.engine.compile.compile_backbone` (``train.compile``) the pass runs
        through ``torch.compile``, one graph per prompt layout; otherwise it is
        :meth:`forward_tokens_eager`.
        """
        compiled = self.__dict__.get("compiled_forward")
        if compiled is not None:
            return compiled(x, prompts)
        return self.forward_tokens_eager(x, prompts)

    def forward_tokens_eager(self, x: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """The prompted forward pass, op by op (see :meth:`forward_tokens`)."""
        x = self.embed(x)
        if prompts is None or prompts.empty:
            return self.model.norm(self.blocks(x))
        B = x.shape[0]
        tokens = prompts.stacked(B)
        if tokens is not None:
            x = self.insert_tokens(x, tokens)
        slot_start = self.num_prefix_tokens + prompts.num_tokens
        slot_len = 0
        for i, block in enumerate(self.model.blocks):
            deep = prompts.deep_at(i, B)
            if deep is not None:
                deep = deep.to(x.dtype)
                if slot_len == 0:
                    x = torch.cat([x[:, :slot_start], deep, x[:, slot_start:]], dim=1)
                    slot_len = deep.shape[1]
                elif deep.shape[1] != slot_len:
                    raise BackboneError(f"Deep prompts must keep one length across layers; layer {i} has {deep.shape[1]} tokens, earlier layers {slot_len}.")
                else:
                    x = torch.cat([x[:, :slot_start], deep, x[:, slot_start + slot_len :]], dim=1)
            prefix = prompts.prefix_at(i, B)
            x = block(x) if prefix is None else self.block_with_prefix(block, x, *prefix)
        return self.model.norm(x)

    def pool(self, tokens: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """Reduce the token stream to the feature the classifier sees."""
        mode = prompts.pool if prompts is not None else "cls"
        if mode == "cls":
            return tokens[:, 0]
        if mode == "prompt_mean":
            n = prompts.num_tokens if prompts is not None else 0
            if n == 0:
                raise BackboneError("prompts.pool='prompt_mean' needs prompt tokens; add tokens or use pool='cls'.")
            p = self.num_prefix_tokens
            return tokens[:, p : p + n].mean(dim=1)
        raise BackboneError(f"Unknown pool '{mode}'; use one of {', '.join(POOLS)}.")

    def forward(self, x: torch.Tensor, prompts: Prompts | None = None) -> torch.Tensor:
        """Feature of each image: (B, 3, H, W) normalised input -> (B, D)."""
        return self.pool(self.forward_tokens(x, prompts), prompts)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """The frozen [CLS] feature after the final norm, without an autograd graph.

        ``no_grad`` rather than ``inference_mode``: the result feeds differentiable maths
        (key matching, linear heads), which inference tensors would forbid.
        """
        return self.forward(x)
