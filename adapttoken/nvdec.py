"""Hardware decoding on NVIDIA GPUs (NVDEC) through PyAV's FFmpeg, frames kept on the GPU.

Where frames go to a CUDA device as 4:2:0 planes anyway (the YUV handover, yuv.py), the decoder
lanes can decode on the GPU's video engines instead of the CPU: PyAV opens the file with FFmpeg's
CUDA hwaccel in torch's own CUDA context (FFmpeg's `current_ctx`), decoded frames stay in device
memory (`is_hw_owned`), and `planes_on_device` copies each frame's NV12 surface, through DLPack, into
the same [H*3/2, W] Y-U-V layout the software lanes hand over. H.264 decoding is exact, so the
planes are those of the CPU decoder bit for bit (tests/gpu/test_gpu_yuv.py).

FFmpeg writes each decoded surface on CUDA's legacy default stream, and takes the surface back for
a later frame once PyAV lets it go. Our copies run on the same stream (torch's default stream), so
they wait for the surface's write and the surface's reuse waits for them, with no host sync; a
consumer on another stream waits for the default stream first (`ready_on_current_stream`).
"""
from __future__ import annotations

import logging
import threading

import torch

logger = logging.getLogger(__name__)

__all__ = ["hwaccel", "nvdec_available", "planes_on_device", "ready_on_current_stream"]

_checked: dict[tuple, bool] = {}
_lock = threading.Lock()


def hwaccel(device: torch.device):
    """PyAV's settings for decoding on `device` (a CUDA device) into torch's context. FFmpeg's
    own default (the primary context with its own scheduling flags) fails once torch holds it,
    and a context of its own could not share memory with torch. The caller's thread must have
    `device` current (torch.cuda.set_device)."""
    from av.codec.hwaccel import HWAccel
    return HWAccel("cuda", device=str(device.index or 0), allow_software_fallback=True,
                   options={"primary_ctx": "0", "current_ctx": "1"}, is_hw_owned=True)


def _stream_codec(path: str, stream_index: int) -> str | None:
    from .video import _open
    try:
        c = _open(path)
    except Exception:  # noqa: BLE001 - the software path reports unreadable files
        return None
    try:
        return c.streams[stream_index].codec_context.name
    finally:
        c.close()


def nvdec_available(path: str, stream_index: int, device: torch.device) -> bool:
    """Whether the file's video stream decodes on `device`'s NVDEC here: PyAV's FFmpeg has CUDA
    hwaccel, the codec has a CUDA hardware configuration, and a trial decode of the first frame
    gives a frame in device memory (the driver's decoder library is present and takes the stream's
    profile). Checked once per (file, stream, device); any failure means no (software lanes)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    key = (str(path), int(stream_index), device.index or 0)
    with _lock:
        if key in _checked:
            return _checked[key]
    ok = False
    try:
        import av
        from av.codec.hwaccel import hwdevices_available
        if "cuda" in hwdevices_available():
            name = _stream_codec(path, stream_index)
            codec = av.codec.Codec(name, "r") if name else None
            if codec is not None and any(getattr(c.device_type, "name", None) == "cuda"
                                         for c in codec.hardware_configs):
                ok = _trial_decode(path, stream_index, device)
    except Exception as e:  # noqa: BLE001 - no NVDEC is the ordinary case
        logger.debug("NVDEC not available for %s: %s", path, e)
        ok = False
    with _lock:
        _checked[key] = ok
    return ok


def _trial_decode(path: str, stream_index: int, device: torch.device) -> bool:
    import av
    prev = torch.cuda.current_device()
    torch.cuda.set_device(device)
    try:
        with av.open(str(path), hwaccel=hwaccel(device)) as c:
            s = c.streams[stream_index]
            for frame in c.decode(s):
                if frame.format.name != "cuda":
                    return False                # FFmpeg fell back to software
                y = planes_on_device(frame)
                torch.cuda.current_stream(device).synchronize()
                return y.shape == (frame.height * 3 // 2, frame.width)
        return False
    except Exception as e:  # noqa: BLE001
        logger.debug("NVDEC trial decode of %s failed: %s", path, e)
        return False
    finally:
        torch.cuda.set_device(prev)


def planes_on_device(frame, out: torch.Tensor | None = None) -> torch.Tensor:
    """A decoded CUDA frame (NV12 surface) as uint8 planes [H*3/2, W] on its device: Y, then U,
    then V (the layout of to_ndarray(format="yuv420p"), yuv.Yuv420.shape), into `out` if given.
    The copies run on the current stream, which must be the default stream (module doc)."""
    from torch.utils.dlpack import from_dlpack
    y = from_dlpack(frame.planes[0].__dlpack__())          # [H, W], rows padded to the pitch
    uv = from_dlpack(frame.planes[1].__dlpack__())         # [H/2, W/2, 2], interleaved U, V
    h, w = y.shape
    if out is None:
        out = torch.empty((h * 3 // 2, w), dtype=torch.uint8, device=y.device)
    flat = out.view(-1)
    q = (h // 2) * (w // 2)
    flat[:h * w].view(h, w).copy_(y)
    flat[h * w:h * w + q].view(h // 2, w // 2).copy_(uv[..., 0])
    flat[h * w + q:].view(h // 2, w // 2).copy_(uv[..., 1])
    return out


def ready_on_current_stream(frames: torch.Tensor) -> torch.Tensor:
    """Make the current stream wait for planes written by decoder lanes (on the default stream)."""
    if frames.is_cuda:
        cur = torch.cuda.current_stream(frames.device)
        default = torch.cuda.default_stream(frames.device)
        if cur != default:
            cur.wait_stream(default)
    return frames
