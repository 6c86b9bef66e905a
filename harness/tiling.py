"""Overlapping-tile evaluation of a resolution-preserving or -scaling function.

OSEDiff tiles its latent UNet pass (tile 96, overlap 32; PassionSR 64/32) and blends tiles with
Gaussian weights, and tiles its VAE with a "VAEHook" (encoder tile 1024 px, decoder tile 224 latent
px) that also shares GroupNorm statistics across tiles. qbench uses one pure function for all three:
:func:`tiled_apply` cuts the input into overlapping tiles, applies ``fn`` to each and blends the
outputs with a per-tile weight map.

Deviation from OSEDiff's VAEHook (documented in docs/model.md): GroupNorm statistics are computed per
tile, not shared across tiles, so tiled and untiled VAE outputs differ slightly; the blend hides seams.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def gaussian_weights(height: int, width: int, var: float = 0.01) -> torch.Tensor:
    """OSEDiff-style Gaussian tile weights (mean at the centre, variance ``var`` of the unit square)."""

    def axis(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64)
        mid = (n - 1) / 2
        return torch.exp(-((x - mid) ** 2) / (n * n) / (2 * var)) / (2 * torch.pi * var) ** 0.5

    return (axis(height)[:, None] * axis(width)[None, :]).float()


def _starts(size: int, tile: int, overlap: int) -> list[int]:
    """Tile start offsets covering ``[0, size)`` with stride ``tile - overlap``; the last tile is flush."""
    if size <= tile:
        return [0]
    stride = tile - overlap
    starts = list(range(0, size - tile, stride))
    starts.append(size - tile)
    return sorted(set(starts))


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    *,
    tile: int,
    overlap: int,
    scale: float = 1.0,
    multiple: int = 1,
    var: float = 0.01,
) -> torch.Tensor:
    """Apply ``fn`` to overlapping ``tile``×``tile`` crops of ``x`` (N×C×H×W) and blend the results.

    ``fn`` maps a tile of size h×w to an output of size (h·scale)×(w·scale). ``multiple`` keeps tile
    sizes divisible (e.g. the VAE's downsampling factor). When the input fits in one tile, ``fn`` is
    called once on the whole input, so the untiled path is exactly the plain call.
    """
    if tile <= 0:
        raise ValueError("tile must be positive")
    if not 0 <= overlap < tile:
        raise ValueError(f"overlap must be in [0, tile), got {overlap} for tile {tile}")
    _, _, height, width = x.shape
    if height <= tile and width <= tile:
        return fn(x)
    tile = max(multiple, tile // multiple * multiple)
    overlap = overlap // multiple * multiple
    ys = _starts(height, tile, overlap)
    xs = _starts(width, tile, overlap)
    out: torch.Tensor | None = None
    weight_sum: torch.Tensor | None = None
    for y0 in ys:
        for x0 in xs:
            piece = x[:, :, y0 : y0 + tile, x0 : x0 + tile]
            result = fn(piece)
            if out is None:
                out_h, out_w = round(height * scale), round(width * scale)
                out = torch.zeros(
                    (x.shape[0], result.shape[1], out_h, out_w), dtype=result.dtype, device=x.device
                )
                weight_sum = torch.zeros((1, 1, out_h, out_w), dtype=result.dtype, device=x.device)
            oy, ox = round(y0 * scale), round(x0 * scale)
            rh, rw = result.shape[-2:]
            w = gaussian_weights(rh, rw, var).to(result.dtype).to(x.device)[None, None]
            out[:, :, oy : oy + rh, ox : ox + rw] += result * w
            weight_sum[:, :, oy : oy + rh, ox : ox + rw] += w
    assert out is not None and weight_sum is not None
    return out / weight_sum
