"""3D (M-RoPE) position ids for Qwen2-VL / Qwen2.5-VL built from explicit token coordinates.

Qwen's original rule (Qwen's reference code, vLLM, transformers <= 5.2): a text token has
t = h = w = its running index; a video token (slice s, row r, col c) in a block starting at `st`
gets (st + t_s, st + r, st + c) with t_s = floor(time_s * tokens_per_second); the text after a
video block starts at st + max(t_max, H'-1, W'-1) + 1 over the *whole* video. transformers >= 5.3
continues at st + max(H', W') instead (upstream issue 45381); the model was trained with Qwen's
rule, so we build the ids ourselves.
"""
from __future__ import annotations

import torch


def video_extent(t_pos: torch.Tensor, grid_hw: tuple[int, int]) -> int:
    """max(t_max, H'-1, W'-1): the span a video block occupies before the text resumes (minus 1)."""
    t_max = int(t_pos.max()) if t_pos.numel() else 0
    return max(t_max, grid_hw[0] - 1, grid_hw[1] - 1)


def build_position_ids(n_prefix: int, coords: torch.Tensor, extent: int, n_suffix: int) -> torch.Tensor:
    """Position ids [3, L] for: n_prefix text tokens, the video tokens with coordinates `coords`
    [3, n] = (t_pos, row, col) in temporal order, then n_suffix text tokens resuming at
    n_prefix + extent + 1 (Qwen's rule)."""
    dev = coords.device
    pre = torch.arange(n_prefix, device=dev).expand(3, n_prefix)
    vid = coords.to(torch.long) + n_prefix
    start = n_prefix + extent + 1
    suf = torch.arange(start, start + n_suffix, device=dev).expand(3, n_suffix)
    return torch.cat([pre, vid, suf], dim=1)
