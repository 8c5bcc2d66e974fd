"""Load Video: plan which frames to sample from a file, a core VIDEO or an IMAGE batch. Decodes
nothing here; later nodes read only the sampled frames they need."""
from __future__ import annotations

import hashlib
import math
import os
import uuid

import torch
import folder_paths
from .comfy_api_compat import io
from .text import images_fps_of, trimmed_sampling

from .. import adapttoken as at
from ..adapttoken.video import check_video_path
from . import runtime
from .types import schema

FRAMES_PER_SLICE = 2   # every supported family (Qwen2.5-VL, Qwen3-VL) patches 2 frames at a time


def input_videos() -> list[str]:
    d = folder_paths.get_input_directory()
    files = [f for f in os.listdir(d) if os.path.isfile(os.path.join(d, f))] if os.path.isdir(d) else []
    return sorted(folder_paths.filter_files_content_types(files, ["video"]))


def source_path(video: str, path: str) -> str:
    """The file to read: `path` when given, else the chosen file of ComfyUI's input folder."""
    path = (path or "").strip().strip('"').strip("'")
    if path:
        return os.path.expanduser(path)
    if video not in input_videos():
        raise at.VideoError(f"video {video!r} is not in ComfyUI's input folder: upload a video, "
                            f"pick one from the list, or type a file path into `path`")
    return folder_paths.get_annotated_filepath(video)


def from_images(images: torch.Tensor, fps: float, **sampling) -> at.VideoHandle:
    """A VideoHandle over frames already in memory (only the sampled ones are kept, as uint8)."""
    from ..adapttoken.video import VideoInfo, plan_sampling
    n, h, w = images.shape[0], images.shape[1], images.shape[2]
    info = VideoInfo(f"<images {uuid.uuid4().hex[:12]}>", n, float(fps), n / float(fps), w, h, 0)
    plan = plan_sampling(info, multiple_of=FRAMES_PER_SLICE, **sampling)
    idx = torch.as_tensor(plan.indices, dtype=torch.long)
    frames = (images[idx].clamp(0, 1) * 255).round().to(torch.uint8).cpu()
    return at.VideoHandle(plan, FRAMES_PER_SLICE, frames=frames)


def from_video_input(video, fps: float, **sampling) -> at.VideoHandle:
    """A core VIDEO: read by index from its file; an in-memory stream is written to temp once.

    Newer ComfyUI (0.38+) lets the UI trim and crop a VIDEO without writing a file: its
    get_stream_source() is still the whole original. A trim (get_active_trim_window) becomes the
    sampling range, still read by index from the file; other frame edits (a crop:
    has_pending_frame_edits() with other dimensions than the file's) are taken from
    get_components(), the frames as edited. 0.3.64 has neither method: the file as it is."""
    from .comfy_api_compat import InputImpl
    if isinstance(video, InputImpl.VideoFromComponents):
        c = video.get_components()
        return from_images(c.images, float(c.frame_rate or fps), **sampling)
    edited = getattr(video, "has_pending_frame_edits", None)
    window = getattr(video, "get_active_trim_window", None)
    asked = sampling                                    # start/end within the clip as edited
    if callable(window):
        sampling = trimmed_sampling(sampling, window())
    src = video.get_stream_source()
    if callable(edited) and edited() and isinstance(src, (str, os.PathLike)):
        from ..adapttoken.video import probe_video
        info = probe_video(src)
        if tuple(video.get_dimensions()) != (info.width, info.height):     # cropped in the UI
            c = video.get_components()                 # the trimmed, cropped frames
            return from_images(c.images, float(c.frame_rate or fps), **asked)
    if not isinstance(src, (str, os.PathLike)):
        data = src.getvalue()
        src = os.path.join(folder_paths.get_temp_directory(),
                           f"adapttoken_{hashlib.sha1(data).hexdigest()[:16]}.mp4")
        if not os.path.isfile(src):
            os.makedirs(os.path.dirname(src), exist_ok=True)
            with open(src, "wb") as f:
                f.write(data)
    return at.open_video(src, frames_per_slice=FRAMES_PER_SLICE, **sampling)


class LoadVideo(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return schema("AdaptToken_LoadVideo", video=input_videos())

    @classmethod
    def validate_inputs(cls, video, start, end, path="", input_types=None):
        linked = input_types or {}
        for name, want in (("video_input", "VIDEO"), ("images", "IMAGE"),
                           ("video_info", "VHS_VIDEOINFO")):
            if name in linked and linked[name] not in (want, "*"):
                return f"{name} takes {want}, not {linked[name]}"
        if not (math.isfinite(start) and start >= 0):
            return f"start={start} must be 0 or more seconds"
        if not (math.isfinite(end) and (end == 0 or end > start)):
            return f"end={end} must be after start={start} (or 0 for the end of the video)"
        if "video_input" in linked or "images" in linked:
            return True
        try:
            p = source_path(video, path)
        except at.VideoError as e:
            return str(e)
        if not os.path.isfile(p):
            if os.path.exists(p) or "://" in p:
                try:
                    check_video_path(p)    # a URL, a folder: the library's message
                except at.VideoError as e:
                    return str(e)
            return f"video file {p!r} does not exist: check `path`"
        return True

    @classmethod
    def fingerprint_inputs(cls, video, path="", **_):
        try:
            p = source_path(video, path)
            st = os.stat(p)
        except (OSError, at.VideoError):
            # no file: images/video_input are connected (linked inputs are invisible here), or
            # validate_inputs has refused the prompt already. Stable, so connected frames are not
            # re-planned (and re-encoded) on every run.
            return "no file", video, path
        return os.path.realpath(p), st.st_size, st.st_mtime_ns

    @classmethod
    def execute(cls, video, num_frames, max_fps, start, end, max_pixels, path="", images_fps=24.0,
                video_input=None, images=None, video_info=None) -> io.NodeOutput:
        sampling = dict(num_frames=num_frames, max_fps=max_fps or None, start=start,
                        end=end or None, max_pixels=max_pixels)
        with runtime.comfy_errors():
            if images is not None:
                handle = from_images(images, images_fps_of(video_info, images_fps), **sampling)
            elif video_input is not None:
                handle = from_video_input(video_input, images_fps, **sampling)
            else:
                handle = at.open_video(source_path(video, path), frames_per_slice=FRAMES_PER_SLICE,
                                       **sampling)
        info, plan = handle.info, handle.plan
        return io.NodeOutput(handle, info.num_frames, info.fps, plan.sampled_fps, handle.num_frames,
                             info.duration, info.width, info.height)
