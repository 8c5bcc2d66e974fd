"""The YUV handover: decoder lanes hand over a frame's decoded 4:2:0 planes (half the bytes of RGB,
and no colour conversion on the CPU) and the model's device turns them into the RGB that PyAV's
`to_ndarray(format="rgb24")` would have given (`yuv420_to_rgb`, plain torch).

What that RGB is, measured against PyAV 18 (FFmpeg's swscale, default flags): the stream's colour
matrix (BT.601 when the file does not say), limited ("tv") range unless the frames are yuvj420p or
tagged full range, each chroma sample used for its 2x2 block of pixels (no interpolation), and each
of the terms (luma, and the chroma terms of each channel) rounded down before they are summed.
tests/test_yuv.py checks it on H.264 files; docs/bench_gpu_sources/README.md has the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .video import VideoInfo, _open

__all__ = ["Yuv420", "probe_yuv420", "yuv420_to_rgb"]

# AVColorSpace -> (Kr, Kb) of the matrices swscale converts with; others fall back to RGB decoding
LUMA_WEIGHTS = {1: (0.2126, 0.0722),     # BT.709
                2: (0.299, 0.114),       # unspecified: swscale's default, BT.601
                4: (0.30, 0.11),         # FCC
                5: (0.299, 0.114),       # BT.470BG (BT.601 625 lines)
                6: (0.299, 0.114),       # SMPTE 170M (BT.601 525 lines)
                7: (0.212, 0.087),       # SMPTE 240M
                9: (0.2627, 0.0593)}     # BT.2020 non-constant luminance
YUV420_FORMATS = ("yuv420p", "yuvj420p")


@dataclass(frozen=True)
class Yuv420:
    """How a file's frames are stored: 4:2:0 planes of `height` x `width` (the stored picture,
    before `rotation`), their colour matrix (AVColorSpace number) and range."""
    pix_fmt: str
    height: int
    width: int
    colorspace: int
    full_range: bool
    rotation: int = 0

    @property
    def shape(self) -> tuple[int, int]:
        """One frame's planes as PyAV's to_ndarray gives them: Y, U, V one after the other, [H*3/2, W]."""
        return self.height * 3 // 2, self.width


def probe_yuv420(info: VideoInfo) -> Yuv420 | None:
    """The file's Yuv420 when its frames can be handed over as planes: a 4:2:0 8-bit stream
    (yuv420p / yuvj420p) of even width and height, a colour matrix in LUMA_WEIGHTS, no picture size
    change mid-stream. None otherwise (the caller decodes to RGB as before)."""
    idx = info.frame_index
    if idx is None or idx.params_change:
        return None
    try:
        container = _open(info.path)
    except Exception:  # noqa: BLE001 - the RGB path reports unreadable files
        return None
    try:
        cc = container.streams[idx.stream_index].codec_context
        fmt, w, h, cs, rng = cc.pix_fmt, cc.width, cc.height, int(cc.colorspace), int(cc.color_range)
    finally:
        container.close()
    upright = (h, w) if info.rotation in (90, 270) else (w, h)
    if (fmt not in YUV420_FORMATS or w % 2 or h % 2 or cs not in LUMA_WEIGHTS
            or upright != (info.width, info.height)):
        return None
    return Yuv420(fmt, h, w, cs, fmt == "yuvj420p" or rng == 2, info.rotation)


def yuv420_to_rgb(planes: torch.Tensor, yuv: Yuv420) -> torch.Tensor:
    """uint8 planes [N, H*3/2, W] (Yuv420.shape) -> uint8 RGB [N, H, W, 3], turned upright, on the
    planes' device: the conversion swscale does for to_ndarray(format="rgb24") (module doc)."""
    if planes.dtype != torch.uint8 or planes.dim() != 3 or tuple(planes.shape[1:]) != yuv.shape:
        raise ValueError(f"expected uint8 planes [N, {yuv.shape[0]}, {yuv.shape[1]}], got "
                         f"{planes.dtype} {list(planes.shape)}")
    n, h, w = planes.shape[0], yuv.height, yuv.width
    flat = planes.reshape(n, -1)
    y = flat[:, :h * w].view(n, h // 2, 2, w // 2, 2)             # 2x2 blocks share one chroma sample
    u = flat[:, h * w:h * w * 5 // 4].view(n, h // 2, 1, w // 2, 1).float() - 128
    v = flat[:, h * w * 5 // 4:].view(n, h // 2, 1, w // 2, 1).float() - 128
    kr, kb = LUMA_WEIGHTS[yuv.colorspace]
    kg = 1 - kr - kb
    if yuv.full_range:
        luma, c = y.float(), 1.0
    else:
        # one multiply by a constant (not "* 255 / 219"): CUDA divides by a scalar as a multiply
        # by its reciprocal, which rounds differently from the CPU's division at floor boundaries
        # (measured: 2 levels off swscale on random planes on an H200, 1 on the CPU)
        luma, c = ((y.float() - 16) * (255 / 219)).floor_(), 255 / 224
    chroma = ((v * (2 * (1 - kr) * c)).floor_(),
              (u * (-2 * kb * (1 - kb) / kg * c)).floor_() + (v * (-2 * kr * (1 - kr) / kg * c)).floor_(),
              (u * (2 * (1 - kb) * c)).floor_())
    out = torch.empty((n, h // 2, 2, w // 2, 2, 3), dtype=torch.uint8, device=planes.device)
    for i, term in enumerate(chroma):
        out[..., i] = (luma + term).clamp_(0, 255)
    rgb = out.view(n, h, w, 3)
    if yuv.rotation:
        rgb = torch.rot90(rgb, k=-(yuv.rotation // 90), dims=(1, 2)).contiguous()
    return rgb
