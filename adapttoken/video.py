"""Video input: probe a file and plan which frames to sample.

ALGORITHM.md step 1. Two pieces, used in this order (reading the frames is frame_reader.py's):

- `probe_video(path)` -> `VideoInfo`: size, rate, duration, rotation, plus the presentation time of
  every frame, taken from the container's packet timestamps (demuxing only: nothing is decoded but
  the first frame), so variable-frame-rate files get true times.
- `plan_sampling(info, ...)` -> `SamplingPlan`: which source frames to take (uniform in time) and
  their true timestamps.

Frame index i always means the i-th frame in presentation order among the frames that are really in
the file (a truncated download has fewer frames than its header claims; see `probe_video`).
Timestamps are seconds from the first frame's presentation time, as float64.
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from .errors import InputError, VideoError

if TYPE_CHECKING:
    import av

__all__ = [
    "VideoInfo",
    "FrameIndex",
    "SamplingPlan",
    "probe_video",
    "plan_sampling",
    "check_video_path",
]

logger = logging.getLogger(__name__)

_EPS = 1e-9  # seconds; absorbs float rounding when comparing frame times with sampling targets


# --------------------------------------------------------------------------------------------------
# Probe


@dataclass(frozen=True, eq=False)
class FrameIndex:
    """Per-frame table of one video stream, in presentation order (built by demuxing, no decoding).

    pts: int64 presentation timestamps in `time_base` units; times: float64 seconds from the first
    frame; keyframes: sorted presentation indices of keyframes (decoding can start there);
    pts_reliable: False when the container gives no usable per-frame timestamps (missing or
    duplicated): frames are then counted in decode output order, times assume a constant rate and the
    PyAV backend never seeks. params_change: the stream's sequence headers (H.264/HEVC SPS, MPEG-1/2
    sequence header: picture size among others) differ between keyframes, so the picture size may
    change mid-stream; decord cannot follow that (it repeats or garbles frames), PyAV resizes.
    """

    stream_index: int
    time_base: Fraction
    pts: np.ndarray
    times: np.ndarray
    keyframes: np.ndarray
    pts_reliable: bool
    params_change: bool = False

    def keyframe_before(self, i: int) -> int:
        """Presentation index of the last keyframe at or before frame i (0 when none is known)."""
        pos = int(np.searchsorted(self.keyframes, i, side="right")) - 1
        return int(self.keyframes[pos]) if pos >= 0 else 0


@dataclass(frozen=True)
class VideoInfo:
    """What `probe_video` learned about a file. width/height are the display size (rotation applied).

    rotation: clockwise degrees (0/90/180/270) a player turns the stored picture to show it upright
    (the legacy "rotate" tag convention; a phone's portrait video is 90). Extra fields beyond the
    agreed API: codec, file_size and mtime_ns (for cache keys) and frame_index (per-frame table;
    None when a VideoInfo is built by hand: a constant rate is then assumed).
    """

    path: str
    num_frames: int
    fps: float
    duration: float
    width: int
    height: int
    rotation: int
    codec: str = ""
    file_size: int = 0
    mtime_ns: int = 0
    frame_index: FrameIndex | None = field(default=None, repr=False, compare=False)

    @property
    def frame_times(self) -> np.ndarray:
        """float64 seconds of every frame from the first one (index/fps when no table is known)."""
        if self.frame_index is not None:
            return self.frame_index.times
        return np.arange(self.num_frames, dtype=np.float64) / self.fps


@dataclass(frozen=True)
class _Probed:
    """Cached result of scanning one file version (everything but the caller's spelling of the path)."""

    index: FrameIndex
    fps: float
    duration: float
    stored_width: int
    stored_height: int
    rotation: int
    codec: str


_CACHE_SIZE = 16
_cache: OrderedDict[tuple[str, int, int], _Probed] = OrderedDict()
_cache_lock = threading.Lock()


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def _stat(path: str) -> os.stat_result:
    """os.stat with the library's errors for URLs, missing files, folders and empty files."""
    if _URL.match(path) and not os.path.exists(path):
        raise VideoError(
            f"video {path} is a URL: only local files are read (nothing is downloaded or streamed): "
            "download the video and give the path of the file"
        )
    if not os.path.exists(path):
        raise VideoError(f"video file not found: {path}: check the path (relative paths start at {os.getcwd()})")
    if os.path.isdir(path):
        raise VideoError(f"video path is a folder, not a file: {path}: give the path of one video file")
    try:
        st = os.stat(path)
    except OSError as e:
        raise VideoError(f"cannot read video file {path}: {e.strerror}: check its permissions") from e
    if st.st_size == 0:
        raise VideoError(f"video file {path} is empty (0 bytes): re-download or re-export it")
    return st


def check_video_path(path: str | os.PathLike) -> str:
    """The path as a str when it names a local, non-empty file; else the VideoError probe_video would
    raise (a URL, a missing file, a folder, an empty file). Reads nothing: a cheap check up front."""
    path = os.fspath(path)
    _stat(path)
    return path


def _open(path: str, hwaccel=None) -> av.container.InputContainer:
    """Open a file with PyAV, turning its failures into a one-line VideoError; `hwaccel`: decode
    on a device (nvdec.hwaccel)."""
    import av            # here, not at import: frames held in memory need no PyAV
    try:
        if hwaccel is not None:
            return av.open(path, mode="r", hwaccel=hwaccel)
        return av.open(path, mode="r")
    except av.error.FFmpegError as e:
        raise VideoError(
            f"cannot read {path} as a video ({e.strerror or type(e).__name__}): it is not a video file, "
            "or a download that stopped early: check the file or re-download it"
        ) from e


def _flag_value(x) -> int:
    """An enum flag's (or a plain int's) integer value."""
    return int(getattr(x, "value", x))


def _video_stream(container: av.container.InputContainer, path: str) -> av.video.stream.VideoStream:
    """The first real video stream (cover art in audio files does not count)."""
    import av
    if container.format.name == "tty":  # FFmpeg's ANSI-art demuxer opens plain text files as "video"
        raise VideoError(f"{path} is a text file, not a video: give the path of a video file")
    for stream in container.streams.video:
        attached_pic = getattr(getattr(av.stream, "Disposition", None), "attached_pic", 0)
        # Disposition is an IntFlag in PyAV >= 16 and a plain Flag (no int()) in 15: compare values
        if not (attached_pic and _flag_value(stream.disposition) & _flag_value(attached_pic)):
            return stream
    kinds = ", ".join(sorted({s.type for s in container.streams})) or "none"
    raise VideoError(
        f"{path} has no video stream (streams: {kinds}): give a video file; if this one is a video, "
        "it is damaged or cut short: re-download it"
    )


def _rotation_cw(frame_rotation: float, metadata: dict[str, str]) -> int:
    """Clockwise display rotation from the decoded frame's display matrix (counter-clockwise degrees),
    falling back to a legacy "rotate" tag; snapped to a multiple of 90."""
    ccw = float(frame_rotation or 0.0)
    if ccw == 0.0 and metadata.get("rotate"):
        try:
            ccw = -float(metadata["rotate"])
        except ValueError:
            ccw = 0.0
    return int(round(-ccw / 90.0)) % 4 * 90


_SCAN_BYTES = 4096  # sequence headers sit at the start of a keyframe packet


def _nal_length_size(codec: str, extradata: bytes | None) -> int:
    """Bytes of the NAL length prefix for H.264/HEVC in MP4/MKV (avcC/hvcC extradata), 0 for
    Annex-B start codes (MPEG-TS, raw streams)."""
    if not extradata or extradata[0] != 1:
        return 0
    if codec == "h264" and len(extradata) > 4:
        return (extradata[4] & 3) + 1
    if codec == "hevc" and len(extradata) > 21:
        return (extradata[21] & 3) + 1
    return 0


def _sequence_header(data: bytes, codec: str, nal_length: int) -> bytes:
    """The sequence-level headers at the start of one keyframe packet (H.264/HEVC SPS units, the
    MPEG-1/2 sequence header's size fields), b"" when there are none (they live in the extradata)."""
    if codec in ("mpeg1video", "mpeg2video"):
        at = data.find(b"\x00\x00\x01\xb3")
        return data[at + 4:at + 7] if at >= 0 else b""
    if codec == "h264":
        is_sps, is_slice = (lambda b: b & 0x1F == 7), (lambda b: b & 0x1F in (1, 5))
    else:  # hevc
        is_sps, is_slice = (lambda b: (b >> 1) & 0x3F == 33), (lambda b: (b >> 1) & 0x3F < 32)
    units = []
    if nal_length:
        pos = 0
        while pos + nal_length < len(data):
            size = int.from_bytes(data[pos:pos + nal_length], "big")
            unit = data[pos + nal_length:pos + nal_length + size]
            if not unit or is_slice(unit[0]):
                break
            if is_sps(unit[0]):
                units.append(unit)
            pos += nal_length + size
    else:
        for part in data.split(b"\x00\x00\x01")[1:]:
            if not part or is_slice(part[0]):
                break
            if is_sps(part[0]):
                units.append(part.rstrip(b"\x00"))
    return b"".join(units)


def _scan(path: str) -> _Probed:
    """Demux every packet of the video stream (no decoding except the first frame) into a FrameIndex."""
    import av
    container = _open(path)
    try:
        stream = _video_stream(container, path)
        stream.codec_context.thread_type = "AUTO"
        tb = stream.time_base or Fraction(1, 90000)
        pts_list: list[int | None] = []
        dts_list: list[int | None] = []
        key_list: list[bool] = []
        last_duration = 0
        corrupt = discarded = 0
        first = None
        codec = stream.codec_context.name
        headers_of = codec in ("h264", "hevc", "mpeg1video", "mpeg2video")
        nal_length = _nal_length_size(codec, stream.codec_context.extradata) if headers_of else 0
        headers: set[bytes] = set()
        try:
            for packet in container.demux(stream):
                if first is None:  # decode until the first frame: rotation, true size, decodability
                    try:
                        frames = packet.decode()
                    except av.error.FFmpegError:
                        frames = []
                    if frames:
                        first = frames[0]
                if packet.size == 0:  # the flush packet at the end
                    continue
                if packet.is_corrupt:  # a partial packet (file cut short): not a usable frame
                    corrupt += 1
                    continue
                if getattr(packet, "is_discard", False):  # dropped by an edit list: never output
                    discarded += 1
                    continue
                pts_list.append(packet.pts)
                dts_list.append(packet.dts)
                key_list.append(bool(packet.is_keyframe))
                if headers_of and packet.is_keyframe and len(headers) < 2:
                    header = _sequence_header(bytes(memoryview(packet)[:_SCAN_BYTES]), codec, nal_length)
                    if header:
                        headers.add(header)
                last_duration = packet.duration or 0
        except av.error.FFmpegError as e:  # a read error in the middle: keep what came before it
            logger.warning("%s: reading stopped after %d frames (%s): the file looks truncated or damaged: "
                           "re-download it", path, len(pts_list), e.strerror or type(e).__name__)
        if not pts_list:
            raise VideoError(f"{path} has a video stream but no frames: re-export or re-download the video")
        if first is None:
            raise VideoError(
                f"no frame of {path} could be decoded (codec {stream.codec_context.name}): "
                "the file is damaged or uses a codec this FFmpeg build lacks: re-encode it to H.264"
            )
        declared = stream.frames or 0
        if corrupt or declared > len(pts_list) + discarded + 1:
            logger.warning("%s: %d frames are readable but the header declares %d: the file looks truncated: "
                           "re-download it (using the readable part)", path, len(pts_list), declared)
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        index = _build_index(stream.index, tb, pts_list, dts_list, key_list, rate, len(headers) > 1)
        n = len(index.times)
        last = (last_duration * tb) if last_duration > 0 else None
        if last is None:
            diffs = np.diff(index.times)
            last = float(np.median(diffs)) if len(diffs) else (1.0 / float(rate) if rate else 1.0)
        duration = float(index.times[-1]) + float(last)
        _warn_gap(path, index.times, duration)
        fps = n / duration
        if rate and abs(float(rate) * duration - n) <= max(1.0, 0.01 * n):
            fps = float(rate)  # the container's nominal rate, exact for constant-rate files
        return _Probed(
            index=index,
            fps=fps,
            duration=duration,
            stored_width=first.width,
            stored_height=first.height,
            rotation=_rotation_cw(getattr(first, "rotation", 0), dict(stream.metadata)),
            codec=stream.codec_context.name,
        )
    finally:
        container.close()


def _warn_gap(path: str, times: np.ndarray, duration: float) -> None:
    """Log a jump in the timestamps (one frame shown for over a minute and 1000 typical frames): a
    wrong timestamp, or a header that claims hours the stream does not hold. Sampling stays uniform
    in time over the frames that are really there, so most sampled frames repeat the one before it."""
    if len(times) < 3:
        return
    gaps = np.diff(times)
    i = int(np.argmax(gaps))
    if gaps[i] > max(60.0, 1000.0 * float(np.median(gaps))):
        logger.warning("%s: frame %d is shown for %.0f s (its timestamps jump from %.3f to %.3f s; the "
                       "file lasts %.0f s by them): few distinct frames fall into the sampled range: if "
                       "the jump is a fault of the file, re-encode it", path, i, gaps[i], times[i],
                       times[i + 1], duration)


def _build_index(
    stream_index: int,
    tb: Fraction,
    pts_list: list[int | None],
    dts_list: list[int | None],
    key_list: list[bool],
    rate: Fraction | None,
    params_change: bool = False,
) -> FrameIndex:
    """Sort packets into presentation order; fall back to decode-order counting without usable pts."""
    raw = pts_list if all(p is not None for p in pts_list) else dts_list
    keys = np.asarray(key_list, dtype=bool)
    if all(p is not None for p in raw) and len(set(raw)) == len(raw):
        pts = np.asarray(raw, dtype=np.int64)
        order = np.argsort(pts, kind="stable")
        pts = pts[order]
        keyframes = np.flatnonzero(keys[order])
        times = (pts - pts[0]).astype(np.float64) * (tb.numerator / tb.denominator)
        # exact rationals would be nicer, but float64 of an int64 product is exact to ~1e-12 s here
        reliable = True
    else:
        step = 1.0 / float(rate) if rate else 1.0 / 25.0
        times = np.arange(len(raw), dtype=np.float64) * step
        pts = np.arange(len(raw), dtype=np.int64)
        keyframes = np.zeros(1, dtype=np.int64)
        reliable = False
    if len(keyframes) == 0 or keyframes[0] != 0:
        keyframes = np.concatenate([[0], keyframes]).astype(np.int64)
    for arr in (pts, times, keyframes):
        arr.setflags(write=False)
    return FrameIndex(stream_index, tb, pts, times, keyframes.astype(np.int64), reliable, params_change)


def probe_video(path: str | os.PathLike) -> VideoInfo:
    """Read a video's size, rate, duration, rotation and per-frame times without decoding it.

    Demuxes the whole file once (packets only, plus the first frame) and caches the result per
    (path, size, mtime), so a later FrameReader or a second probe costs nothing. Raises VideoError for
    a missing, empty, non-video, audio-only, frameless or undecodable file.
    """
    path = os.fspath(path)
    st = _stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        probed = _cache.get(key)
        if probed is not None:
            _cache.move_to_end(key)
    if probed is None:
        probed = _scan(path)
        with _cache_lock:
            _cache[key] = probed
            while len(_cache) > _CACHE_SIZE:
                _cache.popitem(last=False)
    w, h = probed.stored_width, probed.stored_height
    if probed.rotation in (90, 270):
        w, h = h, w
    return VideoInfo(
        path=path,
        num_frames=len(probed.index.times),
        fps=probed.fps,
        duration=probed.duration,
        width=w,
        height=h,
        rotation=probed.rotation,
        codec=probed.codec,
        file_size=st.st_size,
        mtime_ns=st.st_mtime_ns,
        frame_index=probed.index,
    )


# --------------------------------------------------------------------------------------------------
# Sampling plan


@dataclass(frozen=True)
class SamplingPlan:
    """Which source frames to feed the model, with their true presentation times (seconds).

    indices are non-decreasing; their count is a multiple of the `multiple_of` used to build the plan
    (padded by repeating the last index). max_pixels/min_pixels are carried for the model adapter.
    """

    info: VideoInfo
    indices: tuple[int, ...]
    timestamps: tuple[float, ...]
    start: float
    end: float
    max_pixels: int | None
    min_pixels: int | None

    @property
    def sampled_fps(self) -> float:
        """Distinct sampled frames per second of the sampled range (for reports only)."""
        span = self.end - self.start
        return len(set(self.indices)) / span if span > 0 else 0.0

    @property
    def key(self) -> str:
        """Stable hash of (file, size, mtime, indices, pixel caps): a cache key for features."""
        payload = json.dumps(
            [os.path.realpath(self.info.path), self.info.file_size, self.info.mtime_ns,
             list(self.indices), self.max_pixels, self.min_pixels],
            separators=(",", ":"),
        )
        return hashlib.sha256(payload.encode()).hexdigest()[:32]


def _check_int(name: str, value: object, minimum: int, allow_none: bool = False) -> int | None:
    """An int >= minimum (bools rejected), else InputError naming the parameter."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InputError(f"{name} must be an integer >= {minimum} (got {value!r}): change {name}")
    return int(value)


def plan_sampling(
    info: VideoInfo,
    num_frames: int = 1024,
    max_fps: float | None = None,
    start: float = 0.0,
    end: float | None = None,
    max_pixels: int | None = None,
    min_pixels: int | None = None,
    multiple_of: int = 2,
) -> SamplingPlan:
    """Choose up to `num_frames` frames uniformly in time over [start, end) seconds.

    Rule: split [start, end) into n equal segments and take, for each, the frame on screen at the
    segment's centre (the last frame starting at or before it). For a constant-rate file from 0 this
    is frame floor((k + 0.5) * N / n): a centred linspace, not qwen-vl-utils' endpoint-inclusive one.
    n = min(num_frames, floor(max_fps * (end - start)) (at least 1), frames starting in the range);
    when n reaches the frames in range, all of them are taken. With a strongly variable rate two
    centres can land on one long-lasting frame: it is taken once, so the plan may hold fewer than n
    distinct frames (never a frame twice, except for padding). `end` beyond the duration is clamped
    to it (with a warning). Timestamps are the frames' true presentation times.
    """
    n_req = _check_int("num_frames", num_frames, 1)
    step = _check_int("multiple_of", multiple_of, 1)
    max_px = _check_int("max_pixels", max_pixels, 1, allow_none=True)
    min_px = _check_int("min_pixels", min_pixels, 1, allow_none=True)
    if max_px is not None and min_px is not None and min_px > max_px:
        raise InputError(f"min_pixels ({min_px}) is larger than max_pixels ({max_px}): lower min_pixels")
    if max_fps is not None and not (isinstance(max_fps, (int, float)) and math.isfinite(max_fps) and max_fps > 0):
        raise InputError(f"max_fps must be a positive number or None (got {max_fps!r}): change max_fps")
    duration = float(info.duration)
    if isinstance(start, bool) or not (isinstance(start, (int, float)) and math.isfinite(start) and start >= 0):
        raise InputError(f"start must be a number of seconds >= 0 (got {start!r}; {info.path} lasts "
                         f"{duration:.3f} s): change start")
    if start >= duration:
        raise InputError(
            f"start={start:g} s is at or beyond the end of {info.path} (duration {duration:.3f} s): "
            f"use a start below {duration:.3f}"
        )
    if end is None:
        end = duration
    if isinstance(end, bool) or not (isinstance(end, (int, float)) and not math.isnan(end)):
        raise InputError(f"end must be a number of seconds or None (got {end!r}; {info.path} lasts "
                         f"{duration:.3f} s): change end")
    if end <= start:
        raise InputError(f"end ({end:g} s) must be greater than start ({start:g} s) ({info.path} lasts "
                         f"{duration:.3f} s): change start or end")
    if math.isfinite(end) and end > duration + _EPS:
        logger.warning("end=%g s is beyond the end of %s (duration %.3f s): sampling up to %.3f s",
                       end, info.path, duration, duration)
    end = min(float(end), duration)
    start = float(start)

    times = info.frame_times
    lo = int(np.searchsorted(times, start - _EPS, side="left"))
    hi = int(np.searchsorted(times, end - _EPS, side="left"))
    available = hi - lo
    if available <= 0:
        raise InputError(
            f"no frame of {info.path} starts in [start={start:g}, end={end:g}) s (duration {duration:.3f} s, "
            f"{len(times)} frames): widen the range"
        )
    n = min(n_req, available)
    if max_fps is not None:
        n = min(n, max(1, math.floor(max_fps * (end - start) + 1e-9)))
    if n == available:
        chosen = np.arange(lo, hi, dtype=np.int64)
    else:
        centres = start + (np.arange(n, dtype=np.float64) + 0.5) * ((end - start) / n)
        chosen = np.searchsorted(times, centres + _EPS, side="right") - 1
        chosen = np.unique(np.clip(chosen, lo, hi - 1))
    indices = [int(i) for i in chosen]
    while len(indices) % step:
        indices.append(indices[-1])
    return SamplingPlan(
        info=info,
        indices=tuple(indices),
        timestamps=tuple(float(times[i]) for i in indices),
        start=start,
        end=end,
        max_pixels=max_px,
        min_pixels=min_px,
    )
