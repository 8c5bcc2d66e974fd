"""Write small real video files with PyAV for the tests, with the frame number drawn into each frame.

Each frame carries its number as binary code: 16 blocks of 8x8 pixels (two rows of eight, starting at
the top-left corner, most significant bit first), white for 1 and black for 0, on a mid-grey
background, plus a red 8x8 marker block at the bottom-left corner so tests can tell which way is up.
`frame_number()` reads the number back from an upright RGB frame; the blocks survive lossy codecs.
"""
from __future__ import annotations

import os
from fractions import Fraction
from typing import Sequence

import av
import numpy as np

BLOCK = 8  # side of one code block in pixels
BITS = 16  # frame numbers up to 65535
MIN_WIDTH, MIN_HEIGHT = 8 * BLOCK, 3 * BLOCK  # room for two code rows and the marker


def make_frame(number: int, width: int, height: int) -> np.ndarray:
    """An upright [height, width, 3] uint8 RGB frame that encodes `number`."""
    if width < MIN_WIDTH or height < MIN_HEIGHT:
        raise ValueError(f"frame {width}x{height} too small for the code: use at least {MIN_WIDTH}x{MIN_HEIGHT}")
    img = np.full((height, width, 3), 128, np.uint8)
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        on = (number >> (BITS - 1 - bit)) & 1
        img[row * BLOCK:(row + 1) * BLOCK, col * BLOCK:(col + 1) * BLOCK] = 255 if on else 0
    img[height - BLOCK:, :BLOCK] = (255, 0, 0)  # "up" marker: bottom-left, red
    return img


def frame_number(img: np.ndarray) -> int:
    """Read back the number `make_frame` drew into an upright RGB frame (numpy or torch, [H, W, 3])."""
    img = np.asarray(img)
    value = 0
    for bit in range(BITS):
        row, col = divmod(bit, 8)
        block = img[row * BLOCK + 2:(row + 1) * BLOCK - 2, col * BLOCK + 2:(col + 1) * BLOCK - 2]
        value = (value << 1) | int(block.mean() > 128)
    return value


def is_upright(img: np.ndarray) -> bool:
    """True when the red marker sits at the bottom-left corner, i.e. the frame is the right way up."""
    img = np.asarray(img).astype(np.int32)
    corner = img[-BLOCK + 2:-2, 2:BLOCK - 2]
    return bool(corner[..., 0].mean() > 180 and corner[..., 1].mean() < 90)


def write_video(
    path: str | os.PathLike,
    num_frames: int,
    *,
    width: int = 64,
    height: int = 48,
    fps: int = 25,
    codec: str = "mpeg4",
    pix_fmt: str | None = None,
    pts: Sequence[int] | None = None,
    time_base: Fraction | None = None,
    rotation: int = 0,
    gop: int | None = None,
    options: dict[str, str] | None = None,
    container_options: dict[str, str] | None = None,
    first_number: int = 0,
    noise: bool = False,
) -> str:
    """Encode `num_frames` frames numbered first_number, first_number+1, ... and return the path.

    pts: per-frame presentation times in `time_base` units (default 1/fps: constant rate); irregular
    values make a variable-frame-rate file. rotation: clockwise degrees a player must turn the stored
    picture to show it upright (the legacy "rotate" tag / phone portrait = 90); the stored picture is the
    upright one turned counter-clockwise, as a phone writes it. gop: keyframe interval. noise: fill
    the picture around the code with random texture, so that files are large (hard to compress).
    """
    path = os.fspath(path)
    container = av.open(path, "w", options=container_options or {})
    try:
        stream = container.add_stream(codec, rate=fps, options=options or {})
        stored_w, stored_h = (height, width) if rotation % 180 else (width, height)
        stream.width, stream.height = stored_w, stored_h
        stream.pix_fmt = pix_fmt or ("yuvj420p" if codec == "mjpeg" else "yuv420p")
        tb = time_base or Fraction(1, fps)
        stream.codec_context.time_base = tb
        if gop is not None:
            stream.codec_context.gop_size = gop
        if rotation:
            if not hasattr(stream, "set_display_rotation"):
                raise NotImplementedError(f"PyAV {av.__version__} cannot write rotation metadata")
            stream.set_display_rotation(-rotation)  # PyAV takes counter-clockwise degrees
        rng = np.random.default_rng(0)
        for i in range(num_frames):
            upright = make_frame(first_number + i, width, height)
            if noise:
                texture = rng.integers(0, 256, upright.shape, dtype=np.uint8)
                texture[:2 * BLOCK + 2, :8 * BLOCK + 2] = upright[:2 * BLOCK + 2, :8 * BLOCK + 2]
                texture[-BLOCK - 2:, :BLOCK + 2] = upright[-BLOCK - 2:, :BLOCK + 2]
                upright = texture
            stored = np.ascontiguousarray(np.rot90(upright, k=rotation // 90))  # k>0: counter-clockwise
            frame = av.VideoFrame.from_ndarray(stored, format="rgb24")
            frame.pts = pts[i] if pts is not None else i
            frame.time_base = tb
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def write_audio_only(path: str | os.PathLike, seconds: float = 0.5) -> str:
    """A file with one audio stream (PCM in WAV) and no video stream."""
    path = os.fspath(path)
    container = av.open(path, "w", format="wav")
    try:
        stream = container.add_stream("pcm_s16le", rate=44100)
        stream.layout = "mono"
        samples = int(44100 * seconds)
        tone = (np.sin(np.arange(samples) / 10.0) * 8000).astype(np.int16)[None, :]
        for start in range(0, samples, 1024):
            frame = av.AudioFrame.from_ndarray(tone[:, start:start + 1024].copy(), format="s16", layout="mono")
            frame.sample_rate = 44100
            frame.pts = start
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def write_empty_video(path: str | os.PathLike, codec: str = "mpeg4") -> str:
    """A container with a video stream header but no frames (use an .avi path: MP4 drops empty
    tracks and Matroska/MPEG-TS writers leave nothing readable)."""
    path = os.fspath(path)
    container = av.open(path, "w")
    try:
        stream = container.add_stream(codec, rate=25)
        stream.width, stream.height = 64, 48
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # header only
    finally:
        container.close()
    return path


def truncate(path: str | os.PathLike, fraction: float) -> str:
    """Cut the file to `fraction` of its size in place (a download that stopped half way)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))
    return path
