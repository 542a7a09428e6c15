"""Batched image operations the corruptions are built from (torch only, any device).

Images are float (B, C, H, W) in [0, 1]. Random draws come from a CPU ``torch.Generator``
and are moved to the images' device, so results are the same on the CPU and on a GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniform(gen: torch.Generator, shape: tuple[int, ...], low: float, high: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(shape, generator=gen) * (high - low) + low).to(device)


def _gauss_1d(sigma: float, radius: int, device: torch.device) -> torch.Tensor:
    k = torch.arange(-radius, radius + 1, dtype=torch.float32, device=device)
    w = torch.exp(-(k**2) / (2 * sigma**2))
    return w / w.sum()


def separable(x: torch.Tensor, kernel: torch.Tensor, mode: str = "replicate") -> torch.Tensor:
    """Convolve every channel with a 1-D kernel along both axes."""
    c = x.shape[1]
    r = kernel.numel() // 2
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    x = F.conv2d(F.pad(x, (r, r, 0, 0), mode=mode), kx, groups=c)
    return F.conv2d(F.pad(x, (0, 0, r, r), mode=mode), ky, groups=c)


def gaussian_blur(x: torch.Tensor, sigma: float, truncate: float = 4.0, mode: str = "replicate") -> torch.Tensor:
    """Gaussian filter as ``skimage.filters.gaussian`` (kernel radius ``truncate * sigma``).

    The radius is capped below the image side (reflect padding needs it); for the very wide
    filters of ImageNet-C elastic severity 1 this only trims tails of an almost flat kernel.
    """
    if sigma <= 0:
        return x
    radius = min(int(math.ceil(truncate * sigma)), min(x.shape[-2:]) - 1)
    return separable(x, _gauss_1d(sigma, radius, x.device), mode)


def disk_kernel(radius: float, alias_blur: float, device: torch.device) -> torch.Tensor:
    """The anti-aliased disk of ImageNet-C defocus blur: a binary disk, normalised, then blurred
    by a 3 x 3 (5 x 5 beyond radius 8) Gaussian of ``alias_blur``."""
    half = 8 if radius <= 8 else int(math.ceil(radius))
    ks = 3 if radius <= 8 else 5
    coords = torch.arange(-half, half + 1, dtype=torch.float32, device=device)
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    disk = ((xx**2 + yy**2) <= radius**2).float()
    disk = disk / disk.sum()
    g = _gauss_1d(alias_blur, ks // 2, device)
    disk = separable(disk[None, None], g, mode="reflect")[0, 0]
    # drop all-zero border rows and columns: a smaller kernel, the same filter
    lo = int(torch.nonzero(disk.sum(1) > 1e-12)[0])
    return disk[lo : 2 * half + 1 - lo, lo : 2 * half + 1 - lo]


def filter2d(x: torch.Tensor, kernel: torch.Tensor, mode: str = "reflect") -> torch.Tensor:
    """Correlate every channel with a 2-D kernel (OpenCV ``filter2D`` with reflect-101 borders)."""
    c = x.shape[1]
    r = kernel.shape[-1] // 2
    x = F.pad(x, (r, r, r, r), mode=mode if r < min(x.shape[-2:]) else "replicate")
    return F.conv2d(x, kernel.view(1, 1, *kernel.shape).expand(c, 1, -1, -1), groups=c)


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """ImageMagick's ``-motion-blur radius x sigma + angle`` on a batch (one angle per image).

    A one-sided kernel of ``2 * radius + 1`` taps with Gaussian weights ``exp(-i^2 / 2 sigma^2)``;
    tap ``i`` reads the pixel ``round(i * sin(angle + 90))`` columns and
    ``round(i * cos(angle + 90))`` rows away, edges clamped (ImageMagick's edge virtual pixels).
    """
    b, _, h, w = x.shape
    width = 2 * int(radius) + 1
    i = torch.arange(width, dtype=torch.float32)
    weights = torch.exp(-(i**2) / (2 * sigma**2))
    weights = (weights / weights.sum()).tolist()
    rad = torch.deg2rad(angles.float().cpu() + 90.0)
    ys, xs = torch.arange(h), torch.arange(w)
    bi = torch.arange(b)[:, None, None]
    out = torch.zeros_like(x)
    for k, wk in enumerate(weights):
        if wk < 1e-6:
            break
        dx = torch.floor(k * torch.sin(rad) + 0.5).long()
        dy = torch.floor(k * torch.cos(rad) + 0.5).long()
        yy = (ys[None, :] + dy[:, None]).clamp(0, h - 1)
        xx = (xs[None, :] + dx[:, None]).clamp(0, w - 1)
        out += wk * x[bi, :, yy[:, :, None], xx[:, None, :]].permute(0, 3, 1, 2)
    return out / sum(wk for wk in weights if wk >= 1e-6)


def zoom(x: torch.Tensor, factor: float) -> torch.Tensor:
    """Zoom into the centre by ``factor`` (>= 1) keeping the size (ImageNet-C ``clipped_zoom``)."""
    b = x.shape[0]
    theta = torch.zeros(b, 2, 3, device=x.device)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0 / factor
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def plasma_fractal(batch: int, mapsize: int, decay: float, gen: torch.Generator) -> torch.Tensor:
    """Diamond-square plasma fractal in [0, 1], (batch, mapsize, mapsize) (ImageNet-C fog).

    ``mapsize`` is a power of two; the random displacement starts at 100 and is divided by
    ``decay`` at every halving of the step, with the noise scaled as in the original
    (``wibble * U(-wibble, wibble)``).
    """
    if mapsize & (mapsize - 1):
        raise ValueError(f"mapsize must be a power of two, got {mapsize}")
    m = torch.zeros(batch, mapsize, mapsize)
    step, wibble = mapsize, 100.0

    def wibbled(a: torch.Tensor) -> torch.Tensor:
        return a / 4 + wibble * (torch.rand(a.shape, generator=gen) * 2 * wibble - wibble)

    while step >= 2:
        half = step // 2
        corners = m[:, 0::step, 0::step]
        acc = corners + corners.roll(-1, 1)
        acc = acc + acc.roll(-1, 2)
        m[:, half::step, half::step] = wibbled(acc)
        dr = m[:, half::step, half::step]
        ul = m[:, 0::step, 0::step]
        m[:, 0::step, half::step] = wibbled(dr + dr.roll(1, 1) + ul + ul.roll(-1, 2))
        m[:, half::step, 0::step] = wibbled(dr + dr.roll(1, 2) + ul + ul.roll(-1, 1))
        step //= 2
        wibble /= decay
    flat = m.flatten(1)
    m = m - flat.min(1).values[:, None, None]
    return m / m.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]


def next_pow2(n: int) -> int:
    return 1 << max(1, (int(n) - 1).bit_length())


def grey(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma (OpenCV ``RGB2GRAY``), (B, 1, H, W)."""
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def add_value(x: torch.Tensor, delta: float) -> torch.Tensor:
    """Add ``delta`` to the HSV value channel, clipped to [0, 1], hue and saturation kept.

    In HSV every RGB channel is proportional to V for fixed H and S, so the exact result is
    ``rgb * V' / V`` (a grey ``V'`` where V = 0).
    """
    v = x.amax(dim=1, keepdim=True)
    v_new = (v + delta).clamp(0, 1)
    return torch.where(v > 0, x * (v_new / v.clamp_min(1e-12)), v_new.expand_as(x))


def affine_warp(x: torch.Tensor, matrices: torch.Tensor) -> torch.Tensor:
    """Warp with pixel-space 2 x 3 matrices M as OpenCV ``warpAffine`` (dst(M p) = src(p)),
    reflecting at the borders."""
    b, _, h, w = x.shape
    full = torch.zeros(b, 3, 3, device=x.device)
    full[:, :2] = matrices
    full[:, 2, 2] = 1
    inv = torch.linalg.inv(full)[:, :2]
    return remap(x, *_pixel_grid(inv, h, w))


def _pixel_grid(m: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    ys, xs = torch.meshgrid(torch.arange(h, dtype=torch.float32, device=m.device), torch.arange(w, dtype=torch.float32, device=m.device), indexing="ij")
    px = m[:, 0, 0, None, None] * xs + m[:, 0, 1, None, None] * ys + m[:, 0, 2, None, None]
    py = m[:, 1, 0, None, None] * xs + m[:, 1, 1, None, None] * ys + m[:, 1, 2, None, None]
    return px, py


def remap(x: torch.Tensor, px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Sample ``x`` at pixel coordinates (B, H, W) with bilinear interpolation, reflecting."""
    h, w = x.shape[-2:]
    grid = torch.stack([2 * px / max(w - 1, 1) - 1, 2 * py / max(h - 1, 1) - 1], dim=-1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=True)
