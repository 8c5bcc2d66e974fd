"""On-disk cache of vision features (safetensors), so a second process skips decoding and the tower.

Layout: `<cache_dir>/<key>/chunk-<first slice>-<digest>.safetensors`, one file per encoded chunk,
holding `features` [n, tokens_per_slice, D] and `slices` [n] (int64). The directory name `key` is
the sha256 of everything the features depend on:

- the file's content: its size and the sha256 of its first, middle and last 4 MiB (renaming or
  touching the file keeps the key; editing it changes the key),
- the sampling: the plan's source frame indices, the pixel caps and the resized frame size,
- the model: family, dtype, the vision config, the video processor's settings, a strided sample of
  every vision-tower weight, and which vision path runs (fast batched or transformers').

Files are written to a temporary name and renamed, so a reader never sees half a file; a file that
fails to load or has the wrong shape is ignored (a miss), never trusted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
FINGERPRINT_BYTES = 4 * 2 ** 20


def file_fingerprint(path: str | os.PathLike) -> str:
    """sha256 over the file's size and its first, middle and last 4 MiB (cheap on 10 GB files)."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    h = hashlib.sha256(f"size={size};".encode())
    with open(path, "rb") as f:
        offsets = sorted({0, max(0, size // 2 - FINGERPRINT_BYTES // 2), max(0, size - FINGERPRINT_BYTES)})
        for off in offsets:
            f.seek(off)
            h.update(f.read(FINGERPRINT_BYTES))
    return h.hexdigest()


def _vision_module(adapter):
    inner = getattr(adapter.model, "model", None)
    vis = getattr(inner, "visual", None) if inner is not None else None
    return vis if vis is not None else adapter.model


@torch.no_grad()
def model_fingerprint(adapter) -> str:
    """sha256 of what the vision features depend on in the model (memoised on the adapter)."""
    fp = getattr(adapter, "_adapttoken_vision_fingerprint", None)
    if fp is not None:
        return fp
    h = hashlib.sha256()
    cfg = getattr(adapter.model, "config", None)
    vcfg = getattr(cfg, "vision_config", cfg)
    try:
        vcfg_json = vcfg.to_json_string(use_diff=False) if vcfg is not None else ""
    except Exception:  # noqa: BLE001 - any config object: fall back to its repr
        vcfg_json = repr(vcfg)
    vp = getattr(getattr(adapter, "processor", None), "video_processor", None)
    vp_desc = ""
    if vp is not None:
        keys = ("image_mean", "image_std", "rescale_factor", "patch_size", "temporal_patch_size",
                "merge_size", "do_normalize", "do_rescale", "do_convert_rgb", "resample")
        vp_desc = json.dumps({k: str(getattr(vp, k, None)) for k in keys}, sort_keys=True)
    h.update(json.dumps([FORMAT_VERSION, adapter.family, str(adapter.dtype), vcfg_json, vp_desc,
                         bool(getattr(adapter, "use_fast_vision", False))]).encode())
    for name, p in _vision_module(adapter).named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // 256)
        h.update(name.encode())
        h.update(str(tuple(p.shape)).encode())
        h.update(flat[::step][:256].float().cpu().numpy().tobytes())
    fp = h.hexdigest()
    try:
        adapter._adapttoken_vision_fingerprint = fp
    except AttributeError:
        pass
    return fp


def cache_key(adapter, video, resized) -> str:
    """The directory name for one (video content, sampling, model) combination."""
    plan = video.plan
    idx = np.asarray(plan.indices, dtype=np.int64)
    payload = json.dumps({
        "v": FORMAT_VERSION,
        "file": file_fingerprint(plan.info.path),
        "indices": hashlib.sha256(idx.tobytes()).hexdigest(),
        "n": len(idx),
        "frames_per_slice": video.frames_per_slice,
        "max_pixels": plan.max_pixels, "min_pixels": plan.min_pixels,
        "resized": list(resized),
        "model": model_fingerprint(adapter),
    }, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:40]


class DiskFeatureCache:
    """Per-chunk safetensors files of one (video, sampling, model) key; writes in a background thread."""

    def __init__(self, root: str | os.PathLike, key: str, tokens_per_slice: int):
        self.dir = Path(root) / key
        self.key = key
        self.tokens_per_slice = tokens_per_slice
        self._index: dict[int, tuple[Path, int]] = {}      # slice -> (file, row)
        self._lock = threading.Lock()
        self._writer: ThreadPoolExecutor | None = None
        self._pending: list[Future] = []
        self.hits = 0
        self.writes = 0
        self._scan()

    def _scan(self) -> None:
        if not self.dir.is_dir():
            return
        from safetensors import safe_open
        for p in sorted(self.dir.glob("chunk-*.safetensors")):
            try:
                with safe_open(str(p), framework="pt") as f:
                    meta = f.metadata() or {}
                slices = json.loads(meta.get("slices", "[]"))
                if meta.get("key") != self.key:
                    continue
            except Exception as e:  # noqa: BLE001 - a damaged file is a miss, not an error
                logger.warning("feature cache: ignoring %s (%s)", p, e)
                continue
            for row, s in enumerate(slices):
                self._index.setdefault(int(s), (p, row))

    def has(self, s: int) -> bool:
        return int(s) in self._index

    def present(self, slices) -> list[int]:
        return [int(s) for s in slices if int(s) in self._index]

    def load(self, slices, dtype: torch.dtype):
        """(slices found, features [n, tps, D] in `dtype`) for the given slices that are cached."""
        from safetensors.torch import load_file
        by_file: dict[Path, list[tuple[int, int]]] = {}
        for s in slices:
            hit = self._index.get(int(s))
            if hit is not None:
                by_file.setdefault(hit[0], []).append((int(s), hit[1]))
        got_s, got_f = [], []
        for path, items in by_file.items():
            try:
                t = load_file(str(path))
                feats = t["features"]
                if feats.dim() != 3 or feats.shape[1] != self.tokens_per_slice:
                    raise ValueError(f"shape {tuple(feats.shape)}")
                rows = torch.tensor([r for _, r in items])
                got_f.append(feats.index_select(0, rows).to(dtype))
                got_s.extend(s for s, _ in items)
            except Exception as e:  # noqa: BLE001
                logger.warning("feature cache: %s unreadable (%s): recomputing", path, e)
                with self._lock:
                    for s, _ in items:
                        self._index.pop(s, None)
        if not got_s:
            return [], None
        self.hits += len(got_s)
        return got_s, torch.cat(got_f)

    def _write(self, slices: list[int], feats: torch.Tensor) -> None:
        from safetensors.torch import save_file
        self.dir.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(np.asarray(slices, np.int64).tobytes()).hexdigest()[:12]
        path = self.dir / f"chunk-{slices[0]:07d}-{digest}.safetensors"
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            save_file({"features": feats.contiguous(), "slices": torch.tensor(slices, dtype=torch.int64)},
                      str(tmp), metadata={"key": self.key, "slices": json.dumps(slices)})
            os.replace(tmp, path)
        finally:
            if tmp.exists():
                tmp.unlink()
        with self._lock:
            for row, s in enumerate(slices):
                self._index.setdefault(int(s), (path, row))
        self.writes += 1

    def write_async(self, slices, feats_cpu: torch.Tensor) -> None:
        """Store one encoded chunk (CPU tensor) in the background; `flush()` waits for it."""
        if self._writer is None:
            self._writer = ThreadPoolExecutor(1, thread_name_prefix="adapttoken-cache-write")
        self._pending.append(self._writer.submit(self._write, [int(s) for s in slices], feats_cpu))

    def flush(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            try:
                f.result()
            except Exception as e:  # noqa: BLE001 - a full disk must not fail the answer
                logger.warning("feature cache: write failed (%s)", e)

    def close(self) -> None:
        self.flush()
        if self._writer is not None:
            self._writer.shutdown(wait=True)
            self._writer = None
