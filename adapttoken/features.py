"""An opened video (plan + lazy reader) and its vision features, decoded and encoded on demand.

`VideoHandle` is what Load Video hands down: the sampling plan and a reader opened on first use.
`SliceFeatures` memoises, per (model, plan), the visual tokens of every slice it was asked for:
decoding and the vision tower run only for slices some consumer needs (Lite skips the rest), in
chunks, so frames of a 10,000-frame plan never sit in memory at once.
"""
from __future__ import annotations

import os
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from .errors import InputError
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .video import FrameReader, SamplingPlan

# Decoded frames Lite may hold for the next groups (FrameStash): 1 GiB is ~2,000 frames of 308x560
# or ~170 of 1080p (frames are held at the file's size, before resizing).
DEFAULT_FRAME_STASH_BYTES = 2 ** 30


class Timer:
    """Seconds per stage; synchronises CUDA before reading the clock where asked."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def add(self, stage: str, seconds: float, sync: torch.device | None = None) -> None:
        """Add `seconds` (host time since the stage began, read just before this call) to a stage.
        With `sync`, first wait for the device's queued work and count that wait too, so a stage's
        seconds include the GPU work it launched (not only the time to launch it)."""
        if sync is not None and getattr(sync, "type", None) == "cuda":
            t0 = time.perf_counter()
            torch.cuda.synchronize(sync)
            seconds += time.perf_counter() - t0
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

    def read(self, positions: np.ndarray, stash: "FrameStash | None" = None) -> torch.Tensor:
        """uint8 frames [N,H,W,3] at the given plan positions (decoding only those, plus the wanted
        frames of an active `stash` that lie on the way)."""
        if self.frames is not None:
            return self.frames[torch.as_tensor(positions, dtype=torch.long)]
        if self._reader is None:
            from .video import FrameReader
            self._reader = FrameReader(self.plan.info.path, backend=self.backend)
        return read_positions(self._reader, self.plan, positions, stash)

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
    """Decoded frames kept for later (plan position -> uint8 [H, W, 3]), bounded in bytes and shared
    by the decoder threads. Lite names the frames of the groups after the current one as `wanted`;
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


def read_positions(reader, plan, positions, stash: FrameStash | None) -> torch.Tensor:
    """Frames at plan `positions` from `reader`; with an active stash, wanted frames the reader
    passes on the way are put in it."""
    idx = [plan.indices[int(p)] for p in positions]
    if stash is None or not stash.active:
        return reader.read(idx)[0]
    cand = stash.candidates(positions)
    if len(cand) == 0:
        return reader.read(idx)[0]
    info = plan.info
    room = stash.room(info.height * info.width * 3)
    if room <= 0:
        return reader.read(idx)[0]
    by_index: dict[int, list[int]] = {}
    for p in cand.tolist():
        by_index.setdefault(int(plan.indices[p]), []).append(p)
    return reader.read(idx, extra=list(by_index), max_extra=room,
                       on_extra=lambda i, f: stash.put(by_index[i], f))[0]


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
        out = torch.empty((len(self.positions), *first.shape), dtype=torch.uint8, pin_memory=self._pin)
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
    flag between reads. Exceptions come back through `_DecodeJob.result()`.
    """

    def __init__(self, video: "VideoHandle", workers: int, pin: bool = False,
                 min_part: int = 16, read_frames: int = 16, stash: FrameStash | None = None):
        self.video, self.workers, self.pin = video, max(1, int(workers)), pin
        self.stash = stash
        self.min_part, self.read_frames = max(1, min_part), max(1, read_frames)
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
            from .video import FrameReader
            info = self.video.plan.info
            r = FrameReader(info.path, backend=self.video.backend, info=info)
            self._readers[j] = r
        return r

    def _frame_shape(self) -> tuple[int, ...]:
        if self.video.frames is not None:
            return tuple(self.video.frames.shape[1:])
        info = self.video.plan.info
        return (info.height, info.width, 3)

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
                    frames = read_positions(self._reader(j), self.video.plan, pos, self.stash)
                out[start + i:start + i + len(pos)] = frames
        with self._lock:
            self.busy_seconds += time.perf_counter() - t0
            self.frames_read += len(positions)

    def submit(self, positions, lane: int | None = None) -> _DecodeJob:
        positions = np.asarray(positions, dtype=np.int64)
        n = len(positions)
        out = torch.empty((n, *self._frame_shape()), dtype=torch.uint8, pin_memory=self.pin)
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

    def __init__(self, video: "VideoHandle", positions, stash: FrameStash | None = None):
        self.positions = np.asarray(positions, dtype=np.int64)
        self._video = video
        self._stash = stash

    @property
    def num_frames(self) -> int:
        return len(self.positions)

    def result(self) -> torch.Tensor:
        return self._video.read(self.positions, stash=self._stash)

    def cancel(self) -> None:
        pass

    def wait(self) -> None:
        pass


def device_memory_budget(device: torch.device) -> int | None:
    """Bytes this process may allocate on a CUDA device: the card's memory times the per-process
    fraction (torch.cuda.set_per_process_memory_fraction), or None off CUDA."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    get = getattr(torch.cuda, "get_per_process_memory_fraction", None)
    frac = 1.0
    if get is not None:
        try:
            frac = float(get(index))
        except Exception:  # noqa: BLE001
            frac = 1.0
    return int(total * frac)


class PrefixKVCache:
    """Key/value states of each group pass's question-independent prefix (system prompt, vision
    start, the group's visual tokens), per decoder layer, so a new question on the same groups runs
    only its own tokens through the language model. The visual tokens come before the question and
    attention is causal, so their keys and values do not depend on the question: exact reuse.

    Kept on the model's device while everything allocated there stays under `fraction` of the
    device's memory budget (`device_memory_budget`); off CUDA at most `cpu_bytes`. A group that
    does not fit there goes to the host tier when `host_bytes` > 0 (CPU memory, copied back to the
    device when a later question uses it: a 10,000-frame video's 79 groups of Qwen2.5-VL-7B hold
    ~63 GB, more than a 24 GB card has); else it is not cached (its next question recomputes it)."""

    def __init__(self, fraction: float = 0.75, cpu_bytes: int = 2 * 2 ** 30, host_bytes: int = 0):
        self.fraction, self.cpu_bytes, self.host_bytes = fraction, cpu_bytes, int(host_bytes)
        self._store: dict = {}
        self._host: set = set()          # keys whose states live in the host tier
        self._pending: list = []         # (key, future) of copies to the host in flight
        self._stream = None
        self._next_slot = 0
        self.bytes = 0                   # on the device (or, off CUDA, in the primary tier)
        self.host_used = 0
        self.hits = self.stored = self.refused = self.host_stored = 0
        self.host_seconds = 0.0          # spent copying to and from the host tier

    def _to_host(self, key, kv: list) -> list:
        """CPU copies of `kv`. From CUDA the copy must not hold the GPU up: the states go on a side
        stream into one of two reused pinned staging buffers (pinning fresh memory runs at ~2 GB/s:
        63 GB of pinned copies cost a 10,000-frame first question 30 s), and a CPU thread then moves
        them into ordinary memory while the next group pass computes. `_pending` holds each copy's
        future until it is done; get() waits for it."""
        dev = kv[0][0].device
        if dev.type != "cuda":
            return [(k.to("cpu"), v.to("cpu")) for k, v in kv]
        if self._stream is None:
            self._stream = torch.cuda.Stream(dev)
            self._mover = ThreadPoolExecutor(1, thread_name_prefix="adapttoken-kv-host")
            self._staging = [None, None]
            self._slot_free = [None, None]      # future of the copy that last used each slot
        flat = [t for pair in kv for t in pair]
        nbytes = sum(t.numel() * t.element_size() for t in flat)
        slot = self._next_slot
        self._next_slot = 1 - slot
        if self._slot_free[slot] is not None:
            self._slot_free[slot].result()              # its previous copy has left the buffer
        buf = self._staging[slot]
        if buf is None or buf.numel() < nbytes:
            buf = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
            self._staging[slot] = buf
        out = [torch.empty(t.shape, dtype=t.dtype) for t in flat]
        views, off = [], 0
        for t in flat:
            n = t.numel() * t.element_size()
            views.append(buf[off:off + n].view(t.dtype).view(t.shape))
            off += n
        self._stream.wait_stream(torch.cuda.current_stream(dev))
        with torch.cuda.stream(self._stream):
            for v_, t in zip(views, flat):
                v_.copy_(t, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self._stream)

        held = [flat]                                   # the GPU sources live until the copy is done

        def move(ev=ev, views=views, out=out, held=held):
            ev.synchronize()
            held.clear()
            # `out` may be inference tensors (the caller runs under inference mode, which is
            # per thread): write to them in the same mode here
            with torch.inference_mode(out[0].is_inference()):
                for o, v_ in zip(out, views):
                    o.copy_(v_)

        fut = self._mover.submit(move)
        self._slot_free[slot] = fut
        self._pending.append((key, fut))
        return [(out[2 * i], out[2 * i + 1]) for i in range(len(kv))]

    def _wait(self, key) -> None:
        for i, (k, fut) in enumerate(self._pending):
            if k == key:
                fut.result()
                del self._pending[i]
                return

    def get(self, key, device=None):
        kv = self._store.get(key)
        if kv is None:
            return None
        self.hits += 1
        if key in self._host and device is not None:
            self._wait(key)
            t0 = time.perf_counter()
            kv = [(k.to(device, non_blocking=k.is_pinned()), v.to(device, non_blocking=v.is_pinned()))
                  for k, v in kv]
            self.host_seconds += time.perf_counter() - t0
        return kv

    def room(self, nbytes: int, device: torch.device) -> bool:
        budget = device_memory_budget(device)
        if budget is None:
            return self.bytes + nbytes <= self.cpu_bytes
        return torch.cuda.memory_allocated(device) + nbytes <= self.fraction * budget

    def put(self, key, kv: list, nbytes: int) -> None:
        self._store[key] = kv
        self.bytes += nbytes
        self.stored += 1

    def offer(self, key, kv: list, nbytes: int, device: torch.device) -> bool:
        """Keep `kv` on the device if there is room, else in the host tier if it has room; False
        when neither has (counted in `refused`)."""
        if self.room(nbytes, device):
            self.put(key, kv, nbytes)
            return True
        if self.host_used + nbytes <= self.host_bytes:
            t0 = time.perf_counter()
            self._store[key] = self._to_host(key, kv)
            self.host_seconds += time.perf_counter() - t0
            self._host.add(key)
            self.host_used += nbytes
            self.stored += 1
            self.host_stored += 1
            return True
        self.refused += 1
        return False

    def clear(self) -> None:
        for _, fut in self._pending:
            try:
                fut.result()             # no copy keeps writing into states being dropped
            except Exception:  # noqa: BLE001 - a failed copy of states nobody will use
                pass
        self._pending.clear()
        self._store.clear()
        self._host.clear()
        self.bytes = self.host_used = 0


FEATURE_DEVICES = ("auto", "gpu", "cpu")
DEFAULT_GPU_FEATURE_BYTES = 4 * 2 ** 30


class SliceFeatures:
    """Vision features of one video for one model, computed per slice on demand and kept.

    Options (see `configure`):
    - feature_device: where the computed features live. "auto" (default) keeps them on the model's
      device while all slices of the video would take at most `gpu_feature_bytes` (4 GiB, and at
      most 20% of the card), else in CPU memory, copied to the device per group pass through a
      pinned buffer; "gpu" / "cpu" force one. 10,000 frames at 308x560 for Qwen2.5-VL-7B are
      5000 slices * 220 tokens * 3584 * 2 bytes = 7.9 GB: CPU memory under "auto".
    - decode_workers: decoder threads, each with its own FrameReader (0: decode in the calling
      thread, no overlap).
    - overlap: decode chunk i+1 on the decoder threads while the model encodes chunk i (at most two
      chunks of decoded frames wait at any time, plus at most `lookahead` chunks decoded ahead for
      the next group pass: see `lookahead()`).
    - cache_dir: an on-disk cache of the features (feature_cache.py), keyed by the file's content,
      the sampling and the model; another process with the same video and sampling loads them
      instead of decoding and encoding.
    - frame_stash_bytes: how many bytes of decoded frames Lite may hold for the groups after the
      current one (`ride_along`, FrameStash; 0: off). Strided groups put the next groups' frames
      right after the current group's, so a read that seeks to each of the current group's slices
      can take theirs for a few more decoded frames instead of seeking again later.
    """

    def __init__(self, adapter, video: VideoHandle, chunk_slices: int = 32, *,
                 feature_device: str = "auto", decode_workers: int | None = None,
                 overlap: bool = True, cache_dir=None, lookahead_chunks: int = 4,
                 gpu_feature_bytes: int = DEFAULT_GPU_FEATURE_BYTES, pad_chunks: bool = False):
        self.adapter, self.video = adapter, video
        info, plan = video.info, video.plan
        self.resized = adapter.resized_size(info.height, info.width, plan.min_pixels, plan.max_pixels)
        self.grid = adapter.token_grid(self.resized)
        self.tokens_per_slice = self.grid[0] * self.grid[1]
        self.num_slices = video.num_slices
        self.chunk_slices = chunk_slices
        times = torch.as_tensor(video.slice_times())
        self.t_pos = adapter.time_positions(times)                 # [num_slices] long
        self._blocks: list[torch.Tensor | None] = [None] * (-(-self.num_slices // chunk_slices))
        self._store_device: torch.device | None = None
        self._have = torch.zeros(self.num_slices, dtype=torch.bool)
        self._decoder: FrameDecoder | None = None
        self._ahead: dict[tuple[int, ...], object] = {}
        self.stash = FrameStash(DEFAULT_FRAME_STASH_BYTES)
        self._disk = None
        self._cache_dir = None
        self._prefix_host_bytes = 0
        self.prefix_kv: PrefixKVCache | None = PrefixKVCache()
        self.feature_device = "auto"
        self.decode_workers = default_decode_workers()
        self.overlap = True
        self.lookahead_chunks = lookahead_chunks
        self.gpu_feature_bytes = gpu_feature_bytes
        self.pad_chunks = pad_chunks
        self.configure(feature_device=feature_device, decode_workers=decode_workers,
                       overlap=overlap, cache_dir=cache_dir)
        self.reset_stats()

    # -- options -------------------------------------------------------------------------------
    def configure(self, *, feature_device: str | None = None, decode_workers: int | None = None,
                  overlap: bool | None = None, cache_dir=None, pad_chunks: bool | None = None,
                  gpu_feature_bytes: int | None = None, prefix_cache: bool | None = None,
                  frame_stash_bytes: int | None = None, prefix_host_bytes: int | None = None
                  ) -> "SliceFeatures":
        """Change options (None leaves one as it is). Features already computed stay valid: they
        move when the storage device changes. prefix_cache: keep each group pass's prefix
        keys/values for later questions (PrefixKVCache); prefix_host_bytes: how much of them may
        live in CPU memory when the device is full (0: none)."""
        if prefix_cache is not None:
            if not prefix_cache:
                self.prefix_kv = None
            elif self.prefix_kv is None:
                self.prefix_kv = PrefixKVCache(host_bytes=self._prefix_host_bytes)
        if prefix_host_bytes is not None:
            if prefix_host_bytes < 0:
                raise InputError(f"prefix_host_bytes={prefix_host_bytes} must be >= 0 (0: off)")
            self._prefix_host_bytes = int(prefix_host_bytes)
            if self.prefix_kv is not None:
                self.prefix_kv.host_bytes = int(prefix_host_bytes)
        if feature_device is not None:
            if feature_device not in FEATURE_DEVICES:
                raise InputError(f"feature_device={feature_device!r} is not known: use one of "
                                 f"{', '.join(FEATURE_DEVICES)}")
            if feature_device != self.feature_device:
                self.feature_device = feature_device
                if self._store_device is not None:
                    self._move_storage(self._pick_store_device(self._slice_bytes()))
        if gpu_feature_bytes is not None:
            self.gpu_feature_bytes = int(gpu_feature_bytes)
        if frame_stash_bytes is not None:
            if frame_stash_bytes < 0:
                raise InputError(f"frame_stash_bytes={frame_stash_bytes} must be >= 0 (0: off)")
            self.stash.clear()
            self.stash.limit = int(frame_stash_bytes)
        if decode_workers is not None:
            if decode_workers < 0:
                raise InputError(f"decode_workers={decode_workers} must be >= 0 (0: no threads)")
            if decode_workers != self.decode_workers and self._decoder is not None:
                self.drop_lookahead()
                self._decoder.close()
                self._decoder = None
            self.decode_workers = int(decode_workers)
        if overlap is not None:
            self.overlap = bool(overlap)
        if pad_chunks is not None:
            self.pad_chunks = bool(pad_chunks)
        if cache_dir is not None and self.video.frames is None:
            cache_dir = os.fspath(cache_dir)
            if cache_dir != self._cache_dir:
                from .feature_cache import DiskFeatureCache, cache_key
                if self._disk is not None:
                    self._disk.close()
                key = cache_key(self.adapter, self.video, self.resized)
                self._disk = DiskFeatureCache(cache_dir, key, self.tokens_per_slice)
                self._cache_dir = cache_dir
        return self

    # -- bookkeeping ---------------------------------------------------------------------------
    @property
    def num_tokens(self) -> int:
        return self.num_slices * self.tokens_per_slice

    @property
    def storage_device(self) -> torch.device | None:
        """Where the features live (None until the first slice is computed)."""
        return self._store_device

    @property
    def disk_cache(self):
        return self._disk

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
        self.stats = {"cache_loaded_slices": 0, "lookahead_frames": 0, "lookahead_wasted_frames": 0,
                      "decode_busy_s": 0.0, "h2d_bytes": 0, "d2h_bytes": 0}
        st = self.stash
        self._stash0 = (st.captured, st.used, st.wasted)
        self._busy0 = self._decoder.busy_seconds if self._decoder is not None else 0.0

    def stash_stats(self) -> dict[str, int]:
        """Frames Lite's stash took on the way, used later, and dropped unused since reset_stats."""
        st, (c, u, w) = self.stash, self._stash0
        return {"ride_along_frames": st.captured - c, "ride_along_used_frames": st.used - u,
                "ride_along_wasted_frames": st.wasted - w}

    def decode_busy_seconds(self) -> float:
        """Seconds the decoder threads worked since reset_stats (summed over threads)."""
        if self._decoder is None:
            return 0.0
        return self._decoder.busy_seconds - self._busy0

    def release(self) -> None:
        self.drop_lookahead()                    # also empties the frame stash
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None
        if self._disk is not None:
            self._disk.close()
        if self.prefix_kv is not None:
            self.prefix_kv.clear()
        self._blocks = [None] * len(self._blocks)
        self._store_device = None
        self._have = torch.zeros_like(self._have)   # not in place: may be an inference tensor
        self.video.close()

    # -- storage -------------------------------------------------------------------------------
    def _compute_device(self) -> torch.device:
        return self.adapter.device

    def _slice_bytes(self) -> int:
        for b in self._blocks:
            if b is not None:
                return b[0].numel() * b.element_size()
        return 0

    def _pick_store_device(self, slice_bytes: int) -> torch.device:
        dev = self._compute_device()
        if self.feature_device == "cpu":
            return torch.device("cpu")
        if self.feature_device == "gpu" or dev.type != "cuda":
            return dev
        total = slice_bytes * self.num_slices
        limit = self.gpu_feature_bytes
        try:
            limit = min(limit, int(0.2 * device_memory_budget(dev)))
        except Exception:  # noqa: BLE001
            pass
        return dev if total <= limit else torch.device("cpu")

    def _move_storage(self, dev: torch.device) -> None:
        if dev == self._store_device:
            return
        self._blocks = [None if b is None else b.to(dev) for b in self._blocks]
        self._store_device = dev

    def _block(self, b: int, like: torch.Tensor) -> torch.Tensor:
        blk = self._blocks[b]
        if blk is None:
            blk = torch.empty(self.chunk_slices, *like.shape[1:], dtype=like.dtype,
                              device=self._store_device)
            self._blocks[b] = blk
        return blk

    def _store(self, slices: np.ndarray, feats: torch.Tensor) -> torch.Tensor:
        """Keep features [n, tps, D] of the sorted `slices`; returns them on the storage device."""
        if self._store_device is None:
            self._store_device = self._pick_store_device(feats[0].numel() * feats.element_size())
        if feats.device != self._store_device:
            if self._store_device.type == "cpu":
                self.stats["d2h_bytes"] += feats.numel() * feats.element_size()
            feats = feats.to(self._store_device)
        cs = self.chunk_slices
        blocks = slices // cs
        for b in np.unique(blocks):
            sel = np.nonzero(blocks == b)[0]
            rows = torch.as_tensor(slices[sel] - b * cs, device=feats.device)
            self._block(int(b), feats).index_copy_(0, rows, feats[torch.as_tensor(sel, device=feats.device)])
        self._have[torch.as_tensor(slices)] = True
        return feats

    def _to_compute(self, x: torch.Tensor) -> torch.Tensor:
        dev = self._compute_device()
        if x.device == dev:
            return x
        self.stats["h2d_bytes"] += x.numel() * x.element_size()
        return x.to(dev, non_blocking=x.is_pinned())

    def _pinned_like(self, shape, dtype) -> torch.Tensor:
        pin = self._store_device.type == "cpu" and self._compute_device().type == "cuda"
        return torch.empty(shape, dtype=dtype, pin_memory=pin)

    def _gather_slices(self, slices: np.ndarray) -> torch.Tensor:
        """[n * tps, D] features of the given slices (in that order) on the compute device."""
        cs = self.chunk_slices
        parts = [self._blocks[int(s) // cs][int(s) % cs] for s in slices]
        D, dtype = parts[0].shape[-1], parts[0].dtype
        if self._store_device.type == "cpu":
            out = self._pinned_like((len(parts), self.tokens_per_slice, D), dtype)
            torch.stack(parts, out=out)
        else:
            out = torch.stack(parts)
        return self._to_compute(out.view(-1, D))

    def _gather_rows(self, gids: torch.Tensor) -> torch.Tensor:
        """[n, D] features of global token ids on the compute device (one copy per storage block,
        no host round trip per block)."""
        tps, cs = self.tokens_per_slice, self.chunk_slices
        gids = gids.long()
        blk_of = gids // (tps * cs)
        order = torch.argsort(blk_of, stable=True)
        sb = blk_of[order]
        rows = (gids[order] - sb * (tps * cs))
        ub, counts = torch.unique_consecutive(sb, return_counts=True)
        first = next(x for x in self._blocks if x is not None)
        D, dtype, dev = first.shape[-1], first.dtype, first.device
        if dev.type == "cpu":
            out = self._pinned_like((len(gids), D), dtype)
        else:
            out = torch.empty(len(gids), D, dtype=dtype, device=dev)
            rows = rows.to(dev, non_blocking=True)
        sorted_out = torch.empty_like(out) if dev.type != "cpu" else torch.empty(len(gids), D, dtype=dtype)
        a = 0
        for b_, n_ in zip(ub.tolist(), counts.tolist()):
            torch.index_select(self._blocks[b_].view(-1, D), 0, rows[a:a + n_], out=sorted_out[a:a + n_])
            a += n_
        out[order.to(dev)] = sorted_out
        return self._to_compute(out)

    # -- compute -------------------------------------------------------------------------------
    def _chunks(self, need: list[int]) -> list[np.ndarray]:
        return [np.asarray(need[i:i + self.chunk_slices], dtype=np.int64)
                for i in range(0, len(need), self.chunk_slices)]

    def _missing(self, slices) -> list[int]:
        u = np.unique(np.asarray(slices, dtype=np.int64))
        need = u[~self._have.numpy()[u]].tolist()
        if self._disk is not None:
            need = [s for s in need if not self._disk.has(s)]
        return need

    def _get_decoder(self) -> FrameDecoder | None:
        if self.decode_workers <= 0:
            return None
        if self._decoder is None:
            pin = self._compute_device().type == "cuda" and torch.cuda.is_available()
            self._decoder = FrameDecoder(self.video, self.decode_workers, pin=pin, stash=self.stash)
        return self._decoder

    def lookahead(self, slices) -> None:
        """Start decoding (not encoding) the first chunks of `slices` on the decoder threads, so the
        next `ensure(slices)` finds its frames ready: Lite calls it for group g+1 before group g's
        pass. Frames decoded ahead count in `decoded_frames` only when used."""
        if not self.overlap or self.lookahead_chunks <= 0 or self._get_decoder() is None:
            return
        for chunk in self._chunks(self._missing(slices))[: self.lookahead_chunks]:
            key = tuple(chunk.tolist())
            if key in self._ahead or self.stash.has_all(self.video.frame_positions(chunk)):
                continue
            if len(self._ahead) >= self.lookahead_chunks:   # bound the frames held; the oldest
                break                                       # are needed first, so keep them
            self._ahead[key] = self._submit(chunk, None)
            self.stats["lookahead_frames"] += len(chunk) * self.video.frames_per_slice

    def drop_lookahead(self) -> None:
        """Cancel frames decoded ahead that nobody asked for (Lite stopped); empty the stash."""
        for job in self._ahead.values():
            job.cancel()
            self.stats["lookahead_wasted_frames"] += job.num_frames
        for job in self._ahead.values():
            job.wait()               # no lane keeps filling the stash after this
        self._ahead.clear()
        self.stash.clear()

    def ride_along(self, slices) -> None:
        """Name the slices wanted after the current request (Lite: the groups after the current
        one), so reads take their frames into the stash when that is cheap; None stops it. Slices
        already computed or being decoded ahead are left out."""
        if slices is None or self.video.frames is not None or self.stash.limit <= 0:
            self.stash.set_wanted(None)
            return
        need = self._missing(slices)
        pos = self.video.frame_positions(np.asarray(need, dtype=np.int64)) if need else np.empty(0, np.int64)
        if self._ahead and len(pos):
            busy = np.concatenate([self.video.frame_positions(np.asarray(k)) for k in self._ahead])
            pos = np.setdiff1d(pos, busy)
        self.stash.set_wanted(pos)

    def _load_from_disk(self, slices) -> None:
        t0 = time.perf_counter()
        want = [s for s in self._disk.present(slices) if not self._have[s]]
        if not want:
            return
        dtype = self.adapter.dtype
        got, feats = self._disk.load(want, dtype)
        if got:
            order = np.argsort(got)
            got_arr = np.asarray(got, dtype=np.int64)[order]
            self._store(got_arr, feats[torch.as_tensor(order)])
            self.stats["cache_loaded_slices"] += len(got)
        self.timer.add("cache_load", time.perf_counter() - t0)

    def _encode(self, chunk: np.ndarray, frames: torch.Tensor) -> None:
        dev = self._compute_device()
        t0 = time.perf_counter()
        n = len(chunk)
        if self.pad_chunks and n < self.chunk_slices:   # fixed shapes (torch.compile): repeat last
            fps = self.video.frames_per_slice
            pad = frames[-1:].expand((self.chunk_slices - n) * fps, *frames.shape[1:])
            frames = torch.cat([frames, pad])
        if frames.device != dev:
            frames = frames.to(dev, non_blocking=frames.is_pinned())
        if hasattr(self.adapter, "preprocess") and hasattr(self.adapter, "encode_pixels"):
            pixels = self.adapter.preprocess(frames, self.resized)
            self.timer.add("preprocess", time.perf_counter() - t0, sync=dev)
            t0 = time.perf_counter()
            feats = self.adapter.encode_pixels(pixels, self.resized)
        else:
            feats = self.adapter.encode(frames, self.resized)       # [n, tps, D]
        feats = feats[:n]
        stored = self._store(chunk, feats)
        self.encoded_slices += n
        self.timer.add("vision", time.perf_counter() - t0, sync=dev)
        if self._disk is not None:
            self._disk.write_async(chunk.tolist(), stored if stored.device.type == "cpu" else feats.cpu())

    def _schedule(self, chunks: list[np.ndarray]) -> list[tuple[np.ndarray, int | None]]:
        """(chunk, lane) in the order they are encoded. Many chunks: split them into contiguous runs,
        one per decoder lane, and encode round-robin over the lanes, so every lane reads its part of
        the video sequentially while the others do theirs. Few chunks: lane None (each chunk is
        split over the lanes)."""
        workers = self.decode_workers if self._get_decoder() is not None else 0
        lanes = min(workers, len(chunks) // 2) if self.overlap else 0
        if lanes < 2:
            return [(c, None) for c in chunks]
        bounds = np.linspace(0, len(chunks), lanes + 1).round().astype(int)
        runs = [chunks[a:b] for a, b in zip(bounds[:-1], bounds[1:])]
        order = []
        for k in range(max(len(r) for r in runs)):
            for j, r in enumerate(runs):
                if k < len(r):
                    order.append((r[k], j))
        return order

    def _submit(self, chunk: np.ndarray, lane: int | None):
        positions = self.video.frame_positions(chunk)
        job = self._ahead.pop(tuple(chunk.tolist()), None)
        if job is not None:
            self.stash.discard(positions)        # a ride-along copy of the same frames, if any
            return job
        have = self.stash.take(positions) if self.stash.bytes else {}
        rest = positions if not have else np.asarray([p for p in positions.tolist() if p not in have],
                                                     dtype=np.int64)
        job = None
        if len(rest):
            dec = self._get_decoder()
            job = _SyncJob(self.video, rest, self.stash) if dec is None else dec.submit(rest, lane)
        if not have:
            return job
        dec = self._decoder
        return _ReadyJob(positions, have, job, pin=dec is not None and dec.pin)

    def ensure(self, slices, hooks=None) -> None:
        """Decode and encode the slices not computed yet, in chunks. With `overlap`, the decoder
        lanes read ahead while the model encodes: one chunk ahead per lane (see `_schedule`), so at
        most lanes + 1 chunks of frames are held (2 when the request is a single group)."""
        if self._disk is not None:
            self._load_from_disk(np.unique(np.asarray(slices)))
        chunks = self._chunks(self._missing(slices))
        if not chunks:
            return
        order = self._schedule(chunks)
        lane_of = [lane for _, lane in order]
        inflight: dict[int, object] = {}        # position in `order` -> job
        nxt = 0

        def submit_next():
            nonlocal nxt
            inflight[nxt] = self._submit(*order[nxt])
            nxt += 1

        try:
            lanes = len({lane for lane in lane_of if lane is not None})
            while nxt < min(len(order), lanes if self.overlap and lanes else 1):
                submit_next()                     # one chunk per lane (or one chunk) in flight
            for i in range(len(order)):
                if hooks is not None:
                    hooks.check()
                while nxt <= i:
                    submit_next()
                job = inflight.pop(i)
                chunk = order[i][0]
                t0 = time.perf_counter()
                frames = job.result()
                self.timer.add("decode", time.perf_counter() - t0)
                self.decoded_frames += frames.shape[0]
                if self.overlap and nxt < len(order):    # the next chunk decodes during this encode
                    submit_next()
                self._encode(chunk, frames)
                del frames
        except BaseException:
            for job in inflight.values():
                job.cancel()
            for job in inflight.values():
                job.wait()               # no worker keeps writing into frames nobody holds
            raise
        finally:
            if self._disk is not None:
                self._disk.flush()

    def prefetch(self, hooks=None) -> None:
        """Compute every slice in temporal order (sequential decoding: the full method needs all)."""
        self.ensure(np.arange(self.num_slices), hooks)

    def tokens(self, gids: torch.Tensor, hooks=None):
        """(embeds [n, D], coords [3, n]) of the given global token ids (computing what is missing),
        embeds on the model's device."""
        gids = gids.cpu()
        self.ensure(torch.unique(gids // self.tokens_per_slice).numpy(), hooks)
        return self._gather_rows(gids), self.coords_of(gids)

    def tokens_of_slices(self, slices, hooks=None):
        """(embeds, coords, gids) of every token of the given slices, in temporal order."""
        slices = np.sort(np.asarray(slices))
        gids = self.gids_of_slices(slices)
        self.ensure(slices, hooks)
        return self._gather_slices(slices), self.coords_of(gids), gids
