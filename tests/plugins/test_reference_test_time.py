"""tpt, dynaprompt and tda against plain implementations written from the official code's structure.

Each reference below is written here from the structure of the official repositories (azshue/TPT
``tpt_classification.py``, zzzx1224/DynaPrompt ``dynap_classification.py``, kdiAAA/TDA
``tda_runner.py`` and ``utils.py``): a CoOp text encoder over full 77-token prompts, every view
through the image encoder, the official selection rules. The strategy's first step on the same
random weights must give the same selected views or prompts, logits, loss and gradients.
Also here: views come from the raw image, CLIP's preprocessing, AugMix against PIL, TDA
presets, the test-time optimizer default, and the prompt buffer's device check.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from driftprompt.engine import ConfigError, hookimpl
from driftprompt.engine.adapter import OnlineAdapter
from driftprompt.engine.clip import CLIPBackbone
from driftprompt.engine import config
from driftprompt.plugins.dynaprompt import DynaPrompt, same_device
from driftprompt.plugins.tda import PRESETS, TDA, TIP_ADAPTER_TEMPLATES
from driftprompt.plugins.tpt import TPT, AUGMIX_OPS, augmix_op, crop_flip_views, make_views, pil_affine, pil_rotate_coeffs, random_resized_crop_boxes

CONFIG = Path(__file__).parents[1] / "assets" / "tiny-clip.json"
NAMES = ["dog", "cat", "bird", "car"]
TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def clip() -> CLIPBackbone:
    torch.manual_seed(0)
    return CLIPBackbone(model_config=CONFIG, random_init=True)


def raw_image(seed: int = 0, h: int = 45, w: int = 70) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# --- plain references -------------------------------------------------------------------------


def ref_text_features(clip: CLIPBackbone, ctx: torch.Tensor, names: list[str]) -> torch.Tensor:
    """CoOp's TextEncoder: 77-token prompts "a photo of a <name>." with ctx at positions 1..n_ctx."""
    m = clip.model
    ids = clip.tokenizer([f"a photo of a {n}." for n in names])
    emb = m.token_embedding(ids)
    n = ctx.shape[-2]
    x = torch.cat([emb[:, :1], ctx.unsqueeze(0).expand(len(names), -1, -1), emb[:, 1 + n :]], dim=1)
    x = x + m.positional_embedding
    x = m.transformer(x, attn_mask=m.attn_mask)
    x = m.ln_final(x)
    x = x[torch.arange(len(names)), ids.argmax(dim=-1)] @ m.text_projection
    return x / x.norm(dim=-1, keepdim=True)


def ref_image_features(clip: CLIPBackbone, views: torch.Tensor) -> torch.Tensor:
    f = clip.model.encode_image(views)
    return f / f.norm(dim=-1, keepdim=True)


def ref_select_confident(logits: torch.Tensor, top: float) -> torch.Tensor:
    ent = -(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1)
    if ent.dim() > 1:
        ent = ent.mean(-1)
    return torch.argsort(ent, descending=False)[: int(logits.shape[0] * top)]


def ref_avg_entropy(outputs: torch.Tensor) -> torch.Tensor:
    logits = outputs - outputs.logsumexp(dim=-1, keepdim=True)
    avg = logits.logsumexp(dim=0) - np.log(logits.shape[0])
    avg = torch.clamp(avg, min=torch.finfo(avg.dtype).min)
    return -(avg * torch.exp(avg)).sum(dim=-1)


class Capture:
    """Records the first adaptation step right after backward, before the optimizer moves anything."""

    name = "capture"

    def __init__(self, read):
        self.read = read
        self.seen: list[dict] = []

    @hookimpl
    def after_backward(self, state) -> None:
        if not self.seen:
            self.seen.append(self.read(state))


# --- TPT --------------------------------------------------------------------------------------


def test_tpt_first_step_matches_the_official_structure(clip):
    raw = raw_image()
    tpt = TPT(views=64, seed=3)
    cap = Capture(lambda s: {"loss": s.loss.detach().clone(), "grad": tpt.ctx.grad.detach().clone(), "selected": tpt.selected[0].clone(), "logits": tpt.view_logits(tpt.text_features(False), s)[0].detach().clone()})
    adapter = OnlineAdapter(clip, [tpt, cap], class_names=NAMES, device="cpu")
    assert adapter.predict([raw])[0].ok

    views = make_views([raw], 64, torch.Generator().manual_seed(3), clip)[0]  # the same 64 views
    ctx = clip.context_init("a photo of a").clone().requires_grad_(True)
    with torch.no_grad():
        img = ref_image_features(clip, views)
    logits = clip.logit_scale * img @ ref_text_features(clip, ctx, NAMES).T  # model(inputs)
    idx = ref_select_confident(logits, 0.1)
    loss = ref_avg_entropy(logits[idx])
    loss.backward()
    got = cap.seen[0]
    assert sorted(got["selected"].tolist()) == sorted(idx.tolist()) and len(idx) == 6
    torch.testing.assert_close(got["logits"], logits.detach(), **TOL)
    torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
    torch.testing.assert_close(got["grad"], ctx.grad, **TOL)


# --- DynaPrompt -------------------------------------------------------------------------------


def ref_dynaprompt_selection(p_pred: torch.Tensor, order: list[int], official_indexing: bool) -> list[int]:
    """dynap_classification.py:110-141 on (V, P, C) logits; ``official_indexing`` keeps ``ent_order[alllist]``."""
    P = p_pred.shape[1]
    logp = p_pred - p_pred.logsumexp(dim=-1, keepdim=True)
    p_ent = (-(logp * logp.exp()).sum(-1)).mean(0)
    plpd = (p_pred[0].max(-1)[0].unsqueeze(0) - p_pred[1:].max(dim=-1)[0]).mean(0)
    ent_order = p_ent.topk(P)[1]
    exact = int(torch.where(ent_order == order[0])[0])
    plpd_order = plpd.topk(P)[1]
    alllist = np.intersect1d(ent_order[min(exact + 1, P - 1) :].numpy(), plpd_order[:exact].numpy())
    if len(alllist) == 0:
        return [int(ent_order[exact])]
    picked = ent_order[alllist] if official_indexing else torch.as_tensor(alllist)
    return [int(i) for i in picked] + [int(ent_order[exact])]


@pytest.mark.parametrize("official_indexing", [False, True])
def test_dynaprompt_first_step_matches_the_official_structure(clip, official_indexing):
    raw = raw_image(1, 50, 38)
    P, V = 6, 32
    dp = DynaPrompt(views=V, buffer_size=P, seed=5, reference_indexing=official_indexing, collapse_window=0)
    g = torch.Generator().manual_seed(11)
    delta = torch.randn(P, 4, clip.text_width, generator=g) * 0.5
    order = [2, 0, 5, 1, 4, 3]
    dp.load_state_dict({"delta": delta, "uses": [0, 1, 1, 1, 1, 1], "order": order})
    cap = Capture(lambda s: {"loss": s.loss.detach().clone(), "grad": dp.buffer.delta.grad.detach().clone(), "selected": list(dp.selected), "view_idx": dp.view_idx[0].clone()})
    adapter = OnlineAdapter(clip, [dp, cap], class_names=NAMES, device="cpu")
    assert adapter.predict([raw])[0].ok

    views = make_views([raw], V, torch.Generator().manual_seed(5), clip)[0]
    init = clip.context_init("a photo of a")
    d = delta.clone().requires_grad_(True)
    with torch.no_grad():
        img = ref_image_features(clip, views)
    text = torch.stack([ref_text_features(clip, init + d[i], NAMES) for i in range(P)])  # P, C, E
    output = clip.logit_scale * torch.einsum("ve,pce->vpc", img, text)  # model(inputs): V, P, C
    chosen = ref_dynaprompt_selection(output.detach(), order, official_indexing)
    out = output[:, chosen]
    idx = ref_select_confident(out, 0.1)
    loss = ref_avg_entropy(out[idx]).mean()
    loss.backward()
    got = cap.seen[0]
    if not official_indexing:
        assert sorted(got["selected"][:-1]) == sorted(chosen[:-1]) and got["selected"][-1] == chosen[-1]
    else:
        assert got["selected"] == chosen
    assert sorted(got["view_idx"].tolist()) == sorted(idx.tolist())
    torch.testing.assert_close(got["loss"], loss.detach(), **TOL)
    torch.testing.assert_close(got["grad"], d.grad, **TOL)


def test_official_indexing_differs_from_the_intended_ids_somewhere():
    from driftprompt.plugins.dynaprompt import select_prompts

    differs = False
    g = torch.Generator().manual_seed(0)
    for _ in range(50):
        ent, diff = torch.rand(8, generator=g), torch.rand(8, generator=g)
        ref = int(torch.argsort(ent)[2])
        a, b = select_prompts(ent, diff, ref), select_prompts(ent, diff, ref, reference_indexing=True)
        assert a[-1] == b[-1] == ref
        differs |= sorted(a) != sorted(b)
    assert differs


# --- TDA --------------------------------------------------------------------------------------


def test_tda_matches_the_official_runner_on_a_stream(clip):
    raws = [raw_image(s, 40 + 3 * s, 60 - 2 * s) for s in range(4)]
    tda = TDA(preset="imagenet_r", views=16, logit_scale=100.0, seed=7, neg_entropy=(0.0, 1.0))
    adapter = OnlineAdapter(clip, [tda], class_names=NAMES, device="cpu")
    got = [adapter.predict([r])[0] for r in raws]
    cfg = PRESETS["imagenet_r"]

    # utils.py clip_classifier: per class, normalised template embeddings averaged, normalised
    with torch.no_grad():
        weights = []
        for n in NAMES:
            e = clip.model.encode_text(clip.tokenizer([t.format(n) for t in TIP_ADAPTER_TEMPLATES]))
            e = e / e.norm(dim=-1, keepdim=True)
            weights.append(e.mean(0) / e.mean(0).norm())
        W = torch.stack(weights, dim=1)  # E, C
    g = torch.Generator().manual_seed(7)
    pos: dict[int, list] = {}
    neg: dict[int, list] = {}

    def update(cache, pred, item, cap):
        if pred in cache:
            if len(cache[pred]) < cap:
                cache[pred].append(item)
            elif item[1] < cache[pred][-1][1]:
                cache[pred][-1] = item
            cache[pred] = sorted(cache[pred], key=lambda it: it[1])
        else:
            cache[pred] = [item]

    def cache_logits(f, cache, alpha, beta, mask=None):
        keys = torch.cat([it[0] for c in sorted(cache) for it in cache[c]]).T
        if mask:
            vals = torch.cat([it[2] for c in sorted(cache) for it in cache[c]])
            vals = ((vals > mask[0]) & (vals < mask[1])).float()
        else:
            vals = F.one_hot(torch.tensor([c for c in sorted(cache) for _ in cache[c]]), len(NAMES)).float()
        return alpha * ((-1) * (beta - beta * (f @ keys))).exp() @ vals

    for raw, res in zip(raws, got):
        views = make_views([raw], 16, g, clip, augmix=True)[0]
        with torch.no_grad():
            f = ref_image_features(clip, views)
            logits = 100.0 * f @ W
            ent = -(logits.softmax(1) * logits.log_softmax(1)).sum(1)
            sel = torch.argsort(ent)[: int(16 * 0.1)]
            out = logits[sel]
            f = f[sel].mean(0).unsqueeze(0)
            z = out.mean(0).unsqueeze(0)
            loss = ref_avg_entropy(out)
            prob = out.softmax(1).mean(0).unsqueeze(0)
            pred = int(z.argmax())
            update(pos, pred, [f, float(loss)], cfg["pos_capacity"])
            if 0.0 < float(loss) / math.log2(len(NAMES)) < 1.0:
                update(neg, pred, [f, float(loss), prob], cfg["neg_capacity"])
            final = z.clone() + cache_logits(f, pos, cfg["pos_alpha"], cfg["pos_beta"])
            if neg:
                final -= cache_logits(f, neg, cfg["neg_alpha"], cfg["neg_beta"], cfg["neg_mask"])
        assert res.ok
        torch.testing.assert_close(res.probs, final.softmax(-1)[0], **TOL)


def test_tda_presets_follow_the_official_configs_and_unknown_names_stop():
    assert (PRESETS["imagenet"]["pos_alpha"], PRESETS["imagenet"]["pos_beta"], PRESETS["imagenet"]["views"]) == (2.0, 5.0, 1)
    assert (PRESETS["imagenet_v2"]["pos_alpha"], PRESETS["imagenet_v2"]["pos_beta"]) == (1.0, 8.0)
    assert (PRESETS["imagenet_r"]["pos_alpha"], PRESETS["imagenet_r"]["pos_beta"]) == (1.0, 8.0)
    assert (PRESETS["imagenet_sketch"]["pos_alpha"], PRESETS["imagenet_sketch"]["pos_beta"]) == (2.363, 7.45)
    for name in ("imagenet_a", "imagenet_v2", "imagenet_r", "imagenet_sketch"):
        assert PRESETS[name]["views"] == 64 and PRESETS[name]["augmix"] is True
        assert (PRESETS[name]["neg_alpha"], PRESETS[name]["neg_beta"], PRESETS[name]["neg_entropy"], PRESETS[name]["neg_mask"]) == (0.117, 1.0, (0.2, 0.5), (0.03, 1.0))
    t = TDA(preset="imagenet_sketch", pos_alpha=3.0)
    assert (t.pos_alpha, t.pos_beta, t.views, t.augmix) == (3.0, 7.45, 64, True)  # explicit options win
    with pytest.raises(ConfigError, match="imagenet, imagenet_a, imagenet_v2, imagenet_r, imagenet_sketch"):
        TDA(preset="imagenet_x")


# --- views, preprocessing, AugMix --------------------------------------------------------------


def test_clip_preprocessing_is_resize_shorter_side_bicubic_then_centre_crop(clip):
    import torchvision.transforms.v2 as T
    from PIL import Image

    raw = raw_image(2, 41, 77)
    square = T.Compose([T.Resize(32, interpolation=T.InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(32)])(raw)
    want = (square.float() / 255 - clip.mean[0]) / clip.std[0]
    torch.testing.assert_close(clip.preprocess(raw.unsqueeze(0))[0], want)
    # the same as CLIP's PIL pipeline (Resize(32, BICUBIC), CenterCrop(32)) up to one uint8 level
    pil = _pil(raw).resize((round(77 * 32 / 41), 32), Image.BICUBIC)
    left = (pil.width - 32) // 2 if (pil.width - 32) % 2 == 0 else int(round((pil.width - 32) / 2.0))
    assert (_tensor(pil.crop((left, 0, left + 32, 32))).int() - square.int()).abs().max() <= 1
    squashed = F.interpolate(raw.unsqueeze(0).float() / 255, size=(32, 32), mode="bicubic", antialias=True)
    assert not torch.allclose(clip.preprocess(raw.unsqueeze(0)), (squashed - clip.mean) / clip.std, atol=1e-2)


def test_views_are_cut_from_the_raw_image(clip):
    import torchvision.transforms.v2.functional as TF

    raw = raw_image(3, 48, 96)
    views = make_views([raw], 9, torch.Generator().manual_seed(4), clip)[0]
    # a hand pipeline on the raw image: the same boxes and flips, torchvision's resized_crop
    g = torch.Generator().manual_seed(4)
    boxes = random_resized_crop_boxes(8, 48, 96, g)
    flips = torch.rand(8, generator=g) < 0.5
    for k, ((x0, y0, x1, y1), flip) in enumerate(zip(boxes.tolist(), flips.tolist())):
        v = TF.resized_crop(raw, int(y0), int(x0), int(y1 - y0), int(x1 - x0), [32, 32], interpolation=TF.InterpolationMode.BILINEAR, antialias=True)
        v = v.flip(-1) if flip else v
        torch.testing.assert_close(views[k + 1], (v.float() / 255 - clip.mean[0]) / clip.std[0])
    # the squashed square copy gives other views
    square = F.interpolate(raw.unsqueeze(0).float(), size=(32, 32), mode="bilinear", antialias=True)[0].round().to(torch.uint8)
    other = make_views([square], 9, torch.Generator().manual_seed(4), clip)[0]
    assert not torch.allclose(other[1:], views[1:], atol=1e-2)


def test_the_adapter_hands_the_raw_image_to_the_strategies(clip):
    seen = []

    class Look:
        name = "look"

        @hookimpl
        def test_sample_start(self, state):
            seen.append((state.batch["raw"][0].shape, tuple(state.inputs.shape)))

    adapter = OnlineAdapter(clip, [Look()], class_names=NAMES, device="cpu", steps=0)
    adapter.predict([raw_image(0, 45, 70), raw_image(1, 64, 30)])  # two sizes in one call
    assert seen == [((3, 45, 70), (1, 3, 32, 32)), ((3, 64, 30), (1, 3, 32, 32))]


def _pil(t: torch.Tensor):
    from PIL import Image

    return Image.fromarray(t.permute(1, 2, 0).numpy())


def _tensor(img) -> torch.Tensor:
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)


def test_augmix_operations_match_pil():
    from PIL import Image, ImageOps

    img = raw_image(5, 21, 26)
    pil = _pil(img)
    for coeffs in [(1, 0.027, 0, 0, 1, 0), (1, 0, 0, -0.019, 1, 0), (1, 0, 6, 0, 1, 0), (1, 0, 0, 0, 1, -5)]:
        want = _tensor(pil.transform((26, 21), Image.AFFINE, coeffs, resample=Image.BILINEAR))
        assert (pil_affine(img, coeffs).int() - want.int()).abs().max() <= 1
    for deg in (1, -2, 2):
        want = _tensor(pil.rotate(deg, resample=Image.BILINEAR))
        assert (pil_affine(img, pil_rotate_coeffs(deg, 26, 21)).int() - want.int()).abs().max() <= 1
    for name, fn in [("autocontrast", ImageOps.autocontrast), ("equalize", ImageOps.equalize)]:
        assert (augmix_op(img, name, torch.Generator()).int() - _tensor(fn(pil)).int()).abs().max() <= 1
    # PIL shears about the top-left corner; torchvision's affine shears about the centre
    import torchvision.transforms.v2.functional as TF

    want = _tensor(pil.transform((26, 21), Image.AFFINE, (1, 0.03, 0, 0, 1, 0), resample=Image.BILINEAR))
    centred = TF.affine(img, angle=0.0, translate=[0, 0], scale=1.0, shear=[-math.degrees(math.atan(0.03)), 0.0], interpolation=TF.InterpolationMode.BILINEAR)
    assert (centred.int() - want.int()).abs().max() > 1 >= (pil_affine(img, (1, 0.03, 0, 0, 1, 0)).int() - want.int()).abs().max()


def test_seeded_augmix_views_are_reproducible(clip):
    raw = raw_image(6, 40, 52)
    a = make_views([raw], 5, torch.Generator().manual_seed(9), clip, augmix=True)
    b = make_views([raw], 5, torch.Generator().manual_seed(9), clip, augmix=True)
    c = make_views([raw], 5, torch.Generator().manual_seed(10), clip, augmix=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert len(AUGMIX_OPS) == 9


# --- configuration and devices -----------------------------------------------------------------


def test_a_partial_test_time_optimizer_keeps_adamw_with_weight_decay():
    opt = config.TestTimeConfig(optimizer={"lr": 1e-3}).optimizer
    assert (opt.name, opt.lr, opt.weight_decay) == ("adamw", 1e-3, 0.01)
    assert config.TestTimeConfig().optimizer == config.OptimizerConfig(name="adamw", lr=5e-3, weight_decay=0.01)
    assert config.TestTimeConfig(optimizer={"name": "sgd", "lr": 0.1}).optimizer.name == "sgd"


def test_dynaprompt_does_not_rebuild_its_buffer_for_an_equivalent_device(clip):
    assert same_device("cuda", "cuda:0") and same_device(torch.device("cuda:0"), "cuda")
    assert not same_device("cuda:1", "cuda:0") and not same_device("cpu", "cuda")
    dp = DynaPrompt(views=4, buffer_size=3, collapse_window=0)
    adapter = OnlineAdapter(clip, [dp], class_names=NAMES, device="cpu")
    adapter.predict([raw_image(0), raw_image(1)])
    buffer = dp.buffer
    adapter.predict([raw_image(2)])
    assert dp.rebuilds == 1 and dp.buffer is buffer
