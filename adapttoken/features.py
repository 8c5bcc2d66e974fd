"""The slice features store (`SliceFeatures`): the vision features of one video for one model,
decoded and encoded on demand, per slice, and kept.

Decoding and the vision tower run only for slices some consumer needs (Lite skips the rest), in
chunks, so frames of a 10,000-frame plan never sit in memory at once. Decoding is decode.py's, the
prefix key/value cache kv_cache.py's, stage timing timing.py's.
"""
from __future__ import annotations

import os
import time

import numpy as np
import torch

from .decode import (DEFAULT_FRAME_STASH_BYTES, FrameDecoder, FrameStash, Prescale, VideoHandle,
                     _ReadyJob, _SyncJob, default_decode_workers, frame_shape)
from .errors import InputError
from .kv_cache import HOST_FORMATS, PrefixKVCache, device_memory_budget, tensor_bytes
from .timing import Timer
from .nvdec import ready_on_current_stream
from .yuv import Yuv420, yuv420_to_rgb


FEATURE_DEVICES = ("auto", "gpu", "cpu")
DEFAULT_GPU_FEATURE_BYTES = None     # None: 20% of the device's memory budget (no fixed cap)
GPU_FEATURE_SHARE = 0.2

# Host bytes of decoded frames at the file's size that chunks may hold at once where frames are not
# resized at decode time (a model on a GPU resizes on the device): the chunks in flight on the
# decoder lanes, the one the vision tower encodes and those decoded ahead. Chunks get fewer slices
# when frames are large (encode_chunk_slices): with one lane (6 chunks held) 28 slices of 1080p,
# 7 of 4K; with eight lanes 13 and 3.
PENDING_FRAME_BYTES = 2 * 2 ** 30


class SliceFeatures:
    """Vision features of one video for one model, computed per slice on demand and kept.

    Options (see `configure`):
    - feature_device: where the computed features live. "auto" (default) keeps them on the model's
      device while all slices of the video would take at most 20% of the device's memory budget
      (and at most `gpu_feature_bytes` when it is set), else in CPU memory, copied to the device per group pass through a
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
    - yuv_handover: None (default): where frames go to a CUDA device at the file's size, PyAV's
      lanes hand over the decoded 4:2:0 planes and the device turns them into RGB (yuv.py: the
      RGB swscale gives, within a level) before the model's preprocessing; half the bytes, and no
      colour conversion on the CPU. Only for files yuv.probe_yuv420 accepts, else RGB as before.
      False: off (RGB from the lanes); True: wherever the file allows, also for a model on the CPU
      (then without decode-time resizing; for tests).
    - hw_decode: False (default): the lanes decode on the CPU. True: where the lanes hand over
      4:2:0 planes to a CUDA device and that GPU's NVDEC takes the stream (nvdec.nvdec_available,
      checked once per file), they decode on the GPU and the planes stay in its memory (nvdec.py:
      the same planes bit for bit, no CPU decoding, no host copy), else on the CPU. Frames waiting
      for the tower then take GPU memory (up to PENDING_FRAME_BYTES), and each lane's decoder
      holds its own surfaces there, outside torch's allocator.
    """

    def __init__(self, adapter, video: VideoHandle, chunk_slices: int = 32, *,
                 feature_device: str = "auto", decode_workers: int | None = None,
                 overlap: bool = True, cache_dir=None, lookahead_chunks: int = 4,
                 gpu_feature_bytes: int | None = DEFAULT_GPU_FEATURE_BYTES, pad_chunks: bool = False):
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
        self._prefix_host = {"host_bytes": "auto", "host_format": "fp8"}
        self.prefix_kv: PrefixKVCache | None = PrefixKVCache()
        self.feature_device = "auto"
        self.decode_workers = default_decode_workers()
        self.overlap = True
        self.lookahead_chunks = lookahead_chunks
        self.gpu_feature_bytes = gpu_feature_bytes
        self.pad_chunks = pad_chunks
        self.decode_resize = True          # resize frames at decode time where possible (Prescale)
        self.yuv_handover: bool | None = None
        self.hw_decode = False
        self.configure(feature_device=feature_device, decode_workers=decode_workers,
                       overlap=overlap, cache_dir=cache_dir)
        self.reset_stats()

    # -- options -------------------------------------------------------------------------------
    def configure(self, *, feature_device: str | None = None, decode_workers: int | None = None,
                  overlap: bool | None = None, cache_dir=None, pad_chunks: bool | None = None,
                  gpu_feature_bytes: int | None = None, prefix_cache: bool | None = None,
                  frame_stash_bytes: int | None = None, prefix_host_bytes: int | str | None = None,
                  prefix_host_format: str | None = None, prefix_cpu_bytes: int | None = None,
                  prefix_keep: bool | None = None,
                  yuv_handover: bool | None = None,
                  hw_decode: bool | None = None) -> "SliceFeatures":
        """Change options (None leaves one as it is). Features already computed stay valid: they
        move when the storage device changes. prefix_cache: keep each group pass's prefix
        keys/values for later questions (PrefixKVCache); prefix_host_bytes: how much of them may
        live in CPU memory when the device is full (0: none; "auto": min(16 GB, a quarter of the
        machine's memory) with the model on CUDA); prefix_host_format: "fp8" (half the bytes, not
        exact) or "exact" for that host tier; prefix_cpu_bytes: how much of them
        are kept with the model off CUDA (0: none, same results); prefix_keep False: none kept on
        any device (same results; the `ask` command, one question per process). yuv_handover:
        True / False (see the class doc; None leaves it as it is). hw_decode: True / False (see
        the class doc; None leaves it as it is)."""
        if prefix_cache is not None:
            if not prefix_cache:
                self.prefix_kv = None
            elif self.prefix_kv is None:
                self.prefix_kv = PrefixKVCache(**self._prefix_host)
        if prefix_keep is not None and self.prefix_kv is not None:
            self.prefix_kv.keep = bool(prefix_keep)
            if not prefix_keep:
                self.prefix_kv.drop(None)
        if prefix_cpu_bytes is not None:
            if prefix_cpu_bytes < 0:
                raise InputError(f"prefix_cpu_bytes={prefix_cpu_bytes} must be >= 0 (0: none kept)")
            if self.prefix_kv is not None:
                self.prefix_kv.set_cpu_bytes(prefix_cpu_bytes)
        if prefix_host_bytes is not None:
            if prefix_host_bytes != "auto" and (isinstance(prefix_host_bytes, str) or prefix_host_bytes < 0):
                raise InputError(f"prefix_host_bytes={prefix_host_bytes!r} must be a number of bytes >= 0 "
                                 "(0: off) or \"auto\"")
            self._prefix_host["host_bytes"] = (prefix_host_bytes if prefix_host_bytes == "auto"
                                               else int(prefix_host_bytes))
        if prefix_host_format is not None:
            if prefix_host_format not in HOST_FORMATS:
                raise InputError(f"prefix_host_format={prefix_host_format!r} is not known: use one of "
                                 f"{', '.join(HOST_FORMATS)}")
            self._prefix_host["host_format"] = prefix_host_format
        if self.prefix_kv is not None:
            self.prefix_kv.host_bytes = self._prefix_host["host_bytes"]
            self.prefix_kv.set_host_format(self._prefix_host["host_format"])
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
        if yuv_handover is not None and yuv_handover != self.yuv_handover:
            self.yuv_handover = bool(yuv_handover)
            self._drop_decoder()                  # its lanes and the stash hold the other layout
        if hw_decode is not None:
            if not isinstance(hw_decode, bool):
                raise InputError(f"hw_decode={hw_decode!r} must be True (NVDEC where the GPU takes "
                                 "the file) or False (CPU decoding)")
            if hw_decode != self.hw_decode:
                self.hw_decode = hw_decode
                self._drop_decoder()              # its lanes decode the other way
        if decode_workers is not None:
            if decode_workers < 0:
                raise InputError(f"decode_workers={decode_workers} must be >= 0 (0: no threads)")
            if decode_workers != self.decode_workers:
                self._drop_decoder()
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
                      "decode_busy_s": 0.0, "h2d_bytes": 0, "d2h_bytes": 0,
                      "hw_decode": self._decoder is not None and self._decoder.device is not None}
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

    def held_bytes(self) -> dict[str, int]:
        """Bytes this store holds now, per device ("cuda:0", "cpu"): the feature blocks, the
        prefix keys/values (device tier; the host tier and its staging buffers under "cpu") and
        Lite's frame stash (CPU memory). Real tensor sizes, counted when asked."""
        out = tensor_bytes(b for b in self._blocks if b is not None)
        if self.prefix_kv is not None:
            for dev, n in self.prefix_kv.held_bytes().items():
                out[dev] = out.get(dev, 0) + n
        if self.stash.bytes:
            out["cpu"] = out.get("cpu", 0) + int(self.stash.bytes)
        return out

    def free_memory(self, device=None) -> int:
        """Drop what this store holds on `device` (everything when None): prefix keys/values
        there, the features when they are stored there, and (for the CPU) the frame stash. The
        store stays usable: what a later request needs is computed again. Returns the bytes
        freed."""
        before = self.held_bytes()
        want = None if device is None else str(torch.device(device))

        def here(dev) -> bool:
            return want is None or str(dev) == want or (
                want in ("cuda", "cpu") and str(dev).split(":")[0] == want)

        if self.prefix_kv is not None:
            self.prefix_kv.drop(device)
        if self._store_device is not None and here(self._store_device):
            self._blocks = [None] * len(self._blocks)
            self._store_device = None
            self._have = torch.zeros_like(self._have)
        if want is None or want == "cpu":
            self.drop_lookahead()                # also empties the frame stash
        after = self.held_bytes()
        return sum(n for d, n in before.items() if here(d)) - sum(n for d, n in after.items()
                                                                   if here(d))

    def _drop_decoder(self) -> None:
        """Close the decoder lanes (a new decoder starts on the next request)."""
        self.drop_lookahead()                    # also empties the frame stash
        if self._decoder is not None:
            self._decoder.close()
            self._decoder = None

    def release(self) -> None:
        self._drop_decoder()
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
        return dev if total <= self.gpu_feature_limit(dev) else torch.device("cpu")

    def gpu_feature_limit(self, dev: torch.device) -> int:
        """Bytes of features "auto" keeps on CUDA device `dev`: 20% of its memory budget, and at most
        `gpu_feature_bytes` when that is set (4096 frames of Qwen3-VL-8B, 10.3 GB with deepstack,
        stay on an 80 GB or larger card; 10,000 frames of Qwen2.5-VL-7B, 7.9 GB, go to the host on
        a 24 GB card)."""
        limit = None
        try:
            limit = int(GPU_FEATURE_SHARE * device_memory_budget(dev))
        except Exception:  # noqa: BLE001 - no budget known: the fixed cap, else 4 GiB
            pass
        if self.gpu_feature_bytes is not None:
            limit = self.gpu_feature_bytes if limit is None else min(limit, self.gpu_feature_bytes)
        return 4 * 2 ** 30 if limit is None else limit

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

    def _gather_rows(self, gids: torch.Tensor, columns: int | None = None) -> torch.Tensor:
        """[n, D] features of global token ids on the compute device (one copy per storage block,
        no host round trip per block); `columns`: only the first that many of each row (Qwen3-VL's
        rows are 4x wider with their deepstack levels, which redundancy removal does not read)."""
        tps, cs = self.tokens_per_slice, self.chunk_slices
        gids = gids.long()
        blk_of = gids // (tps * cs)
        order = torch.argsort(blk_of, stable=True)
        sb = blk_of[order]
        rows = (gids[order] - sb * (tps * cs))
        ub, counts = torch.unique_consecutive(sb, return_counts=True)
        first = next(x for x in self._blocks if x is not None)
        D, dtype, dev = first.shape[-1], first.dtype, first.device
        C = D if columns is None else min(int(columns), D)
        if dev.type == "cpu":
            out = self._pinned_like((len(gids), C), dtype)
        else:
            out = torch.empty(len(gids), C, dtype=dtype, device=dev)
            rows = rows.to(dev, non_blocking=True)
        sorted_out = torch.empty_like(out) if dev.type != "cpu" else torch.empty(len(gids), C, dtype=dtype)
        a = 0
        for b_, n_ in zip(ub.tolist(), counts.tolist()):
            torch.index_select(self._blocks[b_].view(-1, D)[:, :C], 0, rows[a:a + n_],
                               out=sorted_out[a:a + n_])
            a += n_
        out[order.to(dev)] = sorted_out
        return self._to_compute(out)

    # -- compute -------------------------------------------------------------------------------
    def held_chunks(self) -> int:
        """Chunks of decoded frames that can be alive at once: one per decoder lane in flight, the
        one being encoded, and those decoded ahead (see ensure and lookahead)."""
        if not self.overlap or self.decode_workers <= 0:
            return 1
        return self.decode_workers + 1 + max(0, self.lookahead_chunks)

    def encode_chunk_slices(self) -> int:
        """Slices per chunk sent to the vision tower: `chunk_slices`, fewer where frames wait at the
        file's size (no Prescale) and held_chunks() chunks of them would pass PENDING_FRAME_BYTES."""
        cs = max(1, int(self.chunk_slices))
        if self.video.frames is not None or self._prescale() is not None:
            return cs
        frame_bytes = int(np.prod(frame_shape(self.video.info, None, self._yuv())))
        slice_bytes = max(1, frame_bytes * self.video.frames_per_slice)
        return max(1, min(cs, PENDING_FRAME_BYTES // (self.held_chunks() * slice_bytes)))

    def _chunks(self, need: list[int]) -> list[np.ndarray]:
        cs = self.encode_chunk_slices()
        return [np.asarray(need[i:i + cs], dtype=np.int64) for i in range(0, len(need), cs)]

    def _missing(self, slices) -> list[int]:
        u = np.unique(np.asarray(slices, dtype=np.int64))
        need = u[~self._have.numpy()[u]].tolist()
        if self._disk is not None:
            need = [s for s in need if not self._disk.has(s)]
        return need

    def _prescale(self) -> Prescale | None:
        """Resize at decode time (see Prescale) when the adapter offers its resize for CPU frames
        and the model runs on the CPU (there preprocess would run the same function on the same
        frames: identical features). On a GPU preprocess resizes on the device, as before."""
        fn = getattr(self.adapter, "decode_resize", None)
        info = self.video.info
        if (fn is None or not self.decode_resize or self.video.frames is not None
                or self._compute_device().type != "cpu" or (info.height, info.width) == tuple(self.resized)
                or self._yuv() is not None):
            return None
        return Prescale(fn, self.resized)

    def _yuv(self) -> Yuv420 | None:
        """The file's layout when the decoder hands over 4:2:0 planes (see yuv_handover), else None."""
        if self.yuv_handover is False or (self.yuv_handover is None
                                          and self._compute_device().type != "cuda"):
            return None
        return self.video.yuv420

    def _hw_device(self) -> torch.device | None:
        """The CUDA device whose NVDEC the lanes decode on (see hw_decode), else None."""
        if not self.hw_decode or self._yuv() is None:
            return None
        dev = self._compute_device()
        if dev.type != "cuda":
            return None
        from .nvdec import nvdec_available
        info = self.video.info
        idx = info.frame_index.stream_index if info.frame_index is not None else 0
        return dev if nvdec_available(info.path, idx, dev) else None

    def _get_decoder(self) -> FrameDecoder | None:
        if self.decode_workers <= 0:
            return None
        if self._decoder is None:
            pin = self._compute_device().type == "cuda" and torch.cuda.is_available()
            hw = self._hw_device()
            self._decoder = FrameDecoder(self.video, self.decode_workers, pin=pin, stash=self.stash,
                                         resize=self._prescale(), yuv=self._yuv(), device=hw)
            self.stats["hw_decode"] = hw is not None
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
        cs = self.encode_chunk_slices()
        if self.pad_chunks and n < cs:                  # fixed shapes (torch.compile): repeat last
            fps = self.video.frames_per_slice
            pad = frames[-1:].expand((cs - n) * fps, *frames.shape[1:])
            frames = torch.cat([frames, pad])
        if frames.device != dev:
            frames = frames.to(dev, non_blocking=frames.is_pinned())
        yuv = self._yuv()
        if yuv is not None:
            frames = yuv420_to_rgb(frames, yuv)
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
            job = (_SyncJob(self.video, rest, self.stash, self._prescale(), self._yuv()) if dec is None
                   else dec.submit(rest, lane))
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
                frames = ready_on_current_stream(job.result())
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

    def tokens(self, gids: torch.Tensor, hooks=None, columns: int | None = None):
        """(embeds [n, D], coords [3, n]) of the given global token ids (computing what is missing),
        embeds on the model's device; `columns`: only the first that many features of each row."""
        gids = gids.cpu()
        self.ensure(torch.unique(gids // self.tokens_per_slice).numpy(), hooks)
        return self._gather_rows(gids, columns), self.coords_of(gids)

    def tokens_of_slices(self, slices, hooks=None):
        """(embeds, coords, gids) of every token of the given slices, in temporal order."""
        slices = np.sort(np.asarray(slices))
        gids = self.gids_of_slices(slices)
        self.ensure(slices, hooks)
        return self._gather_slices(slices), self.coords_of(gids), gids
