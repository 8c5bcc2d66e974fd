"""Decoding: the opened video (`VideoHandle`: plan + lazy reader), the decoder lanes and their jobs
(`FrameDecoder`), and the stash of frames decoded ahead for Lite's next groups (`FrameStash`).

Reading one frame by index is frame_reader.py's; which frames to read is video.py's plan.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np
import torch

from .errors import InputError

if TYPE_CHECKING:
    from .frame_reader import FrameReader
    from .video import SamplingPlan
    from .yuv import Yuv420

# Decoded frames Lite may hold for the next groups (FrameStash): 1 GiB is ~2,000 frames of 308x560,
# or ~170 of 1080p where frames are held at the file's size (no Prescale: a model on a GPU).
DEFAULT_FRAME_STASH_BYTES = 2 ** 30

# Frames at the file's size a decoder lane holds at once when the model's resize runs at decode
# time (Prescale): 128 MiB is 5 frames of 4K, 21 of 1080p, 16 (the read size) of anything smaller.
DECODE_BATCH_BYTES = 128 * 2 ** 20


class Prescale:
    """The model's own resize of decoded frames to the size its preprocessing uses, run by the
    decoder right after each small read (adapter.decode_resize: the same function preprocess would
    apply, so features do not change). Chunks, the stash and the encode then hold frames at
    `shape` instead of the file's size: a 4K frame is 24.9 MB as RGB, at 308x532 it is 0.5 MB."""

    def __init__(self, fn, resized: tuple[int, int]):
        self.fn, self.resized = fn, (int(resized[0]), int(resized[1]))
        self.shape = (*self.resized, 3)

    def __call__(self, frames: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(frames.is_inference()):
            return self.fn(frames, self.resized)


def frame_shape(info, resize: "Prescale | None" = None, yuv: "Yuv420 | None" = None) -> tuple[int, ...]:
    """Shape of one frame as the decoder hands it over: resized RGB, 4:2:0 planes, or RGB at the
    file's size (uint8: its element count is its bytes)."""
    if resize is not None:
        return resize.shape
    return yuv.shape if yuv is not None else (info.height, info.width, 3)


def decode_step(info, resize: "Prescale | None", read_frames: int = 16) -> int:
    """Frames per read: `read_frames`, fewer when large frames are resized at decode time."""
    if resize is None:
        return read_frames
    return max(1, min(read_frames, DECODE_BATCH_BYTES // max(1, info.height * info.width * 3)))


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

    @cached_property
    def yuv420(self) -> "Yuv420 | None":
        """How the file's frames are stored, where the decoder can hand them over as 4:2:0 planes
        (PyAV decodes them, yuv.probe_yuv420 accepts the stream); None otherwise."""
        from .frame_reader import uses_pyav
        from .yuv import probe_yuv420
        if self.frames is not None or not uses_pyav(self.backend):
            return None
        return probe_yuv420(self.plan.info)

    def slice_times(self) -> np.ndarray:
        """Seconds from the first sampled frame to the first frame of each slice."""
        ts = np.asarray(self.plan.timestamps, dtype=np.float64)
        return ts[:: self.frames_per_slice][: self.num_slices] - ts[0]

    def frame_positions(self, slices: np.ndarray) -> np.ndarray:
        """Plan positions (0..num_frames-1) of the frames of the given slices, in slice order."""
        f = self.frames_per_slice
        return (np.asarray(slices)[:, None] * f + np.arange(f)).reshape(-1)

    def read(self, positions: np.ndarray, stash: "FrameStash | None" = None,
             resize: Prescale | None = None, yuv: "Yuv420 | None" = None) -> torch.Tensor:
        """uint8 frames [N,H,W,3] at the given plan positions (decoding only those, plus the wanted
        frames of an active `stash` that lie on the way); with `resize`, at its size (decoded a
        few at a time, see read_positions); with `yuv` (self.yuv420), their 4:2:0 planes."""
        if self.frames is not None:
            return self.frames[torch.as_tensor(positions, dtype=torch.long)]
        if self._reader is None:
            from .frame_reader import FrameReader
            self._reader = FrameReader(self.plan.info.path, backend=self.backend)
        return read_positions(self._reader, self.plan, positions, stash, resize,
                              decode_step(self.plan.info, resize), yuv)

    def park(self) -> None:
        if self._reader is not None:
            self._reader.park()

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


def default_decode_workers() -> int:
    """Decoder threads per video: half the CPU cores, 1 to 8 (each has its own FrameReader)."""
    return max(1, min(8, (os.cpu_count() or 2) // 2))


class FrameStash:
    """Decoded frames kept for later (plan position -> a uint8 frame as the decoder hands it over:
    RGB [H, W, 3] or 4:2:0 planes [H*3/2, W]; bytes = elements), bounded in bytes and shared by the
    decoder threads. Lite names the frames of the groups after the current one as `wanted`;
    a reader on its way to the current group's frames also takes wanted frames it passes or can
    reach for a few more decoded frames (`FrameReader.read(extra=...)`): with strided groups the
    next groups' frames sit right after the current group's, so one read serves several groups.
    Frames never used (Lite stopped) are dropped and counted in `wasted`."""

    def __init__(self, limit_bytes: int = DEFAULT_FRAME_STASH_BYTES):
        self.limit = int(limit_bytes)
        self.bytes = 0
        self._frames: dict[int, torch.Tensor] = {}
        self._wanted: np.ndarray | None = None       # sorted plan positions
        self._lock = threading.Lock()
        self.captured = 0
        self.used = 0
        self.wasted = 0

    @property
    def active(self) -> bool:
        return self.limit > 0 and self._wanted is not None and len(self._wanted) > 0

    def set_wanted(self, positions) -> None:
        """The plan positions worth keeping from now on (None: stop taking frames)."""
        with self._lock:
            self._wanted = None if positions is None else np.unique(np.asarray(positions, dtype=np.int64))

    def candidates(self, exclude) -> np.ndarray:
        """Wanted positions not held yet and not in `exclude`."""
        with self._lock:
            w = self._wanted
            held = np.fromiter(self._frames, dtype=np.int64, count=len(self._frames))
        if w is None:
            return np.empty(0, dtype=np.int64)
        return np.setdiff1d(w, np.concatenate([held, np.asarray(exclude, dtype=np.int64)]),
                            assume_unique=False)

    def room(self, frame_bytes: int) -> int:
        with self._lock:
            return max(0, (self.limit - self.bytes) // max(1, frame_bytes))

    def put(self, positions, frame: torch.Tensor) -> None:
        nb = frame.numel()
        with self._lock:
            for p in positions:
                if p in self._frames or self.bytes + nb > self.limit:
                    continue
                self._frames[p] = frame
                self.bytes += nb
                self.captured += 1

    def take(self, positions) -> dict[int, torch.Tensor]:
        """Remove and return the held frames among `positions`."""
        out = {}
        with self._lock:
            for p in positions:
                f = self._frames.pop(int(p), None)
                if f is not None:
                    out[int(p)] = f
                    self.bytes -= f.numel()
            self.used += len(out)
        return out

    def has_all(self, positions) -> bool:
        with self._lock:
            return all(int(p) in self._frames for p in positions)

    def discard(self, positions) -> None:
        with self._lock:
            for p in positions:
                f = self._frames.pop(int(p), None)
                if f is not None:
                    self.bytes -= f.numel()
                    self.wasted += 1

    def clear(self) -> None:
        with self._lock:
            self.wasted += len(self._frames)
            self._frames.clear()
            self.bytes = 0
            self._wanted = None


def read_positions(reader, plan, positions, stash: FrameStash | None,
                   resize: Prescale | None = None, step: int | None = None,
                   yuv: "Yuv420 | None" = None) -> torch.Tensor:
    """Frames at plan `positions` from `reader`; with an active stash, wanted frames the reader
    passes on the way are put in it. With `resize`, frames are read `step` at a time and resized
    at once (stash frames too), so at most `step` frames at the file's size are alive here. With
    `yuv` (not with `resize`), the frames' 4:2:0 planes."""
    if resize is None:
        return _read_positions(reader, plan, positions, stash, None, yuv)
    if yuv is not None:
        raise ValueError("read_positions: resize and yuv exclude each other (Prescale takes RGB)")
    positions = np.asarray(positions, dtype=np.int64)
    step = max(1, int(step or len(positions)))
    out = torch.empty((len(positions), *resize.shape), dtype=torch.uint8)
    for a in range(0, len(positions), step):
        part = _read_positions(reader, plan, positions[a:a + step], stash, resize, None)
        out[a:a + len(part)] = resize(part)
        del part
    return out


def _read_positions(reader, plan, positions, stash: FrameStash | None,
                    resize: Prescale | None, yuv: "Yuv420 | None") -> torch.Tensor:
    idx = [plan.indices[int(p)] for p in positions]
    if stash is None or not stash.active:
        return reader.read(idx, yuv=yuv)[0]
    cand = stash.candidates(positions)
    if len(cand) == 0:
        return reader.read(idx, yuv=yuv)[0]
    room = stash.room(int(np.prod(frame_shape(plan.info, resize, yuv))))
    if room <= 0:
        return reader.read(idx, yuv=yuv)[0]
    by_index: dict[int, list[int]] = {}
    for p in cand.tolist():
        by_index.setdefault(int(plan.indices[p]), []).append(p)
    if resize is not None:
        put = lambda i, f: stash.put(by_index[i], resize(f[None])[0])  # noqa: E731
    else:
        put = lambda i, f: stash.put(by_index[i], f)                  # noqa: E731
    return reader.read(idx, extra=list(by_index), max_extra=room, on_extra=put, yuv=yuv)[0]


class _ReadyJob:
    """Frames that are already here (from the stash), with the job interface; `rest`: a job for
    the positions the stash did not hold."""

    def __init__(self, positions: np.ndarray, have: dict[int, torch.Tensor], rest=None, pin=False):
        self.positions, self._have, self._rest, self._pin = positions, have, rest, pin

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    def result(self) -> torch.Tensor:
        rest = self._rest.result() if self._rest is not None else None
        first = next(iter(self._have.values())) if self._have else rest[0]
        out = torch.empty((len(self.positions), *first.shape), dtype=torch.uint8, device=first.device,
                          pin_memory=self._pin and first.device.type == "cpu")
        j = 0
        for i, p in enumerate(self.positions.tolist()):
            f = self._have.get(int(p))
            if f is None:
                f = rest[j]
                j += 1
            out[i] = f
        return out

    def cancel(self) -> None:
        if self._rest is not None:
            self._rest.cancel()

    def wait(self) -> None:
        if self._rest is not None:
            self._rest.wait()


class _DecodeJob:
    """Frames of some plan positions being decoded on worker threads into one (pinned) tensor."""

    def __init__(self, positions: np.ndarray, out: torch.Tensor, futures: list[Future],
                 cancel: threading.Event):
        self.positions, self.out, self.futures, self._cancel = positions, out, futures, cancel

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    def result(self) -> torch.Tensor:
        """The frames (re-raising a worker's exception in the caller's thread)."""
        for f in self.futures:
            f.result()
        return self.out

    def cancel(self) -> None:
        """Stop as soon as possible: queued parts never start, running parts stop within a read."""
        self._cancel.set()
        for f in self.futures:
            f.cancel()

    def wait(self) -> None:
        """Block until no worker touches this job any more (its result is not wanted)."""
        for f in self.futures:
            if not f.cancelled():
                try:
                    f.result()
                except BaseException:  # noqa: BLE001 - the error belongs to an abandoned job
                    pass


class FrameDecoder:
    """Decodes a video's sampled frames on `workers` lanes: a lane is one thread with its own
    FrameReader (readers are never shared between threads), so a lane that is given consecutive
    requests reads on sequentially, as one reader would.

    `submit(positions, lane=None)`: on one lane, or (lane None) split into contiguous parts of at
    least `min_part` frames, one per lane. The frames land in one tensor, pinned when `pin` (fast,
    asynchronous copies to the GPU). Each part reads `read_frames` at a time and checks its cancel
    flag between reads. Exceptions come back through `_DecodeJob.result()`. Frames are RGB [H, W, 3]
    (at `resize`'s size when given) or, with `yuv`, their 4:2:0 planes [H*3/2, W].

    `device` (a CUDA device, with `yuv`): the lanes decode on its NVDEC (nvdec.py) and the planes
    land in that device's memory instead of (pinned) host memory; they are written on the default
    stream (nvdec.ready_on_current_stream).
    """

    def __init__(self, video: "VideoHandle", workers: int, pin: bool = False,
                 min_part: int = 16, read_frames: int = 16, stash: FrameStash | None = None,
                 resize: Prescale | None = None, yuv: "Yuv420 | None" = None,
                 device: torch.device | None = None):
        self.video, self.workers, self.pin = video, max(1, int(workers)), pin
        self.stash = stash
        self.resize = resize if video.frames is None else None
        self.yuv = yuv if video.frames is None else None
        self.device = device if self.yuv is not None else None
        if self.device is not None:
            self.pin = False
        self.min_part = max(1, min_part)
        self.read_frames = decode_step(video.plan.info, self.resize, max(1, read_frames))
        self._lanes: list[ThreadPoolExecutor | None] = [None] * self.workers
        self._readers: list = [None] * self.workers
        self._lock = threading.Lock()
        self._next_lane = 0
        self.busy_seconds = 0.0          # summed over lanes (can exceed wall time)
        self.frames_read = 0

    def _lane(self, j: int) -> ThreadPoolExecutor:
        if self._lanes[j] is None:
            self._lanes[j] = ThreadPoolExecutor(1, thread_name_prefix=f"adapttoken-decode{j}")
        return self._lanes[j]

    def _reader(self, j: int):
        r = self._readers[j]
        if r is None:
            from .frame_reader import FrameReader
            info = self.video.plan.info
            r = FrameReader(info.path, backend=self.video.backend, info=info, device=self.device)
            self._readers[j] = r
        return r

    def _frame_shape(self) -> tuple[int, ...]:
        if self.video.frames is not None:
            return tuple(self.video.frames.shape[1:])
        return frame_shape(self.video.plan.info, self.resize, self.yuv)

    def _read_part(self, j: int, out: torch.Tensor, start: int, positions: np.ndarray,
                   cancel: threading.Event) -> None:
        t0 = time.perf_counter()
        step = self.read_frames
        # `out` may be an inference tensor (the caller runs under torch.inference_mode(), as
        # ComfyUI does); inference mode is per thread, so write to it in the same mode here.
        with torch.inference_mode(out.is_inference()):
            for i in range(0, len(positions), step):
                if cancel.is_set():
                    return
                pos = positions[i:i + step]
                if self.video.frames is not None:
                    frames = self.video.frames[torch.as_tensor(pos, dtype=torch.long)]
                else:
                    frames = read_positions(self._reader(j), self.video.plan, pos, self.stash,
                                            self.resize, step, self.yuv)
                out[start + i:start + i + len(pos)] = frames
                del frames
            if self._readers[j] is not None:
                self._readers[j].park()        # the lane waits now: decord must not decode on
        with self._lock:
            self.busy_seconds += time.perf_counter() - t0
            self.frames_read += len(positions)

    def submit(self, positions, lane: int | None = None) -> _DecodeJob:
        positions = np.asarray(positions, dtype=np.int64)
        n = len(positions)
        out = torch.empty((n, *self._frame_shape()), dtype=torch.uint8, pin_memory=self.pin,
                          device=self.device)
        cancel = threading.Event()
        if lane is not None:
            j = lane % self.workers
            futures = [self._lane(j).submit(self._read_part, j, out, 0, positions, cancel)]
            return _DecodeJob(positions, out, futures, cancel)
        parts = max(1, min(self.workers, n // self.min_part))
        bounds = np.linspace(0, n, parts + 1).round().astype(int)
        futures = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            if b > a:
                j = self._next_lane
                self._next_lane = (j + 1) % self.workers
                futures.append(self._lane(j).submit(self._read_part, j, out, int(a),
                                                    positions[a:b], cancel))
        return _DecodeJob(positions, out, futures, cancel)

    def close(self) -> None:
        for j, lane in enumerate(self._lanes):
            if lane is not None:
                lane.shutdown(wait=True, cancel_futures=True)
            self._lanes[j] = None
        for j, r in enumerate(self._readers):
            if r is not None:
                r.close()
            self._readers[j] = None


class _SyncJob:
    """A decode done in the caller's thread (decode_workers=0): same interface as _DecodeJob."""

    def __init__(self, video: "VideoHandle", positions, stash: FrameStash | None = None,
                 resize: Prescale | None = None, yuv: "Yuv420 | None" = None):
        self.positions = np.asarray(positions, dtype=np.int64)
        self._video = video
        self._stash = stash
        self._resize = resize
        self._yuv = yuv

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    def result(self) -> torch.Tensor:
        try:
            return self._video.read(self.positions, stash=self._stash, resize=self._resize,
                                    yuv=self._yuv)
        finally:
            self._video.park()

    def cancel(self) -> None:
        pass

    def wait(self) -> None:
        pass
