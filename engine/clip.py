"""A frozen, prompt-capable CLIP backbone built with open_clip.

``CLIPBackbone`` wraps an open_clip ``CLIP`` model (any model name and pretrained tag, a local
checkpoint plus a JSON model config for offline use, or a random initialisation for tests)
and exposes the pieces test-time prompt learning needs:

* ``encode_image(images, prompts)``: image features, optionally with visual prompt tokens
  inserted right after the class token (as ``engine.prompts`` tokens for the timm ViT);
* ``encode_text_with_context(ctx, token_ids)``: text features where learnable context
  vectors replace the token embeddings at positions ``1 .. n_ctx`` (CoOp, Zhou et al., IJCV
  2022), read at the end-of-text token;
* ``zero_shot_weights(class_names, templates)``: a zero-shot classifier from class names with
  one template or the 80 ImageNet templates of CLIP (Radford et al., ICML 2021);
* ``preprocess``, ``logit_scale``, ``embed_dim``.

The text transformer's attention mask is causal and features are read at the end-of-text
token, so the tokens after the longest prompt's end-of-text token cannot change any feature:
text is encoded only up to that token (``crop_tokens``), which saves most of the work for short
prompts (77 -> about 20 tokens for ImageNet class names).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .errors import BackboneError
from .prompts import Prompts

log = logging.getLogger(__name__)

WEIGHT_CHOICES = (
    "pass pretrained=<open_clip tag> (e.g. 'openai') with a model name, checkpoint=<file> with a model name or model_config=<JSON>, "
    "or random_init=True for a randomly initialised model (tests only)"
)

SINGLE_TEMPLATE: tuple[str, ...] = ("a photo of a {}.",)

# The 80 prompt templates CLIP's authors ensembled for ImageNet zero-shot classification
# (Radford et al., 2021, the "Prompt_Engineering_for_ImageNet" notebook of the CLIP repository).
IMAGENET_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.",
    "a photo of many {}.",
    "a sculpture of a {}.",
    "a photo of the hard to see {}.",
    "a low resolution photo of the {}.",
    "a rendering of a {}.",
    "graffiti of a {}.",
    "a bad photo of the {}.",
    "a cropped photo of the {}.",
    "a tattoo of a {}.",
    "the embroidered {}.",
    "a photo of a hard to see {}.",
    "a bright photo of a {}.",
    "a photo of a clean {}.",
    "a photo of a dirty {}.",
    "a dark photo of the {}.",
    "a drawing of a {}.",
    "a photo of my {}.",
    "the plastic {}.",
    "a photo of the cool {}.",
    "a close-up photo of a {}.",
    "a black and white photo of the {}.",
    "a painting of the {}.",
    "a painting of a {}.",
    "a pixelated photo of the {}.",
    "a sculpture of the {}.",
    "a bright photo of the {}.",
    "a cropped photo of a {}.",
    "a plastic {}.",
    "a photo of the dirty {}.",
    "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.",
    "a photo of the {}.",
    "a good photo of the {}.",
    "a rendering of the {}.",
    "a {} in a video game.",
    "a photo of one {}.",
    "a doodle of a {}.",
    "a close-up photo of the {}.",
    "a photo of a {}.",
    "the origami {}.",
    "the {} in a video game.",
    "a sketch of a {}.",
    "a doodle of the {}.",
    "a origami {}.",
    "a low resolution photo of a {}.",
    "the toy {}.",
    "a rendition of the {}.",
    "a photo of the clean {}.",
    "a photo of a large {}.",
    "a rendition of a {}.",
    "a photo of a nice {}.",
    "a photo of a weird {}.",
    "a blurry photo of a {}.",
    "a cartoon {}.",
    "art of a {}.",
    "a sketch of the {}.",
    "a embroidered {}.",
    "a pixelated photo of a {}.",
    "itap of the {}.",
    "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.",
    "a plushie {}.",
    "a photo of the nice {}.",
    "a photo of the small {}.",
    "a photo of the weird {}.",
    "the cartoon {}.",
    "art of the {}.",
    "a drawing of the {}.",
    "a photo of the large {}.",
    "a black and white photo of a {}.",
    "the plushie {}.",
    "a dark photo of a {}.",
    "itap of a {}.",
    "graffiti of the {}.",
    "a toy {}.",
    "itap of my {}.",
    "a photo of a cool {}.",
    "a photo of a small {}.",
    "a tattoo of the {}.",
)


def crop_length(token_ids: torch.Tensor) -> int:
    """Number of leading positions that hold every prompt's end-of-text token.

    CLIP's tokenizer gives the end-of-text token the largest id in the vocabulary, so its
    position is the arg-max of each row (the pooling rule of CLIP and open_clip).
    """
    return int(token_ids.argmax(dim=-1).max().item()) + 1


class CLIPBackbone(nn.Module):
    """A frozen open_clip CLIP model with text context vectors and visual prompt tokens.

    Args:
        name: an open_clip model name (``"ViT-B-16"``, ``"ViT-L-14"``, ...). With
            ``model_config`` it may be omitted: the config file's stem is the name.
        pretrained: an open_clip pretrained tag for ``name`` (``"openai"``, ``"laion2b_s34b_b88k"``,
            ...): downloaded once, then read from open_clip's cache.
        checkpoint: a local weights file (open_clip/OpenAI state dict) for offline use.
        model_config: a JSON model config (open_clip's format: ``embed_dim``, ``vision_cfg``,
            ``text_cfg``, optional ``preprocess_cfg``) for models open_clip does not ship.
        random_init: allow random weights when neither ``pretrained`` nor ``checkpoint`` is
            given (tests and offline smoke runs only).

    Raises:
        BackboneError: one sentence naming the options when no weights are chosen, or when the
            model cannot be built or is not a plain CLIP (text tower inside the model).
    """

    def __init__(
        self,
        name: str | None = "ViT-B-16",
        pretrained: str | None = None,
        checkpoint: str | Path | None = None,
        model_config: str | Path | dict[str, Any] | None = None,
        random_init: bool = False,
    ) -> None:
        super().__init__()
        import open_clip

        if pretrained is None and checkpoint is None and not random_init:
            raise BackboneError(f"CLIP backbone '{name}' has no weights chosen; {WEIGHT_CHOICES}.")
        if model_config is not None:
            name = self._register_config(model_config, name)
        assert name is not None
        if name not in open_clip.list_models():
            raise BackboneError(f"open_clip has no model config named '{name}'; pick one from open_clip.list_models() or pass model_config=<JSON file>.")
        weights = str(checkpoint) if checkpoint is not None else pretrained
        if checkpoint is not None and not Path(checkpoint).is_file():
            raise BackboneError(f"CLIP checkpoint '{checkpoint}' does not exist; {WEIGHT_CHOICES}.")
        try:
            model = open_clip.create_model(name, pretrained=weights)
        except Exception as exc:  # noqa: BLE001 - download, cache and key-mismatch failures come in many types
            raise BackboneError(
                f"Could not build CLIP '{name}' with weights '{weights}' ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); {WEIGHT_CHOICES}."
            ) from exc
        if weights is None:
            log.warning("CLIP backbone '%s' is randomly initialised: results say nothing about pretrained accuracy.", name)
        if not hasattr(model, "token_embedding") or not hasattr(model.visual, "conv1"):
            raise BackboneError(f"'{name}' is not a ViT CLIP with its text tower inside the model (open_clip CLIP); choose a ViT-* CLIP model.")
        self.name = name
        self.weights = weights or "random"
        self.model = model
        self.model.requires_grad_(False)
        self.model.eval()
        self.tokenizer = open_clip.get_tokenizer(name)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        size = cfg.get("size", model.visual.image_size)
        size = tuple(size) if isinstance(size, (tuple, list)) else (int(size), int(size))
        self.image_size: tuple[int, int] = (int(size[0]), int(size[1]))
        self.interpolation: str = cfg.get("interpolation", "bicubic")
        mean = cfg.get("mean", getattr(model.visual, "image_mean", None) or open_clip.OPENAI_DATASET_MEAN)
        std = cfg.get("std", getattr(model.visual, "image_std", None) or open_clip.OPENAI_DATASET_STD)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.embed_dim: int = int(model.text_projection.shape[1] if isinstance(model.text_projection, torch.Tensor) else model.text_projection.out_features)
        self.text_width: int = int(model.token_embedding.weight.shape[1])
        self.vision_width: int = int(model.visual.class_embedding.shape[-1])
        self.context_length: int = int(model.context_length)
        self.depth: int = len(model.visual.transformer.resblocks)

    @staticmethod
    def _register_config(model_config: str | Path | dict[str, Any], name: str | None) -> str:
        """Make a JSON config (a file or a dict) known to open_clip; returns its model name."""
        import tempfile

        import open_clip

        if isinstance(model_config, dict):
            cfg_name = name or "driftprompt-clip"
            tmp = Path(tempfile.mkdtemp()) / f"{cfg_name}.json"
            tmp.write_text(json.dumps(model_config))
            path = tmp
        else:
            path = Path(model_config)
            if not path.is_file():
                raise BackboneError(f"CLIP model config '{path}' does not exist; pass an open_clip JSON model config file.")
            try:
                cfg = json.loads(path.read_text())
            except json.JSONDecodeError as exc:
                raise BackboneError(f"CLIP model config '{path}' is not valid JSON ({exc}); fix the file.") from exc
            if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
                raise BackboneError(f"CLIP model config '{path}' lacks embed_dim, vision_cfg or text_cfg; write it in open_clip's model config format.")
            cfg_name = path.stem
        open_clip.add_model_config(path)
        return cfg_name

    # --- engine-compatible surface ------------------------------------------------------------

    @property
    def fingerprint(self) -> dict[str, Any]:
        """What a checkpoint records to refuse loading into a different backbone."""
        return {"name": f"clip:{self.name}", "embed_dim": self.embed_dim, "depth": self.depth, "image_size": list(self.image_size)}

    def train(self, mode: bool = True) -> CLIPBackbone:
        """Keep the frozen model in eval mode whatever the caller asks."""
        super().train(mode)
        self.model.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        """The learned temperature, already exponentiated (100 for OpenAI's CLIP)."""
        return self.model.logit_scale.exp()

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (0-255) or float (0-1) images (B, 3, H, W) -> CLIP input on the same device.

        CLIP's own preprocessing (``clip.load``'s transform, and TPT's ``base_transform``,
        azshue/TPT tpt_classification.py:165-167): the shorter side is resized to the model's
        resolution with its interpolation (bicubic for OpenAI CLIP, antialiased as PIL
        resizes), the centre square is cut, and the model's mean and standard deviation
        normalise it. Images already at the model's resolution are only normalised; a
        non-square image is never squashed. uint8 input is resized as uint8 (rounded and
        clamped, as PIL returns it).
        """
        if images.dim() != 4 or images.shape[1] != 3:
            raise BackboneError(f"Expected a batch of RGB images shaped (B, 3, H, W), got {tuple(images.shape)}; convert grey images to 3 channels.")
        if tuple(images.shape[-2:]) != self.image_size:
            import torchvision.transforms.v2.functional as TF

            mode = TF.InterpolationMode.BICUBIC if self.interpolation == "bicubic" else TF.InterpolationMode.BILINEAR
            short = self.image_size[0] if self.image_size[0] == self.image_size[1] else max(self.image_size)
            images = TF.resize(images, [short], interpolation=mode, antialias=True)
            images = TF.center_crop(images, list(self.image_size))
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        return (x - self.mean) / self.std

    def unnormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of the normalisation in :meth:`preprocess`: back to 0-1 pixels."""
        return x * self.std + self.mean

    # --- image tower --------------------------------------------------------------------------

    def encode_image(self, images: torch.Tensor, prompts: torch.Tensor | Prompts | None = None, normalize: bool = False) -> torch.Tensor:
        """Image features (B, E) of normalised inputs, with optional visual prompt tokens.

        Prompt tokens, (L, W) or (B, L, W) in the vision width, go right after the class token,
        after ``ln_pre`` (the same place as layer-0 tokens of the timm ViT backbone), so they
        join the residual stream of every block; the pooled class token is read as usual.
        """
        visual = self.model.visual
        if isinstance(prompts, Prompts):
            if prompts.deep or prompts.prefix or prompts.pool != "cls":
                raise BackboneError("The CLIP backbone takes layer-0 prompt tokens only; deep prompts, prefixes and prompt pooling need the timm ViT backbone.")
            prompts = prompts.stacked(images.shape[0])
        x = visual._embeds(images.to(visual.conv1.weight.dtype))
        if prompts is not None:
            tokens = prompts.unsqueeze(0).expand(x.shape[0], -1, -1) if prompts.dim() == 2 else prompts
            x = torch.cat([x[:, :1], tokens.to(x.dtype), x[:, 1:]], dim=1)
        x = visual.transformer(x)
        pooled, _ = visual._pool(x)
        if visual.proj is not None:
            pooled = pooled @ visual.proj
        return F.normalize(pooled, dim=-1) if normalize else pooled

    def forward(self, x: torch.Tensor, prompts: Prompts | torch.Tensor | None = None) -> torch.Tensor:
        """Image features, so the engine's default forward can use this backbone with a head."""
        return self.encode_image(x, prompts)

    @torch.no_grad()
    def query(self, x: torch.Tensor) -> torch.Tensor:
        """Frozen image features without an autograd graph (the engine's ``compute_query``)."""
        return self.encode_image(x)

    # --- text tower ---------------------------------------------------------------------------

    def tokenize(self, texts: Sequence[str]) -> torch.Tensor:
        """Token ids (N, context_length) on the model's device."""
        return self.tokenizer(list(texts)).to(self.model.token_embedding.weight.device)

    def context_init(self, words: str = "a photo of a") -> torch.Tensor:
        """Token embeddings of ``words`` (n_ctx, W): CoOp's initialisation of context vectors."""
        ids = self.tokenize([words])[0]
        n = int(ids.argmax()) - 1  # tokens between start-of-text and end-of-text
        with torch.no_grad():
            return self.model.token_embedding(ids[1 : 1 + n]).detach().clone()

    def class_token_ids(self, class_names: Sequence[str], n_ctx: int = 4) -> torch.Tensor:
        """Token ids of ``"X X X X <name>."`` per class (C, T): positions 1..n_ctx take context.

        The placeholders are single tokens, so the class name and the end-of-text token sit
        at the same positions as in the prompt ``"<n_ctx words> <name>."``.
        """
        prefix = " ".join(["X"] * n_ctx)
        return self.tokenize([f"{prefix} {name.replace('_', ' ')}." for name in class_names])

    def _text_transformer(self, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Positional embedding, causal transformer, final norm, EOT pooling, projection."""
        m = self.model
        length = x.shape[1]
        x = x + m.positional_embedding[:length].to(x.dtype)
        mask = m.attn_mask[:length, :length] if m.attn_mask is not None else None
        x = m.transformer(x, attn_mask=mask)
        x = m.ln_final(x)
        x = x[torch.arange(x.shape[0], device=x.device), ids.argmax(dim=-1)]
        proj = m.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj

    def encode_text_tokens(self, token_ids: torch.Tensor, crop: bool = True, normalize: bool = False) -> torch.Tensor:
        """Text features (N, E) of token ids; ``crop`` encodes only up to the longest prompt."""
        ids = token_ids[:, : crop_length(token_ids)] if crop else token_ids
        x = self.model.token_embedding(ids)
        out = self._text_transformer(x, ids)
        return F.normalize(out, dim=-1) if normalize else out

    def encode_text_with_context(
        self,
        ctx: torch.Tensor,
        token_ids: torch.Tensor,
        normalize: bool = True,
        chunk_size: int | None = None,
        recompute: bool = False,
    ) -> torch.Tensor:
        """Text features with learnable context vectors in place of tokens ``1 .. n_ctx``.

        Args:
            ctx: context vectors (n_ctx, W), or a stack of prompts (P, n_ctx, W): several
                prompts of one sample, or one prompt per sample of a batch (per-sample
                adaptation encodes B x C sequences in one pass this way).
            token_ids: (C, T) ids from :meth:`class_token_ids`, one row per class.
            normalize: return unit-norm features (what CLIP's classifier uses).
            chunk_size: encode at most this many sequences at a time (prompts x classes are
                flattened first); ``None`` encodes all at once.
            recompute: with ``chunk_size``, checkpoint each chunk so that backward keeps only
                the chunk inputs and recomputes one chunk's activations at a time.

        Returns:
            (C, E) for a single prompt, (P, C, E) for a stack.
        """
        single = ctx.dim() == 2
        stack = ctx.unsqueeze(0) if single else ctx
        P, n_ctx, _ = stack.shape
        ids = token_ids[:, : crop_length(token_ids)]
        C = ids.shape[0]
        with torch.no_grad():
            emb = self.model.token_embedding(ids)  # C, L, W
        prefix, suffix = emb[:, :1], emb[:, 1 + n_ctx :]
        dtype = emb.dtype

        def encode(s: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
            p, c = rows // C, rows % C
            x = torch.cat([prefix[c], s[p].to(dtype), suffix[c]], dim=1)
            return self._text_transformer(x, ids[c])

        total = P * C
        step = total if chunk_size is None else max(1, int(chunk_size))
        use_checkpoint = recompute and chunk_size is not None and torch.is_grad_enabled() and stack.requires_grad
        outs = []
        for start in range(0, total, step):
            rows = torch.arange(start, min(start + step, total), device=ids.device)
            outs.append(checkpoint(encode, stack, rows, use_reentrant=False) if use_checkpoint else encode(stack, rows))

        feats = torch.cat(outs, dim=0).view(P, C, -1)
        if normalize:
            feats = F.normalize(feats, dim=-1)
        return feats[0] if single else feats

    @torch.no_grad()
    def zero_shot_weights(self, class_names: Sequence[str], templates: Sequence[str] | str = SINGLE_TEMPLATE) -> torch.Tensor:
        """A zero-shot classifier (C, E): unit-norm mean of each class's template embeddings.

        ``templates`` is a sequence of format strings, ``"single"`` ("a photo of a {}.") or
        ``"imagenet80"`` (CLIP's 80-template ensemble). Each template's embedding is
        normalised, averaged over templates and normalised again, as in CLIP's notebook.
        """
        if isinstance(templates, str):
            templates = {"single": SINGLE_TEMPLATE, "imagenet80": IMAGENET_TEMPLATES}.get(templates)  # type: ignore[assignment]
            if templates is None:
                raise BackboneError("templates must be 'single', 'imagenet80' or a list of format strings with one '{}'.")
        weights = []
        for name in class_names:
            ids = self.tokenize([t.format(name.replace("_", " ")) for t in templates])
            feats = self.encode_text_tokens(ids, normalize=True)
            weights.append(F.normalize(feats.mean(dim=0), dim=-1))
        return torch.stack(weights)


def clip_logits(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's logits: ``logit_scale * normalise(image) @ normalise(text).T``.

    ``text_features`` is (C, E), or (P, C, E) for several prompts, which gives (B, P, C).
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    if txt.dim() == 2:
        return logit_scale.float() * img @ txt.T
    return logit_scale.float() * torch.einsum("be,pce->bpc", img, txt)


def clip_logits_per_sample(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """CLIP's logits when every sample has its own classifier (per-sample prompts).

    ``image_features`` (B, V, E) are B samples' V views; ``text_features`` (B, C, E) are the
    class features under each sample's own prompt. Returns (B, V, C): sample b's views
    against sample b's classes only, the same numbers as :func:`clip_logits` sample by sample.
    """
    img = F.normalize(image_features.float(), dim=-1)
    txt = F.normalize(text_features.float(), dim=-1)
    return logit_scale.float() * torch.bmm(img, txt.transpose(1, 2))


__all__ = ["CLIPBackbone", "IMAGENET_TEMPLATES", "SINGLE_TEMPLATE", "clip_logits", "clip_logits_per_sample", "crop_length"]
