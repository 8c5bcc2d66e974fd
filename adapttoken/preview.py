"""Selection preview: what was kept, where and when, as one RGB image.

Top: thumbnails of the slices that kept the most tokens (first frame of each slice), the kept
token cells shown in full colour and the rest dimmed, captioned with frame index and time.
Middle: a strip over video time showing how many tokens were kept at each moment.
Bottom: one bar per group: relevance (height) and budget (label); skipped groups (Lite) in grey.
"""
from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw

BG = (24, 24, 28)
FG = (230, 230, 230)
ACCENT = (255, 170, 40)
SKIP = (90, 90, 90)


def _thumb(frame: np.ndarray, resized: tuple[int, int], grid: tuple[int, int], cells: set[int],
           width: int) -> Image.Image:
    img = Image.fromarray(frame).resize((resized[1], resized[0]), Image.BILINEAR)
    a = np.asarray(img).astype(np.float32)
    rows, cols = grid
    ch, cw = resized[0] // rows, resized[1] // cols
    mask = np.full((rows, cols), 0.3, dtype=np.float32)
    for c in cells:
        mask[c // cols, c % cols] = 1.0
    a *= np.kron(mask, np.ones((ch, cw), dtype=np.float32))[..., None]
    img = Image.fromarray(a.clip(0, 255).astype(np.uint8))
    d = ImageDraw.Draw(img)
    for c in cells:
        r, k = divmod(c, cols)
        d.rectangle([k * cw, r * ch, (k + 1) * cw - 1, (r + 1) * ch - 1], outline=ACCENT)
    h = max(1, round(width * resized[0] / resized[1]))
    return img.resize((width, h), Image.NEAREST)


def render_preview(selection, max_thumbs: int = 12, thumb_width: int = 192,
                   width: int = 1200) -> np.ndarray:
    """RGB uint8 [H, W, 3] picture of a Selection (see module doc)."""
    f = selection.features
    v = f.video
    tps, cols = f.tokens_per_slice, f.grid[1]
    gids = selection.gids.cpu()
    slices = (gids // tps).numpy()
    uniq, counts = np.unique(slices, return_counts=True)
    top = uniq[np.argsort(-counts, kind="stable")][:max_thumbs]
    top = np.sort(top)
    frames = v.read(v.frame_positions(top)[:: v.frames_per_slice]) if len(top) else None
    per_row = max(1, width // (thumb_width + 8))
    thumbs = []
    for i, s in enumerate(top):
        cells = set((gids[slices == s] % tps).tolist())
        th = _thumb(frames[i].numpy(), f.resized, f.grid, cells, thumb_width)
        pos = int(s) * v.frames_per_slice
        cap = Image.new("RGB", (th.width, th.height + 16), BG)
        cap.paste(th, (0, 0))
        ImageDraw.Draw(cap).text((2, th.height + 2), f"#{v.plan.indices[pos]}  "
                                 f"{v.plan.timestamps[pos]:.1f}s  {len(cells)} tok", fill=FG)
        thumbs.append(cap)
    th_h = (thumbs[0].height if thumbs else 0)
    n_rows = -(-len(thumbs) // per_row) if thumbs else 0
    strip_h, bars_h, pad = 40, 120, 8
    H = pad + n_rows * (th_h + pad) + 20 + strip_h + 24 + bars_h + 24
    canvas = Image.new("RGB", (width, H), BG)
    d = ImageDraw.Draw(canvas)
    for i, t in enumerate(thumbs):
        r, c = divmod(i, per_row)
        canvas.paste(t, (pad + c * (thumb_width + 8), pad + r * (th_h + pad)))
    y = pad + n_rows * (th_h + pad)
    # time strip: kept tokens per slice over video time
    d.text((pad, y + 2), f"kept tokens over time ({len(gids)} of budget {selection.budget}, "
                         f"method {selection.method})", fill=FG)
    y += 20
    hist = np.bincount(slices, minlength=f.num_slices).astype(np.float32)
    x0, x1 = pad, width - pad
    d.rectangle([x0, y, x1, y + strip_h], outline=SKIP)
    if hist.max() > 0:
        for s in np.nonzero(hist)[0]:
            xs = x0 + (x1 - x0) * s / max(1, f.num_slices)
            hgt = strip_h * hist[s] / hist.max()
            d.line([xs, y + strip_h, xs, y + strip_h - hgt], fill=ACCENT)
    y += strip_h + 24
    # group bars: relevance height, budget label
    groups = selection.groups
    d.text((pad, y - 18), "groups: relevance (bar) and budget (label); grey = skipped by Lite",
           fill=FG)
    if groups:
        bw = (x1 - x0) / len(groups)
        for g in groups:
            bx = x0 + g.group * bw
            if g.relevance is None:
                d.rectangle([bx + 1, y + bars_h - 4, bx + bw - 1, y + bars_h], fill=SKIP)
                continue
            rel = max(0.0, min(1.0, g.relevance / max(1e-9, max(x.relevance or 0 for x in groups))))
            d.rectangle([bx + 1, y + bars_h - rel * (bars_h - 14), bx + bw - 1, y + bars_h],
                        fill=ACCENT)
            if bw >= 22:
                d.text((bx + 2, y), str(g.budget), fill=FG)
    return np.asarray(canvas)


def preview_tensor(selection, **kw) -> torch.Tensor:
    """The preview as a ComfyUI IMAGE: float32 [1, H, W, 3] in 0..1."""
    return torch.from_numpy(render_preview(selection, **kw).astype(np.float32) / 255.0)[None]
