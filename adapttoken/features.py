"""An opened video (plan + lazy reader) and its vision features, decoded and encoded on demand.

`VideoHandle` is what Load Video hands down: the sampling plan and a reader opened on first use.
`SliceFeatures` memoises, per (model, plan), the visual tokens of every slice it was asked for:
decoding and the vision tower run only for slices some consumer needs (Lite skips the rest), in
chunks, so frames of a 10,000-frame plan never sit in memory at once.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .video import FrameReader, SamplingPlan


class Timer:
    """Seconds per stage; synchronises CUDA before reading the clock where asked."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, sync: torch.device | None = None) -> None:
        if sync is not None and getattr(sync, "type", None) == "cuda":
            torch.cuda.synchronize(sync)
        self.seconds[stage] = self.seconds.get(stage, 0.0) + seconds

    def snapshot(self) -> dict[str, float]:
        return dict(self.seconds)


@dataclass(eq=False)
class VideoHandle:
    """A sampled video: its plan, and a frame reader opened lazily (only when frames are needed)."""
    plan: SamplingPlan
    frames_per_slice: int = 2
    backend: str = "auto"
    frames: torch.Tensor | None = None      # in-memory frames (ComfyUI IMAGE input) instead of a file
    _reader: FrameReader | None = field(default=None, repr=False)

    @property
    def info(self):
        return self.plan.info

    @property
    def key(self) -> str:
        return self.plan.key

    @property
    def num_frames(self) -> int:
        return len(self.plan.indices)

    @property
    def num_slices(self) -> int:
        return self.num_frames // self.frames_per_slice

    def slice_times(self) -> np.ndarray:
        """Seconds from the first sampled frame to the first frame of each slice."""
        ts = np.asarray(self.plan.timestamps, dtype=np.float64)
        return ts[:: self.frames_per_slice][: self.num_slices] - ts[0]

    def frame_positions(self, slices: np.ndarray) -> np.ndarray:
        """Plan positions (0..num_frames-1) of the frames of the given slices, in slice order."""
        f = self.frames_per_slice
        return (np.asarray(slices)[:, None] * f + np.arange(f)).reshape(-1)

    def read(self, positions: np.ndarray) -> torch.Tensor:
        """uint8 frames [N,H,W,3] at the given plan positions (decoding only those)."""
        if self.frames is not None:
            return self.frames[torch.as_tensor(positions, dtype=torch.long)]
        if self._reader is None:
            from .video import FrameReader
            self._reader = FrameReader(self.plan.info.path, backend=self.backend)
        idx = [self.plan.indices[int(p)] for p in positions]
        frames, _ = self._reader.read(idx)
        return frames

    def close(self) -> None:
        if self._reader is not None:
            self._reader.close()
            self._reader = None


def open_video(path, num_frames: int = 1024, max_fps: float | None = None, start: float = 0.0,
               end: float | None = None, max_pixels: int | None = 308 * 560,
               min_pixels: int | None = None, frames_per_slice: int = 2,
               backend: str = "auto") -> VideoHandle:
    """Probe a video file and plan which frames to sample; decodes nothing yet."""
    from .video import plan_sampling, probe_video
    info = probe_video(path)
    plan = plan_sampling(info, num_frames=num_frames, max_fps=max_fps, start=start, end=end,
                         max_pixels=max_pixels, min_pixels=min_pixels, multiple_of=frames_per_slice)
    if len(plan.indices) < frames_per_slice:
        raise InputError(f"video {str(path)!r}: only {len(plan.indices)} frame(s) sampled, fewer "
                         f"than one slice ({frames_per_slice} frames): sample more frames")
    return VideoHandle(plan, frames_per_slice, backend)


class SliceFeatures:
    """Vision features of one video for one model, computed per slice on demand and kept."""

    def __init__(self, adapter, video: VideoHandle, chunk_slices: int = 32):
        self.adapter, self.video = adapter, video
        info, plan = video.info, video.plan
        self.resized = adapter.resized_size(info.height, info.width, plan.min_pixels, plan.max_pixels)
        self.grid = adapter.token_grid(self.resized)
        self.tokens_per_slice = self.grid[0] * self.grid[1]
        self.num_slices = video.num_slices
        self.chunk_slices = chunk_slices
        times = torch.as_tensor(video.slice_times())
        self.t_pos = adapter.time_positions(times)                 # [num_slices] long
        self._feats: torch.Tensor | None = None                     # [num_slices, tps, D]
        self._have = torch.zeros(self.num_slices, dtype=torch.bool)
        self.timer = Timer()
        self.decoded_frames = 0
        self.encoded_slices = 0

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.num_slices * self.tokens_per_slice

    def extent_of(self, slices=None) -> int:
        """max(t_max, rows-1, cols-1) over the given slices (all slices when None)."""
        t = self.t_pos if slices is None else self.t_pos[torch.as_tensor(np.asarray(slices))]
        return max(int(t.max()), self.grid[0] - 1, self.grid[1] - 1)

    def coords_of(self, gids: torch.Tensor) -> torch.Tensor:
        """[3, n] (t_pos, row, col) of global token ids."""
        gids = gids.cpu()
        s = gids // self.tokens_per_slice
        r = (gids % self.tokens_per_slice) // self.grid[1]
        c = gids % self.grid[1]
        return torch.stack([self.t_pos[s], r, c])

    def gids_of_slices(self, slices) -> torch.Tensor:
        s = torch.as_tensor(np.asarray(slices), dtype=torch.long)
        return (s[:, None] * self.tokens_per_slice + torch.arange(self.tokens_per_slice)).reshape(-1)

    def reset_stats(self) -> None:
        """Start a new run's accounting (the computed features stay)."""
        self.timer = Timer()
        self.decoded_frames = 0
        self.encoded_slices = 0

    def release(self) -> None:
        self._feats = None
        self._have.zero_()
        self.video.close()

    # -- compute -------------------------------------------------------------------------------
    def ensure(self, slices, hooks=None) -> None:
        """Decode and encode the slices not computed yet, in temporal chunks."""
        need = [int(s) for s in np.unique(np.asarray(slices)) if not self._have[int(s)]]
        for i in range(0, len(need), self.chunk_slices):
            if hooks is not None:
                hooks.check()
            chunk = np.asarray(need[i:i + self.chunk_slices])
            t0 = time.perf_counter()
            frames = self.video.read(self.video.frame_positions(chunk))
            self.timer.add("decode", time.perf_counter() - t0)
            self.decoded_frames += frames.shape[0]
            t0 = time.perf_counter()
            feats = self.adapter.encode(frames, self.resized)      # [len(chunk), tps, D]
            if self._feats is None:
                self._feats = torch.empty(self.num_slices, *feats.shape[1:], dtype=feats.dtype,
                                          device=feats.device)
            idx = torch.as_tensor(chunk, device=feats.device)
            self._feats[idx] = feats
            self._have[torch.as_tensor(chunk)] = True
            self.encoded_slices += len(chunk)
            self.timer.add("vision", time.perf_counter() - t0, sync=feats.device)

    def prefetch(self, hooks=None) -> None:
        """Compute every slice in temporal order (sequential decoding: the full method needs all)."""
        self.ensure(np.arange(self.num_slices), hooks)

    def tokens(self, gids: torch.Tensor, hooks=None):
        """(embeds [n, D], coords [3, n]) of the given global token ids (computing what is missing)."""
        gids = gids.cpu()
        self.ensure(torch.unique(gids // self.tokens_per_slice).numpy(), hooks)
        flat = self._feats.view(-1, self._feats.shape[-1])
        return flat[gids.to(flat.device)], self.coords_of(gids)

    def tokens_of_slices(self, slices, hooks=None):
        """(embeds, coords, gids) of every token of the given slices, in temporal order."""
        gids = self.gids_of_slices(np.sort(np.asarray(slices)))
        embeds, coords = self.tokens(gids, hooks)
        return embeds, coords, gids
