"""Write small real video files with PyAV for the tests, with the frame number drawn into each frame.

Each frame carries its number as binary code: 16 blocks of 8x8 pixels (two rows of eight, starting at
the top-left corner, most significant bit first), white for 1 and black for 0, on a mid-grey
background, plus a red 8x8 marker block at the bottom-left corner so tests can tell which way is up.
`frame_number()` reads the number back from an upright RGB frame; the blocks survive lossy codecs.
"""
from __future__ import annotations

import os
import struct
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
    colorspace: int | None = None,
) -> str:
    """Encode `num_frames` frames numbered first_number, first_number+1, ... and return the path.

    pts: per-frame presentation times in `time_base` units (default 1/fps: constant rate); irregular
    values make a variable-frame-rate file. rotation: clockwise degrees a player must turn the stored
    picture to show it upright (the legacy "rotate" tag / phone portrait = 90); the stored picture is the
    upright one turned counter-clockwise, as a phone writes it. gop: keyframe interval. noise: fill
    the picture around the code with random texture, so that files are large (hard to compress).
    colorspace: the stream's colour matrix tag (an AVColorSpace number: 1 BT.709, 6 BT.601).
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
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
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


# -- odd inputs (tests of bad input): each builder keeps the files tiny -----------------------------

def write_size_change(path: str | os.PathLike, sizes: Sequence[tuple[int, int]] = ((64, 48), (128, 96)),
                      frames_per_size: int = 8, fps: int = 8) -> str:
    """One H.264 stream in MPEG-TS whose picture size changes mid-way: `frames_per_size` numbered
    frames at each (width, height) in turn (a new encoder per size, muxed into the same stream, as
    a broadcast or a screen recording that changes resolution does). Each later size must be an
    integer multiple of the first: its frames are the first size's picture scaled up (nearest), so a
    frame resized back to the first size still reads its number."""
    path = os.fspath(path)
    container = av.open(path, "w", format="mpegts")
    try:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = sizes[0]
        stream.pix_fmt = "yuv420p"
        tb = Fraction(1, fps)
        n = 0
        for k, (w, h) in enumerate(sizes):
            if k == 0:
                ctx = stream.codec_context
            else:
                ctx = av.CodecContext.create("libx264", "w")
                ctx.width, ctx.height, ctx.pix_fmt = w, h, "yuv420p"
                ctx.time_base, ctx.framerate = stream.codec_context.time_base, Fraction(fps)
            for _ in range(frames_per_size):
                fx, fy = w // sizes[0][0], h // sizes[0][1]
                picture = make_frame(n, *sizes[0]).repeat(fy, axis=0).repeat(fx, axis=1)
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(picture), format="rgb24")
                frame.pts, frame.time_base = n, tb
                n += 1
                for packet in ctx.encode(frame):
                    packet.stream = stream
                    container.mux(packet)
            for packet in ctx.encode():
                packet.stream = stream
                container.mux(packet)
    finally:
        container.close()
    return path


def write_two_video_streams(path: str | os.PathLike, num_frames: int = 16, fps: int = 8) -> str:
    """A Matroska file with two video streams: the first 64x48 with frames numbered 0, 1, ..., the
    second 96x64 numbered from 1000 (so a test can tell which one was read)."""
    path = os.fspath(path)
    container = av.open(path, "w")
    try:
        streams = []
        for w, h in ((64, 48), (96, 64)):
            s = container.add_stream("mpeg4", rate=fps)
            s.width, s.height, s.pix_fmt = w, h, "yuv420p"
            s.codec_context.time_base = Fraction(1, fps)
            streams.append(s)
        for i in range(num_frames):
            for s, first in zip(streams, (0, 1000)):
                frame = av.VideoFrame.from_ndarray(make_frame(first + i, s.width, s.height), format="rgb24")
                frame.pts, frame.time_base = i, Fraction(1, fps)
                for packet in s.encode(frame):
                    container.mux(packet)
        for s in streams:
            for packet in s.encode():
                container.mux(packet)
    finally:
        container.close()
    return path


def write_gif(path: str | os.PathLike, num_frames: int = 12, fps: int = 10, width: int = 64,
              height: int = 48) -> str:
    """An animated GIF of numbered frames (GIF delays are in 1/100 s: use an fps that divides 100)."""
    path = os.fspath(path)
    container = av.open(path, "w", format="gif")
    try:
        stream = container.add_stream("gif", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "rgb8"
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(make_frame(i, width, height), format="rgb24")
            frame.pts, frame.time_base = i, Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    return path


def write_image(path: str | os.PathLike, number: int = 7, width: int = 64, height: int = 48) -> str:
    """A still image (PNG or JPEG by the file's extension) showing frame number `number`."""
    from PIL import Image
    path = os.fspath(path)
    Image.fromarray(make_frame(number, width, height)).save(path, quality=95)
    return path


def claim_duration(path: str | os.PathLike, seconds: float) -> str:
    """Edit an MP4's headers in place so they claim `seconds` of video (movie, track and media
    durations), while the frames and their timestamps stay as written: a header that lies."""
    path = os.fspath(path)
    data = bytearray(open(path, "rb").read())
    timescale_of_movie = None
    for name in (b"mvhd", b"tkhd", b"mdhd"):
        pos = data.find(name)
        while pos >= 0:
            body = pos + 4
            version = data[body]
            if name == b"tkhd":   # version, flags, created, modified, track id, reserved, duration
                off, scale = (body + 4 + 16 + 4 + 4, timescale_of_movie) if version == 0 else \
                    (body + 4 + 32 + 4 + 4, timescale_of_movie)
            else:                 # version, flags, created, modified, timescale, duration
                t_off = body + 4 + (8 if version == 0 else 16)
                scale = struct.unpack(">I", data[t_off:t_off + 4])[0]
                if name == b"mvhd":
                    timescale_of_movie = scale
                off = t_off + 4
            value = int(seconds * scale)
            if version == 0:
                struct.pack_into(">I", data, off, min(value, 2**32 - 1))
            else:
                struct.pack_into(">Q", data, off, value)
            pos = data.find(name, pos + 4)
    with open(path, "wb") as f:
        f.write(bytes(data))
    return path


def random_yuv420(seed: int, height: int, width: int, n: int = 2) -> np.ndarray:
    """n random 4:2:0 frames as uint8 [n, height * 3 // 2, width] (Y, then U and V): every value, so a
    conversion meets the clamps and all chroma pairs."""
    return np.random.default_rng(seed).integers(0, 256, (n, height * 3 // 2, width), dtype=np.uint8)


def swscale_rgb(planes: np.ndarray, pix_fmt: str, colorspace: int, full_range: bool) -> np.ndarray:
    """What PyAV's to_ndarray(format="rgb24") (swscale) makes of 4:2:0 planes [n, h * 3 // 2, w] tagged
    with `colorspace` and range: the reference the YUV handover is held to, [n, h, w, 3] uint8."""
    out = []
    for p in planes:
        f = av.VideoFrame.from_ndarray(p, format=pix_fmt)
        f.colorspace, f.color_range = colorspace, 2 if full_range else 1
        out.append(f.to_ndarray(format="rgb24"))
    return np.stack(out)
