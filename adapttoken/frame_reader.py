"""Reading frames: `FrameReader(path).read(indices)` -> uint8 frames [N, H, W, 3], upright, plus
their timestamps, from one of two sources (decord, else PyAV). Decodes only what the request needs
and holds only the requested frames in memory. `plan_extras`: which further frames a read may take
on its way (Lite's ride-along, decode.FrameStash).

Frame indices are those of video.py's probe (presentation order, frames really in the file).
"""
from __future__ import annotations

import logging
import os
import threading
from typing import Iterator, Sequence

import av
import numpy as np
import torch
import torch.utils.dlpack

from .errors import InputError, VideoError
from .video import VideoInfo, _check_int, _open, probe_video
from .yuv import Yuv420

__all__ = ["FrameReader", "SEEK_COST_FRAMES", "plan_extras", "uses_pyav"]

logger = logging.getLogger(__name__)

# PyAV backend, strategy "auto": seek to the target's keyframe only when that skips more than this
# many frames that sequential reading would decode and throw away. Measured on the 2-core dev machine
# with 640x360 H.264: seek + decoder flush + refilling the threaded decoder costs about 10 ms, decoding
# one frame about 1 ms, so a seek pays off once it saves more than about 10 frames.
SEEK_COST_FRAMES = 10


def _upright(img: np.ndarray, rotation: int) -> np.ndarray:
    """Turn a stored [H, W, 3] picture clockwise by `rotation` degrees (np.rot90 turns counter-clockwise)."""
    return np.rot90(img, k=-(rotation // 90)) if rotation else img


def _truncated(path: str, frame: int, detail: str) -> VideoError:
    return VideoError(
        f"frame {frame} of {path} could not be decoded ({detail}): the file looks truncated or damaged: "
        "re-download it"
    )


class _PyAVSource:
    """Decodes frames with PyAV, reading sequentially and seeking only where it saves work."""

    name = "pyav"

    def __init__(self, path: str, info: VideoInfo, device: torch.device | None = None) -> None:
        self.path, self.info = path, info
        self.device = device  # a CUDA device: decode on its NVDEC (nvdec.py); planes stay there
        self.index = info.frame_index
        turned = info.rotation in (90, 270)
        self.width, self.height = (info.height, info.width) if turned else (info.width, info.height)
        self.container: av.container.InputContainer | None = None
        self.frames: Iterator[av.VideoFrame] | None = None
        self.last = -1  # presentation index of the last frame taken from `frames`
        self.count = -1  # decode-output counter (frame numbering when pts are unreliable)
        self.errors: list[str] = []
        self.yuv: Yuv420 | None = None  # set: read() yields the stored 4:2:0 planes, not RGB
        self._restart()

    def _restart(self) -> None:
        """(Re)open the file and position before frame 0."""
        self.close()
        hw = None
        if self.device is not None:
            from .nvdec import hwaccel
            torch.cuda.set_device(self.device)     # FFmpeg decodes in this thread's context
            hw = hwaccel(self.device)
        self.container = _open(self.path, hw)
        stream = self.container.streams[self.index.stream_index]
        stream.codec_context.thread_type = "AUTO"
        self.stream = stream
        self.frames = self._decode()
        self.last = self.count = -1

    def _decode(self) -> Iterator[av.VideoFrame]:
        """Frames in output order. Partial packets (a cut-off file) are not fed to the decoder: they
        are not in the frame table, and with frame threading an error can swallow the frames still in
        flight. A packet the decoder rejects is skipped and remembered for the error message."""
        for packet in self.container.demux(self.stream):
            if packet.is_corrupt:
                self.errors.append("partial packet: the file is cut short")
                continue
            try:
                out = packet.decode()
            except av.error.FFmpegError as e:
                self.errors.append(e.strerror or type(e).__name__)
                continue
            yield from out

    def _frame_number(self, frame: av.VideoFrame) -> int | None:
        """Presentation index of a decoded frame, or None when its pts is not in the table."""
        self.count += 1
        if not self.index.pts_reliable:
            return self.count
        if frame.pts is None:
            return self.last + 1
        i = int(np.searchsorted(self.index.pts, frame.pts))
        return i if i < len(self.index.pts) and self.index.pts[i] == frame.pts else None

    def _seek(self, keyframe: int) -> None:
        """Seek so that decoding resumes at `keyframe` (or earlier); restart from 0 if seeking fails."""
        if keyframe == 0 or not self.index.pts_reliable:
            self._restart()
            return
        try:
            self.container.seek(int(self.index.pts[keyframe]), stream=self.stream, backward=True)
        except av.error.FFmpegError:
            self._restart()
            return
        self.frames = self._decode()
        self.last = keyframe - 1  # a guess until the first frame arrives; checked in _advance

    def _advance(self, target: int) -> np.ndarray | None:
        """Decode forward to `target`; None if the stream ends or runs past it (frame missing)."""
        for frame in self.frames:
            i = self._frame_number(frame)
            if i is None or i < target:
                if i is not None:
                    self.last = i
                continue
            self.last = i
            if i > target:
                return None
            if frame.is_corrupt:
                logger.warning("%s: frame %d was decoded with errors (damaged data)", self.path, target)
            if frame.format.name == "cuda":        # NVDEC: a surface in device memory
                if self.yuv is None or (frame.width, frame.height) != (self.width, self.height):
                    raise _truncated(self.path, target, "a hardware-decoded frame that is not the "
                                     "stream's 4:2:0 picture")
                from .nvdec import planes_on_device
                return planes_on_device(frame)
            fmt = "rgb24" if self.yuv is None else self.yuv.pix_fmt     # yuv: the stored planes
            if (frame.width, frame.height) != (self.width, self.height):  # size changed mid-stream
                return frame.to_ndarray(format=fmt, width=self.width, height=self.height)
            return frame.to_ndarray(format=fmt)
        return None

    def read(self, targets: Sequence[int], strategy: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, stored RGB picture, or planes [H*3/2, W] with `yuv`) for sorted, distinct
        targets."""
        self.errors = []
        for t in targets:
            k = self.index.keyframe_before(t)
            if t <= self.last:
                seek = True  # going back (an earlier read left the decoder past t)
            elif strategy == "seek":
                seek = True
            elif strategy == "sequential":
                seek = False
            else:  # frames decoded and thrown away before reaching the keyframe vs the cost of a seek
                seek = k - self.last - 1 > SEEK_COST_FRAMES
            if seek:
                self._seek(k)
            from_start = self.last < 0  # a fresh open (or a "seek" to frame 0, which reopens)
            img = self._advance(t)
            if img is None and not from_start:
                # The seek landed after the target (inexact index) or the decoder ran dry: decode
                # from the start of the file instead (slow, but only on such files).
                self._restart()
                img = self._advance(t)
            if img is None:
                detail = "; ".join(dict.fromkeys(self.errors)) or "the stream ended before it"
                raise _truncated(self.path, t, detail)
            yield t, img

    def park(self) -> None:
        """Nothing to do: PyAV decodes only when asked."""

    def close(self) -> None:
        if self.container is not None:
            self.container.close()
            self.container = None
            self.frames = None


class _DecordSource:
    """Decodes frames with decord; frame numbering is checked against the PyAV-built FrameIndex."""

    name = "decord"

    def __init__(self, path: str, info: VideoInfo) -> None:
        import decord  # noqa: F401  (ImportError tells the caller decord is missing)

        self.path, self.info = path, info
        if info.frame_index is not None and info.frame_index.params_change:
            raise VideoError(f"the picture size of {path} may change mid-stream, which decord cannot "
                             "follow: use backend='pyav'")
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
        except Exception as e:  # decord raises RuntimeError / DECORDError / AssertionError
            raise VideoError(f"decord cannot open {path} ({_short(e)}): use backend='pyav'") from e
        n = len(self.vr)
        if n != info.num_frames:
            raise VideoError(
                f"decord counts {n} frames in {path} but {info.num_frames} are readable: use backend='pyav'"
            )
        ts = self.vr.get_frame_timestamp(np.arange(n))[:, 0].astype(np.float64)
        drift = float(np.max(np.abs((ts - ts[0]) - info.frame_times))) if n else 0.0
        if drift > 2e-3:  # decord's times are float32: allow rounding, not a different frame order
            raise VideoError(
                f"decord's frame times for {path} differ from the container's by {drift:.3f} s: use backend='pyav'"
            )
        self.pos = 0  # index of the frame vr.next() returns
        self.parked = False  # park() rewound the reader: the next read seeks
        self.rotate = self._rotation_needed() if info.rotation else 0

    def _rotation_needed(self) -> int:
        """Degrees we still have to turn decord's frames: decord >= 0.6 applies rotation itself, older
        builds do not. Decide by comparing frame 0 with PyAV's upright frame 0."""
        first = self._next(0)
        ref = _reference_frame(self.path, self.info)
        for rot in (0, self.info.rotation):
            cand = _upright(first, rot)
            if cand.shape == ref.shape and np.abs(cand.astype(np.int16) - ref).mean() < 12:
                return rot
        raise VideoError(f"decord's frames of {self.path} do not match the file's rotation: use backend='pyav'")

    def _next(self, target: int) -> np.ndarray:
        try:
            img = _decord_array(self.vr.next())
        except Exception as e:
            raise _truncated(self.path, target, _short(e)) from e
        self.pos = target + 1
        return img

    def read(self, targets: Sequence[int], strategy: str) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (index, picture). "seek": decord's accurate seek per frame; otherwise decord's
        skip_frames, which decodes forward and jumps to a keyframe only when it passes one."""
        for t in targets:
            try:
                if strategy == "seek" or t < self.pos or self.parked:
                    self.vr.seek_accurate(int(t))
                    self.parked = False
                elif t > self.pos:
                    self.vr.skip_frames(int(t - self.pos))
            except Exception as e:
                raise _truncated(self.path, t, _short(e)) from e
            yield t, _upright(self._next(t), self.rotate)

    def park(self) -> None:
        """Stop decord's background thread: after a read it decodes on to the end of the file,
        keeping every frame (a 4K frame is 25 MB as RGB: ~0.3 GB a second while the caller does
        something else). A seek to frame 0 stops it; the next read seeks to its first frame."""
        if self.vr is not None and not self.parked:
            self.vr.seek(0)
            self.pos, self.parked = 0, True

    def close(self) -> None:
        self.vr = None


_libc_trim = None


def release_freed_memory() -> bool:
    """Give the C heap's free pages back to the system (glibc's `malloc_trim(0)`; elsewhere a
    no-op that returns False). Called after each read with decord: decord allocates every decoded
    frame in its decoding thread, and glibc serves allocations below its mmap threshold (which it
    raises up to 32 MB after large frees, so a 4K frame of 24.9 MB qualifies) from that thread's own
    arena, which grows and keeps the freed frames: 1.3 GB after 1024 4K frames. Trimming changes no
    allocator setting; it only returns pages that are free at that moment, in every arena."""
    global _libc_trim
    if _libc_trim is None:
        fn = False
        try:
            import ctypes
            fn = ctypes.CDLL(None).malloc_trim
            fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
        except (OSError, AttributeError, TypeError):
            fn = False
        _libc_trim = fn
    if not _libc_trim:
        return False
    _libc_trim(0)
    return True


def _decord_array(frame) -> np.ndarray:
    """A frame decord returned, as a numpy array that shares decord's buffer (no copy): a 4K frame
    is 24.9 MB, and `asnumpy()` would allocate and fill a second one per decoded frame, which the
    C allocator tends to keep after it is freed (see DESIGN.md, "Host memory of decoding")."""
    if isinstance(frame, torch.Tensor):              # decord.bridge.set_bridge("torch")
        return frame.numpy()
    to_dlpack = getattr(frame, "to_dlpack", None)
    if to_dlpack is not None:
        return torch.utils.dlpack.from_dlpack(to_dlpack()).numpy()
    return frame.asnumpy() if hasattr(frame, "asnumpy") else np.asarray(frame)


def _short(e: BaseException) -> str:
    """First line of an exception message, without decord's long C++ prefixes."""
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return text.split("] ")[-1][:160]


def _reference_frame(path: str, info: VideoInfo) -> np.ndarray:
    """Frame 0 decoded by PyAV and turned upright (used to check another backend)."""
    src = _PyAVSource(path, info)
    try:
        (_, img), = src.read([0], "sequential")
        return _upright(img, info.rotation).astype(np.int16)
    finally:
        src.close()


def _changed(info: VideoInfo) -> bool:
    """True when the file on disk is not the version `info` describes (size or mtime differ)."""
    try:
        st = os.stat(info.path)
    except OSError:
        return True
    return (st.st_size, st.st_mtime_ns) != (info.file_size, info.mtime_ns)


_BACKENDS = ("auto", "decord", "pyav")


def uses_pyav(backend: str) -> bool:
    """True when a FrameReader with this backend decodes with PyAV whatever the file: "pyav", or
    "auto" where decord is not installed."""
    import importlib.util
    return backend == "pyav" or (backend == "auto" and importlib.util.find_spec("decord") is None)
_STRATEGIES = ("auto", "sequential", "seek")


def _reach_cost(last: int, x: int, keyframe_before, can_seek: bool) -> float:
    """Frames decoded (a seek counted as SEEK_COST_FRAMES) to go from having decoded frame `last` to
    frame x > last, reading the way the PyAV source's "auto" strategy does."""
    k = keyframe_before(x)
    if can_seek and k - last - 1 > SEEK_COST_FRAMES:
        return SEEK_COST_FRAMES + x - k + 1
    return x - last


def plan_extras(targets: Sequence[int], candidates: Sequence[int], last: int, keyframe_before,
                can_seek: bool = True, limit: int | None = None) -> list[int]:
    """The candidate frames worth decoding on the way to `targets` (both sorted, distinct, disjoint):
    a candidate is taken when it is decoded anyway, or when the extra frames it costs, summed since
    the last target, stay within SEEK_COST_FRAMES (also after the last target). `last`: the frame
    the reader decoded last (-1: none). At most `limit` are taken."""
    out: list[int] = []
    limit = len(candidates) if limit is None else limit
    ti, spent = 0, 0.0
    for e in candidates:
        if len(out) >= limit:
            break
        while ti < len(targets) and targets[ti] < e:
            last, spent = targets[ti], 0.0
            ti += 1
        if e <= last:
            continue
        if ti < len(targets):
            nxt = targets[ti]
            cost = (_reach_cost(last, e, keyframe_before, can_seek) + _reach_cost(e, nxt, keyframe_before, can_seek)
                    - _reach_cost(last, nxt, keyframe_before, can_seek))
        elif targets:
            cost = _reach_cost(last, e, keyframe_before, can_seek)
        else:
            break                       # nothing wanted: read nothing extra
        if spent + cost <= SEEK_COST_FRAMES:
            out.append(e)
            last, spent = e, spent + cost
    return out


class FrameReader:
    """One open video file; `read(indices)` decodes just those frames. Not thread-safe.

    backend: "auto" (decord, else PyAV when decord is missing, disagrees with the container's frame
    table, or fails on the file, also in the middle of a read), "decord" or "pyav". `backend_used`
    says which one is active. Frames come back upright (rotation metadata applied) as RGB uint8.
    device (a CUDA device, PyAV only, reads with `yuv` only): decode on its NVDEC (nvdec.py), the
    planes come back in that device's memory; frames FFmpeg decodes in software instead (a stream
    NVDEC does not take) are copied there.
    """

    def __init__(self, path: str | os.PathLike, backend: str = "auto", *, info: VideoInfo | None = None,
                 device: torch.device | None = None) -> None:
        if backend not in _BACKENDS:
            raise InputError(f"backend must be one of {', '.join(_BACKENDS)} (got {backend!r}): change backend")
        self.path = os.fspath(path)
        if info is None or info.frame_index is None or os.fspath(info.path) != self.path or _changed(info):
            info = probe_video(self.path)
        self.info: VideoInfo = info
        self.backend = backend
        self.device = device
        self._source: _PyAVSource | _DecordSource | None = None
        self._source = self._open_source(backend)
        self.backend_used: str = self._source.name

    def _open_source(self, backend: str) -> _PyAVSource | _DecordSource:
        if backend == "pyav":
            return _PyAVSource(self.path, self.info, self.device)
        try:
            return _DecordSource(self.path, self.info)
        except ImportError as e:
            if backend == "decord":
                raise InputError("backend='decord' but decord is not installed: pip install decord, "
                                 "or use backend='auto' or 'pyav'") from e
            logger.info("decord is not installed: reading %s with PyAV", self.path)
        except VideoError as e:
            if backend == "decord":
                raise
            logger.info("%s; reading with PyAV instead", e)
        return _PyAVSource(self.path, self.info, self.device)

    def __enter__(self) -> FrameReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def position(self) -> int:
        """Index of the last frame the active source decoded (-1 before the first)."""
        src = self._source
        if src is None:
            return -1
        return src.last if src.name == "pyav" else src.pos - 1

    def read(self, indices: Sequence[int], *, strategy: str = "auto", extra: Sequence[int] | None = None,
             on_extra=None, max_extra: int | None = None,
             yuv: Yuv420 | None = None) -> tuple[torch.Tensor, np.ndarray]:
        """Decode the frames at `indices` (any order, repeats allowed).

        Returns (uint8 CPU tensor [N, H, W, 3], upright RGB, in the requested order; float64 array of
        their presentation times in seconds). Each distinct frame is decoded once and only the
        requested frames are held. strategy, PyAV: "auto" reads on and seeks only when the next wanted
        frame's keyframe is more than SEEK_COST_FRAMES frames ahead (right for dense and sparse
        sampling alike), "sequential" never seeks, "seek" seeks to the keyframe before every frame.
        decord: "auto" and "sequential" use decord's skip_frames (reads on, jumps only to a keyframe
        it would pass anyway), "seek" its accurate seek per frame. All return the same frames.

        extra / on_extra (strategy "auto" only): frame indices the caller will want later. Those the
        reader decodes anyway on its way to the wanted frames, or can reach for at most
        SEEK_COST_FRAMES more decoded frames per wanted frame, are also taken (at most `max_extra`)
        and handed to `on_extra(index, uint8 tensor [H, W, 3])`; the rest are left alone. Lite uses
        it to pick up the frames of the next groups, which lie next to the current group's.

        yuv (PyAV only, from yuv.probe_yuv420 of this file): frames come back as their stored 4:2:0
        planes, uint8 [N, H*3/2, W] (not turned upright; yuv.yuv420_to_rgb makes them RGB).
        """
        if self._source is None:
            raise InputError(f"the FrameReader for {self.path} is closed: open a new one")
        if strategy not in _STRATEGIES:
            raise InputError(f"strategy must be one of {', '.join(_STRATEGIES)} (got {strategy!r}): change strategy")
        n = self.info.num_frames
        if hasattr(indices, "tolist"):  # numpy array or torch tensor
            indices = indices.tolist()
        wanted = [_check_int("indices", i, 0) for i in indices]
        if wanted and _changed(self.info):
            # decord would silently return other frames from a file cut after opening: refuse.
            now = os.path.getsize(self.path) if os.path.exists(self.path) else 0
            raise VideoError(
                f"cannot read frame {wanted[0]} of {self.path}: the file changed on disk since it was opened "
                f"({self.info.file_size} -> {now} bytes): it looks truncated or still being written: "
                "re-download it (or wait until it is complete) and open it again"
            )
        bad = [i for i in wanted if i >= n]
        if bad:
            raise InputError(
                f"indices {bad[:5]} are out of range for {self.path}, which has {n} readable frames "
                f"(0..{n - 1}): plan the indices with plan_sampling on this file"
            )
        if yuv is not None and self._source.name != "pyav":
            raise InputError(f"{self.path}: 4:2:0 planes (yuv=) come from the PyAV backend only, this "
                             f"reader uses {self._source.name}: open it with backend='pyav'")
        if self.device is not None and yuv is None:
            raise InputError(f"{self.path}: this reader decodes on {self.device} and hands over 4:2:0 "
                             "planes only: pass yuv= (yuv.probe_yuv420), or open it without device=")
        shape = (self.info.height, self.info.width, 3) if yuv is None else yuv.shape
        out = torch.empty((len(wanted), *shape), dtype=torch.uint8, device=self.device)
        times = self.info.frame_times[np.asarray(wanted, dtype=np.int64)].astype(np.float64)
        if not wanted:
            return out, times
        slots: dict[int, list[int]] = {}
        for pos, i in enumerate(wanted):
            slots.setdefault(i, []).append(pos)
        targets = sorted(slots)
        extras: list[int] = []
        if extra is not None and on_extra is not None and strategy == "auto" and (max_extra is None or max_extra > 0):
            if hasattr(extra, "tolist"):
                extra = extra.tolist()
            cand = sorted({int(e) for e in extra if 0 <= int(e) < n} - set(targets))
            can_seek = self._source.name != "pyav" or self.info.frame_index.pts_reliable
            extras = plan_extras(targets, cand, self.position(), self.info.frame_index.keyframe_before,
                                 can_seek, len(cand) if max_extra is None else int(max_extra))
        if extras:
            targets = sorted(targets + extras)
        if self._source.name == "pyav":
            self._source.yuv = yuv
        try:
            try:
                self._fill(out, targets, slots, strategy, on_extra)
            finally:
                if self._source.name == "decord":
                    release_freed_memory()
        except VideoError:
            if self.backend != "auto" or self._source.name != "decord":
                raise
            logger.warning("decord failed on %s; reading it with PyAV instead", self.path)
            self._source.close()
            self._source = _PyAVSource(self.path, self.info, self.device)
            self.backend_used = self._source.name
            self._fill(out, targets, slots, strategy, on_extra)
        return out, times

    def _fill(self, out: torch.Tensor, targets: list[int], slots: dict[int, list[int]], strategy: str,
              on_extra=None) -> None:
        """Decode `targets` with the active source and copy each into its output slots (a target
        with no slot is an extra frame: it goes to `on_extra`)."""
        rotation = self.info.rotation if self._source.name == "pyav" and self._source.yuv is None else 0
        expected = tuple(out.shape[1:])
        for t, img in self._source.read(targets, strategy):
            img = _upright(img, rotation)
            if img.shape != expected:
                raise VideoError(
                    f"frame {t} of {self.path} is {img.shape[1]}x{img.shape[0]}, the video is "
                    f"{expected[1]}x{expected[0]}: the size changes mid-stream: re-encode the file"
                )
            frame = img if isinstance(img, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(img))
            if t not in slots:
                on_extra(t, frame)         # a fresh array: nobody else holds it
                continue
            for pos in slots[t]:
                out[pos] = frame

    def park(self) -> None:
        """Call when no read follows soon: a decord source stops decoding ahead (see
        _DecordSource.park); the next read seeks to its first frame."""
        if self._source is not None:
            self._source.park()
            if self._source.name == "decord":
                release_freed_memory()

    def close(self) -> None:
        """Release the file (safe to call twice)."""
        if self._source is not None:
            self._source.close()
            self._source = None

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
