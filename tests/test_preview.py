"""The selection preview shows the kept tokens of real frames and one bar per group."""
from __future__ import annotations

import numpy as np

import adapttoken as at
from adapttoken.preview import preview_tensor, render_preview
from videos import write_video


def test_preview_marks_kept_cells_and_groups(tiny_model, tmp_path):
    path = write_video(tmp_path / "v.mp4", 64, width=64, height=48, fps=8)
    cfg = at.AdaptTokenConfig(num_frames=64, group_size=4, budget=12, max_pixels=56 * 56,
                              min_pixels=56 * 56, stop_threshold=1.0, min_groups=3)
    video = at.open_video(path, 64, max_pixels=56 * 56, min_pixels=56 * 56)
    sel = at.select(tiny_model, video, at.Question("What?", ("a", "b")), cfg, "lite")
    assert sel.skipped_groups == list(range(3, 8))
    img = render_preview(sel, max_thumbs=4, thumb_width=112, width=600)
    assert img.dtype == np.uint8 and img.ndim == 3 and img.shape[1] == 600
    # thumbnails: full-brightness kept cells next to dimmed ones; the accent colour marks them
    accent = (img[..., 0] > 240) & (img[..., 1] > 150) & (img[..., 1] < 190) & (img[..., 2] < 60)
    assert accent.sum() > 100
    t = preview_tensor(sel, max_thumbs=4, thumb_width=112, width=600)
    assert t.shape == (1, img.shape[0], 600, 3) and 0.0 <= float(t.min()) and float(t.max()) <= 1.0
