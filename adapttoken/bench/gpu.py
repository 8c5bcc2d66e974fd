"""Speed benchmark of the whole product on a full-size architecture with random weights:
Qwen2.5-VL-7B (default), Qwen3-VL-8B or InternVL3-8B (`--arch`, configs in bench/archs.py).

    python -m adapttoken bench gpu --frames 1024 4096 10000 --out docs/bench_gpu
    python -m adapttoken bench gpu --arch qwen3-vl-8b --frames 1024 4096   # -> docs/bench_gpu_qwen3_vl_8b
    python -m adapttoken bench gpu --tiny --frames 64 128 --out /tmp/bench_tiny     # CPU smoke test

Builds Qwen2.5-VL-7B (text: hidden 3584, 28 layers, 28 heads, 4 KV heads, MLP 18944, vocab 152064,
M-RoPE [16,24,24]; vision: depth 32, hidden 1280, 16 heads, MLP 3420, window 112, full attention at
blocks 7/15/23/31) with random bf16 weights directly on the GPU; compute does not depend on the
weight values. Runs the library's own pipeline (open_video -> split_groups -> RankedGroups ->
score_groups [-> stop rule] -> allocate -> answer, exactly what `ask` runs) on a real video file
decoded from local disk, per sampled length:

- uniform: as many evenly spaced slices as fit the budget, no group pass;
- adapttoken: every group;
- lite: groups in order, stopped after `--lite-stop-fraction` of them. Random weights give no
  confident group, so Lite's stop point is a benchmark parameter: the stop rule here stops after
  exactly k = round(fraction * groups) groups whatever the entropies (StopRule(threshold=1.0,
  min_groups=k) would do the same whenever the entropy is below its maximum);
- second question: a new question on the same video and sampling, right after adapttoken, with the
  vision features still in memory (no decoding, no vision tower).

Per case: seconds per stage (probe, decode = time the pipeline waited for frames, preprocess,
vision, group_pass, allocate, answer), wall time, counted FLOPs per stage and TFLOP/s, tokens per
second, peak GPU memory (torch.cuda.max_memory_allocated, reset per case). The compute floor of a
case is its counted FLOPs over the bf16 matmul rate measured in the same run (8192^3).

FLOPs (multiply-add = 2): vision tower = qwen_vision_fast.count_flops per slice (matmuls, window and
full attention, merger) for Qwen2.5-VL, archs.vision_flops_per_slice for Qwen3-VL (patch embed,
27 blocks of full attention within the slice, merger + 3 deepstack mergers) and InternVL (patch
embed, 24 layers over 1025 tokens, pixel-shuffle projector), times the slices encoded; every
language-model call is counted from its real shapes (a hook on the text model): 2 * decoder-linear
params * new tokens + attention 4 * layers * heads * head_dim * (new * past + new * (new + 1) / 2)
(causal) + the LM head on the positions that get logits (1 per call); the attention probe (q/k
projections and the score matrix) per group. The other families have no prefix key/value cache:
their second question re-runs every group pass (vision features reused).
The cases run here; the model, FLOP counting and device rates are gpu_measure.py's, the report
(table, plot, targets, merged runs) gpu_report.py's.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..defaults import QUANTIZATION_CHOICES
from .gpu_measure import (LLMCounter, _sync, build_model, copy_bandwidth, matmul_rate, param_counts,
                          vision_flops_per_slice)
from .gpu_report import METHODS, STAGES, derived, markdown, merge_results, plot, targets

Q1 = ("What colour was the object that appeared in the video?", ("red", "green", "blue", "yellow"))
Q2 = ("Which appeared first in the video, the red object or the blue object?",
      ("the red object", "the blue object", "both at once", "neither appeared"))

ARCH_NAMES = ("qwen2.5-vl-7b", "qwen2.5-vl-72b", "qwen3-vl-8b", "internvl3-8b")


def default_out(arch: str) -> str:
    """docs/bench_gpu for Qwen2.5-VL-7B, docs/bench_gpu_<arch> (dots and dashes as _) otherwise."""
    if arch == "qwen2.5-vl-7b":
        return "docs/bench_gpu"
    return "docs/bench_gpu_" + arch.replace("-", "_").replace(".", "_")


# ----------------------------------------------------------------------------------------------
# test video


def bench_frames(frames: int, size: tuple[int, int], clip: int = 48, seed: int = 0):
    """uint8 frames [<=64, H, W, 3] at a time: a rendered synthetic clip
    (adapttoken.training.synthetic.Scene) looped with a drift of 4 px per loop and a binary frame
    counter stamped in, so no two frames are equal (rendering 10,000 distinct scenes would cost
    minutes)."""
    from ..training.synthetic import Scene

    base = Scene(clip, seed, size).render(0, clip)            # [clip, H, W, 3]
    bits = 14
    chunk = []
    for t in range(frames):
        f = np.roll(base[t % clip], 4 * (t // clip), axis=1)
        code = (t >> np.arange(bits)) & 1
        f = f.copy()
        for i, bit in enumerate(code):
            f[2:10, 2 + 8 * i:8 + 8 * i] = 255 if bit else 0
        chunk.append(f)
        if len(chunk) == 64:
            yield np.stack(chunk)
            chunk = []
    if chunk:
        yield np.stack(chunk)


def make_video(path: Path, frames: int, size: tuple[int, int], fps: float = 8.0, gop: int = 64,
               crf: int = 18, clip: int = 48, seed: int = 0) -> dict:
    """A real H.264 file of `frames` frames (bench_frames): decoding it is real work."""
    from ..training.synthetic import write_video

    t0 = time.perf_counter()
    H, W = size
    write_video(path, bench_frames(frames, size, clip, seed), fps, crf=crf, gop=gop)
    return {"path": str(path), "frames": frames, "height": H, "width": W, "fps": fps, "gop": gop,
            "crf": crf, "codec": "h264 (libx264)", "bytes": path.stat().st_size,
            "seconds_to_make": time.perf_counter() - t0}


@dataclass
class MemoryVideo:
    """A video held in memory as uint8 frames [N, H, W, 3] (no file, no decoder, no PyAV): what
    ComfyUI's IMAGE input gives the library. `bench gpu --in-memory` measures from it."""
    frames: torch.Tensor
    fps: float = 8.0
    name: str = "memory"

    def open(self, num_frames: int, max_pixels: int | None, min_pixels: int | None,
             frames_per_slice: int):
        """A VideoHandle over the sampled frames (as nodes/video.py's from_images builds it)."""
        from ..decode import VideoHandle
        from ..video import VideoInfo, plan_sampling
        n, h, w = self.frames.shape[:3]
        info = VideoInfo(f"<{self.name} {n}f {h}x{w}>", n, float(self.fps), n / float(self.fps), w, h, 0)
        plan = plan_sampling(info, num_frames=num_frames, max_pixels=max_pixels,
                             min_pixels=min_pixels, multiple_of=frames_per_slice)
        idx = torch.as_tensor(plan.indices, dtype=torch.long)
        return VideoHandle(plan, frames_per_slice, frames=self.frames[idx])


def make_memory_video(frames: int, size: tuple[int, int], fps: float = 8.0, clip: int = 48,
                      seed: int = 0) -> tuple[MemoryVideo, dict]:
    """(MemoryVideo, meta) of the same frames make_video writes, held in memory."""
    t0 = time.perf_counter()
    arr = torch.from_numpy(np.concatenate(list(bench_frames(frames, size, clip, seed))))
    H, W = size
    return MemoryVideo(arr, fps), {"path": "<in memory>", "frames": frames, "height": H, "width": W,
                                   "fps": fps, "codec": "none (uint8 frames in memory)",
                                   "bytes": arr.numel(), "seconds_to_make": time.perf_counter() - t0}


# ----------------------------------------------------------------------------------------------
# one case


@dataclass
class Case:
    frames: int
    method: str
    seconds: dict = field(default_factory=dict)
    wall: float = 0.0
    flops: dict = field(default_factory=dict)
    tokens: dict = field(default_factory=dict)
    peak_gib: float = 0.0
    groups: int = 0
    group_passes: int = 0
    decoded_frames: int = 0
    encoded_slices: int = 0
    kept: int = 0
    features: dict = field(default_factory=dict)
    note: str = ""
    entropy_norm: list = field(default_factory=list)    # H/H_max of each group run, in order
    # the kept tokens as (slice, row, col), for comparing two runs (not written to results.json)
    kept_set: frozenset = field(default_factory=frozenset, repr=False)


class StopAfter:
    """Lite's stop rule for the benchmark: stop after exactly k groups (random weights are never
    confident, so the stop point is a parameter)."""

    def __init__(self, k: int):
        self.k = int(k)
        self.threshold, self.min_groups = 1.0, self.k

    def should_stop(self, processed) -> bool:
        return len(processed) >= self.k


def run_case(model, video_path, frames: int, method: str, args, counter: LLMCounter,
             vis_per_slice: float, question=Q1, fresh: bool = True, cache_dir=None,
             layout=None) -> Case | None:
    """One question through the library pipeline (what `ask` does), timed and counted. Under
    torchrun (`layout`) the groups are divided among the ranks (distributed.ParallelQuestion);
    the Case comes back on rank 0 (counts summed over the ranks), None elsewhere."""
    from ..budget import allocate, uniform_frames
    from ..decode import open_video
    from ..entropy import score_groups
    from ..groups import split_groups
    from ..pipeline import answer
    from ..question import Question
    from ..rank import RankedGroups

    dev = model.adapter.device
    q = Question(question[0], tuple(question[1]))
    if fresh:
        model.clear_cache()
    if dev.type == "cuda":
        if fresh:         # a follow-up question keeps the allocator's blocks, as in real use
            torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
        alloc0 = _allocator_counts(dev)
    counter.reset()
    _sync(dev)
    t_start = time.perf_counter()
    if isinstance(video_path, MemoryVideo):
        video = video_path.open(frames, args.pixels, args.pixels, model.adapter.frames_per_slice)
    else:
        video = open_video(video_path, num_frames=frames, max_pixels=args.pixels,
                           min_pixels=args.pixels, frames_per_slice=model.adapter.frames_per_slice)
    probe_s = time.perf_counter() - t_start
    feats = model.features_for(video)
    feats.configure(feature_device=args.feature_device, decode_workers=args.decode_workers,
                    overlap=not args.no_overlap, cache_dir=cache_dir,
                    pad_chunks=bool(args.compile_vision),
                    prefix_host_bytes=("auto" if args.kv_host_gib is None
                                       else int(args.kv_host_gib * 2 ** 30)),
                    prefix_host_format=args.kv_host_format,
                    prefix_cache=False if getattr(args, "no_prefix_kv", False) else None,
                    prefix_keep=False if getattr(args, "one_question", False) else None,
                    yuv_handover=False if getattr(args, "rgb_handover", False) else None,
                    hw_decode=bool(getattr(args, "nvdec", False)))
    feats.reset_stats()
    feats.timer.add("probe", probe_s)
    n_groups = 0
    pq = None
    if layout is not None:
        from .. import distributed
        distributed.barrier(layout)          # every rank starts the clock together
        _sync(dev)
        t_start = time.perf_counter() - probe_s
    if method == "uniform":
        if layout is not None and layout.replica != 0:
            return None
        sel = uniform_frames(model, video, q, args.budget)
        res = answer(sel, max_new_tokens=args.max_new_tokens)
    else:
        groups = split_groups(video, args.group_size, "strided")
        n_groups = len(groups)
        ranked = RankedGroups(model, groups, q)
        scored = score_groups(ranked)
        if method == "lite":
            k = max(1, round(args.lite_stop_fraction * n_groups))
            scored = scored.with_stop(StopAfter(k))
        if layout is None:
            sel = allocate(scored, args.budget, redundancy_threshold=0.9, method=method)
            res = answer(sel, max_new_tokens=args.max_new_tokens)
        else:
            with distributed.ParallelQuestion(layout, scored) as pq:
                sel = pq.select(args.budget, redundancy_threshold=0.9, method=method)
                res = None if sel is None else answer(sel, max_new_tokens=args.max_new_tokens)
            if res is not None:
                rep = pq.report()
                res.extra["distributed"] = rep
                res.decoded_frames, res.encoded_slices, _ = distributed.totals(rep)
    _sync(dev)
    wall = time.perf_counter() - t_start
    if layout is not None and pq is not None:
        from .. import distributed
        llm_all = distributed.all_gather_objects(counter.split(len(sel.prompt.suffix_ids))
                                                 if sel is not None else
                                                 counter.split(len(scored.ranked.prompt.suffix_ids)),
                                                 layout)
        peaks = distributed.all_gather_objects(
            torch.cuda.max_memory_allocated(dev) / 2 ** 30 if dev.type == "cuda" else 0.0, layout)
        if res is None:
            return None

    c = Case(frames, method, wall=wall)
    c.seconds = {k: v for k, v in res.seconds.items() if k != "total"}
    c.seconds["sum_of_stages"] = res.seconds.get("total", 0.0)
    n_suffix = len(sel.prompt.suffix_ids)
    llm = counter.split(n_suffix)
    if layout is not None and pq is not None:   # group passes of every replica (TP ranks: one each)
        mine = [d for i, d in enumerate(llm_all) if i % layout.tp == 0]
        llm = dict(llm)
        for k in llm:
            if not k.startswith("answer"):
                llm[k] = sum(d.get(k, 0) for d in mine)
    c.flops = {"vision": vis_per_slice * res.encoded_slices, "group_pass": llm["group_pass"],
               "answer": llm["answer"]}
    c.flops["total"] = sum(c.flops.values())
    c.tokens = {k: v for k, v in llm.items() if k not in ("group_pass", "answer")}
    c.tokens["vision_tokens"] = res.encoded_slices * feats.tokens_per_slice
    if dev.type == "cuda":
        c.peak_gib = torch.cuda.max_memory_allocated(dev) / 2 ** 30
    c.groups, c.group_passes = n_groups, res.group_passes
    if layout is not None and pq is not None:
        c.peak_gib = max(peaks)
        c.features["distributed"] = res.extra["distributed"]
        c.features["peak_gib_per_rank"] = [round(x, 3) for x in peaks]
    c.decoded_frames, c.encoded_slices = res.decoded_frames, res.encoded_slices
    c.kept = len(res.kept_tokens)
    c.kept_set = frozenset((t["slice"], t["row"], t["col"]) for t in res.kept_tokens)
    c.entropy_norm = [None if g.entropy_norm is None else round(float(g.entropy_norm), 5)
                      for g in res.groups if g.entropy is not None]
    c.features = dict(res.extra.get("features", {}))
    # tokens redundancy removal dropped (each drop is backfilled in a further round: allocate's
    # time grows with them, and they depend on the picture, e.g. a downscaled 4K source)
    c.features["redundant_dropped"] = getattr(sel, "redundant_dropped", None)
    c.features["yuv_handover"] = feats._yuv() is not None      # lanes handed over 4:2:0 planes
    dec = feats._decoder
    c.features["hw_decode"] = dec is not None and dec.device is not None   # lanes decoded on NVDEC
    kv = getattr(feats, "prefix_kv", None)
    if kv is not None:
        c.features.update(prefix_kv_hits=kv.hits, prefix_kv_stored=kv.stored,
                          prefix_kv_refused=kv.refused, prefix_kv_gib=kv.bytes / 2 ** 30,
                          prefix_kv_host_stored=kv.host_stored,
                          prefix_kv_host_gib=kv.host_used / 2 ** 30,
                          prefix_kv_host_s=round(kv.host_seconds, 4),
                          prefix_kv_ahead_hits=kv.ahead_hits)
    if dev.type == "cuda":
        from ..kv_cache import device_memory_budget
        c.features["device_budget_gib"] = device_memory_budget(dev) / 2 ** 30
        # memory on the card outside torch's allocator (the CUDA context, NVDEC's surfaces)
        free, total = torch.cuda.mem_get_info(dev)
        c.features["outside_torch_gib"] = (total - free - torch.cuda.memory_reserved(dev)) / 2 ** 30
        # the caching allocator during the case: cudaMalloc calls, and retries (an allocation
        # that failed, so the allocator freed its cached blocks and tried again: slow)
        c.features.update({f"allocator_{k}": v - alloc0[k] for k, v in _allocator_counts(dev).items()})
    return c


def _allocator_counts(dev) -> dict:
    st = torch.cuda.memory_stats(dev)
    return {k: int(st.get(k, 0)) for k in ("num_alloc_retries", "num_device_alloc", "num_device_free")}


def _launch(nproc: int, argv: list[str]) -> int:
    """Start this benchmark under torch's own launcher (torchrun) with `nproc` processes."""
    from torch.distributed.run import get_args_parser, run
    a = get_args_parser().parse_args(["--standalone", "--nproc-per-node", str(nproc), "-m",
                                      "adapttoken"])
    a.training_script_args = ["bench", "gpu", *argv]     # ours, not torchrun's options
    run(a)                                               # raises when a rank failed
    return 0


def parse_size(s: str) -> tuple[int, int]:
    h, _, w = s.lower().partition("x")
    return int(h), int(w or h)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapttoken bench gpu",
                                 description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", default="qwen2.5-vl-7b", choices=ARCH_NAMES,
                    help="architecture (random weights); the others come from bench/archs.py")
    ap.add_argument("--llm-layers", type=int, default=None,
                    help="Qwen2.5-VL: build only this many decoder layers (a slice of the "
                         "architecture at full width, e.g. 4 of 72B's 80 to fit one GPU)")
    ap.add_argument("--frames", type=int, nargs="+", default=[1024, 4096, 10000])
    ap.add_argument("--size", default="308x560", help="frame size HxW (also the pixel cap)")
    ap.add_argument("--source-size", default=None,
                    help="the generated video's frame size HxW when it differs from --size (e.g. "
                         "1080x1920, 2160x3840): frames are decoded at this size and resized to "
                         "the --size pixel cap by the decoder lanes, as for a real camera file")
    ap.add_argument("--budget", type=int, default=7040)
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--lite-stop-fraction", type=float, default=0.25)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--max-new-tokens", type=int, default=4,
                    help="answer length (random weights never stop by themselves)")
    ap.add_argument("--out", default=None,
                    help="output folder (default: docs/bench_gpu, docs/bench_gpu_<arch> for the others)")
    ap.add_argument("--tiny", action="store_true", help="tiny random config (CPU smoke test)")
    ap.add_argument("--video", default=None, help="video file (default: generate one)")
    ap.add_argument("--video-frames", type=int, default=None,
                    help="frames of the generated video (default: the largest --frames)")
    ap.add_argument("--video-dir", default=None, help="where to write the generated video")
    ap.add_argument("--in-memory", action="store_true",
                    help="no video file: the same generated frames held in memory as uint8 (no "
                         "decoder, no PyAV; what ComfyUI's IMAGE input gives); decode = 0")
    ap.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none",
                    help="Qwen2.5-VL: the random language-model weights quantized by bitsandbytes "
                         "as they are drawn, one at a time (the bf16 model never exists: 72B fits "
                         "one GPU in nf4); vision tower and LM head kept in bf16; models/quant.py. "
                         "fp8 (any --arch): built in bf16, then the language model's and the "
                         "vision tower's linear layers converted to float8 (models/fp8.py)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--feature-device", default="auto", choices=["auto", "gpu", "cpu"])
    ap.add_argument("--decode-workers", type=int, default=None)
    ap.add_argument("--no-overlap", action="store_true")
    ap.add_argument("--rgb-handover", action="store_true",
                    help="decoder lanes hand over RGB frames (the YUV handover off: swscale converts "
                         "on the CPU, as before it); variant rgb_handover runs it next to the default")
    ap.add_argument("--nvdec", action="store_true",
                    help="decoder lanes decode on the GPU's NVDEC where it takes the file (library: "
                         "hw_decode=True; off by default); variant nvdec runs it next to the default")
    ap.add_argument("--compile-vision", action="store_const", const=True, default=None,
                    help="force torch.compile of the fast Qwen2.5-VL tower's blocks (chunks padded to "
                         "one shape); the default already compiles it on CUDA")
    ap.add_argument("--eager-vision", dest="compile_vision", action="store_const", const=False,
                    help="run the fast Qwen2.5-VL tower eagerly (no torch.compile)")
    ap.add_argument("--no-fuse-text", dest="fuse_text", action="store_const", const=False,
                    default=None, help="Qwen2.5-VL: transformers' eager RMSNorm/MLP in the language "
                                       "model instead of the fused kernels (fused_text.py)")
    ap.add_argument("--disk-cache", action="store_true",
                    help="also time the on-disk feature cache (write, then load) at the smallest length")
    ap.add_argument("--card-gib", type=float, default=24.0,
                    help="emulate a card of this many GiB (torch.cuda.set_per_process_memory_fraction: "
                         "allocations beyond it fail) for the lengths >= --card-from; 0: off")
    ap.add_argument("--card-from", type=int, default=10000)
    ap.add_argument("--no-prefix-kv", action="store_true",
                    help="keep no group-prefix keys/values for later questions (PrefixKVCache off): "
                         "the peak of one question without that cache")
    ap.add_argument("--one-question", action="store_true",
                    help="as the `ask` command: the group passes run as usual but no group-prefix "
                         "keys/values are kept (AdaptTokenConfig.prefix_keep=False)")
    ap.add_argument("--kv-host-gib", type=float, default=None,
                    help="let group-prefix keys/values that do not fit on the GPU live in this many "
                         "GiB of CPU memory (PrefixKVCache host tier; 0: off; default: the library's "
                         "'auto', min(16 GB, a quarter of the RAM))")
    ap.add_argument("--kv-host-format", choices=["fp8", "exact"], default="fp8",
                    help="the host tier's keys/values as float8 with per-token scales (the library's "
                         "default) or exact")
    ap.add_argument("--variants", nargs="*", default=None,
                    choices=["threads", "hf_vision", "cpu_features", "one_thread", "eager_vision",
                             "compiled_vision", "unfused_text", "masked_suffix", "rgb_handover",
                             "nvdec", "repeat"],
                    help="also run the full method at the smallest length with single optimisations "
                         "undone: threads (no decoder threads, no overlap), hf_vision (transformers' "
                         "vision tower), cpu_features, one_thread (one decoder lane), eager_vision "
                         "(compile off); compiled_vision (compile forced, chunks padded); "
                         "unfused_text (transformers' eager RMSNorm/MLP in the language model); "
                         "masked_suffix (the question suffix through transformers' sdpa: repeat_kv "
                         "and an explicit mask, models/suffix_attention.py off); "
                         "rgb_handover (decoder lanes hand over RGB, no YUV handover); nvdec "
                         "(lanes decode on NVDEC); repeat (the "
                         "same again: run-to-run spread); no names: the first four")
    ap.add_argument("--variants-frames", type=int, default=None,
                    help="length the variants run at (default: the smallest --frames)")
    ap.add_argument("--time-limit", type=float, default=None,
                    help="seconds: skip the remaining cases once this much time has passed")
    ap.add_argument("--nproc", type=int, default=None,
                    help="run under torchrun with this many processes, one GPU each (started through "
                         "torch.distributed.run when not already under torchrun): the groups of each "
                         "question are divided among them; the floor is N x the matmul rate")
    ap.add_argument("--tp", type=int, default=None,
                    help="tensor parallel over this many processes (torchrun; --nproc defaults to it "
                         "and must equal it): the random model is built sharded in memory, each rank "
                         "creating only its share")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="no benchmark: merge these results.json files (later runs win) and write "
                         "the report (README.md, results.json, bench_gpu.png) to --out")
    ap.add_argument("--note", action="append", default=[],
                    help="with --from-json: a note per run, in order")
    args = ap.parse_args(argv)
    if args.out is None:
        args.out = default_out(args.arch)
    from .. import distributed
    layout = None
    if args.tp is not None and args.nproc is None:
        args.nproc = args.tp
    if args.nproc is not None and not args.from_json:
        if args.nproc < 1:
            raise SystemExit(f"--nproc {args.nproc} must be at least 1")
        if not distributed.launched_by_torchrun():
            return _launch(args.nproc, argv if argv is not None else sys.argv[1:])
        layout = distributed.init(tp=args.tp or 1, device=args.device)
        if layout.tp > 1 and args.arch not in ("qwen2.5-vl-7b", "qwen2.5-vl-72b"):
            raise SystemExit(f"--tp builds Qwen2.5-VL architectures only (not {args.arch})")
        if layout.world != args.nproc:
            raise SystemExit(f"--nproc {args.nproc} but torchrun started {layout.world} processes")
        if args.variants is not None or args.disk_cache:
            raise SystemExit("--variants and --disk-cache run in one process: leave out --nproc")
        args.device = str(layout.device)
        if not layout.is_main:
            sys.stdout = open(os.devnull, "w")

    if args.from_json:
        res = merge_results(args.from_json, args.note)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1, default=str))
        (out / "README.md").write_text(markdown(res))
        plot(res, out / "bench_gpu.png")
        print(markdown(res))
        return 0

    t_begin = time.perf_counter()
    device = torch.device(args.device)
    H, W = parse_size(args.size)
    args.pixels = H * W
    if args.source_size:                        # the file's size; --size stays the pixel cap
        H, W = parse_size(args.source_size)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    import transformers
    try:
        import av
        av_version = av.__version__
    except ImportError:
        av_version = None
    meta = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__,
            "av": av_version, "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "arch": args.arch, "tiny": args.tiny, "pixels": args.pixels, "budget": args.budget,
            "group_size": args.group_size, "lite_stop_fraction": args.lite_stop_fraction,
            "max_new_tokens": args.max_new_tokens, "compile_vision": args.compile_vision,
            "fuse_text": args.fuse_text, "quantization": args.quantization,
            "in_memory": args.in_memory,
            "feature_device": args.feature_device, "overlap": not args.no_overlap,
            "rgb_handover": args.rgb_handover, "nvdec": args.nvdec,
            "card_gib": args.card_gib, "card_from": args.card_from, "kv_host_gib": args.kv_host_gib,
            "kv_host_format": args.kv_host_format,
            "command": "python -m adapttoken bench gpu " + " ".join(argv if argv is not None else sys.argv[1:])}
    if device.type == "cuda":
        meta["gpu"] = torch.cuda.get_device_name(device)
        meta["gpu_memory_gib"] = torch.cuda.get_device_properties(device).total_memory / 2 ** 30
    print(f"[bench gpu] {meta.get('gpu', device)} torch {meta['torch']} transformers "
          f"{meta['transformers']} av {av_version}", flush=True)

    results = {"meta": meta, "cases": [], "skipped": []}
    results["matmul"] = matmul_rate(device)
    results["copy_bw"] = copy_bandwidth(device)
    rate = results["matmul"]["flops_per_s"]
    if layout is not None:        # the floor of N GPUs: N x the per-GPU rate measured here
        meta["nproc"] = layout.world
        meta["tp"] = layout.tp
        results["matmul"]["per_gpu_flops_per_s"] = rate
        rate = rate * layout.world
        results["matmul"]["flops_per_s"] = rate
    print(f"[bench gpu] bf16 matmul {rate / 1e12:.1f} TFLOP/s", flush=True)

    # video
    if args.in_memory:
        vpath, meta["video"] = make_memory_video(args.video_frames or max(args.frames), (H, W))
        print(f"[bench gpu] {meta['video']['frames']} frames in memory "
              f"({meta['video']['bytes'] / 2 ** 30:.2f} GiB) in {meta['video']['seconds_to_make']:.1f} s",
              flush=True)
    elif args.video:
        vpath = Path(args.video)
        from ..video import probe_video
        info = probe_video(vpath)
        meta["video"] = {"path": str(vpath), "frames": info.num_frames, "height": info.height,
                         "width": info.width, "fps": info.fps, "bytes": vpath.stat().st_size}
    else:
        n = args.video_frames or max(args.frames)
        vdir = Path(args.video_dir or out)
        vpath = vdir / f"bench_{n}f_{H}x{W}.mp4"
        if layout is None or layout.is_main:         # one writer; the other ranks wait for it
            meta["video"] = make_video(vpath, n, (H, W))
        if layout is not None:
            meta["video"] = distributed.broadcast_object(meta.get("video"), layout)
        print(f"[bench gpu] wrote {vpath} ({meta['video']['bytes'] / 2 ** 20:.1f} MiB) in "
              f"{meta['video']['seconds_to_make']:.1f} s", flush=True)

    meta["llm_layers"] = args.llm_layers
    if args.arch in ("qwen2.5-vl-7b", "qwen2.5-vl-72b"):
        model, build_s = build_model(args.tiny, device, dtype, args.pixels,
                                     size=args.arch.rsplit("-", 1)[1], llm_layers=args.llm_layers,
                                     layout=layout, quantization=args.quantization)
        model.adapter.compile_vision = args.compile_vision
        if layout is None or layout.tp == 1:        # tensor parallel: transformers' own layers
            model.adapter.fuse_text = args.fuse_text
    else:
        if args.quantization not in ("none", "fp8"):
            raise SystemExit(f"--quantization {args.quantization} applies to the Qwen2.5-VL "
                             f"architectures here, not --arch {args.arch}")
        from .archs import build_arch_model
        model, build_s = build_arch_model(args.arch, device, dtype, pixels=args.pixels, tiny=args.tiny)
        if args.quantization == "fp8":
            from ..models.quant import quantize_in_memory
            quantize_in_memory(model.adapter.model, "fp8", device)
            model.name += "-fp8"
        if hasattr(model.adapter, "compile_vision"):     # Qwen3-VL's fast tower
            model.adapter.compile_vision = args.compile_vision
    meta["fast_vision"] = bool(getattr(model.adapter, "use_fast_vision", False))
    meta["model"] = model.name
    meta["frames_per_slice"] = model.adapter.frames_per_slice
    meta["build_seconds"] = build_s
    meta["params"] = param_counts(model)
    res_hw = model.adapter.resized_size(meta["video"]["height"], meta["video"]["width"],
                                        args.pixels, args.pixels)   # the source's size, capped
    meta["resized"] = list(res_hw)
    rows, cols = model.adapter.token_grid(res_hw)
    meta["tokens_per_slice"] = rows * cols
    from ..decode import default_decode_workers
    meta["decode_workers"] = args.decode_workers if args.decode_workers is not None else default_decode_workers()
    vis_per_slice = vision_flops_per_slice(model, res_hw)
    meta["vision_flops_per_slice"] = vis_per_slice
    print(f"[bench gpu] model built in {build_s:.1f} s: {meta['params']['total'] / 1e9:.2f} B params, "
          f"{meta['params']['bytes'] / 2 ** 30:.2f} GiB", flush=True)

    counter = LLMCounter(model)
    with counter:
        # warm-up: kernels, cuBLAS handles, the processor, compile (shapes of the real runs)
        t0 = time.perf_counter()
        warm = min(max(4 * args.group_size, 64), meta["video"]["frames"])
        for m in ("adapttoken", "lite", "uniform"):
            run_case(model, vpath, warm, m, args, counter, vis_per_slice, layout=layout)
        meta["warmup_seconds"] = time.perf_counter() - t0
        print(f"[bench gpu] warm-up {meta['warmup_seconds']:.1f} s", flush=True)

        def record(c: Case):
            d = c.__dict__.copy()
            d.pop("kept_set", None)
            d["derived"] = derived(d, rate)
            results["cases"].append(d)
            s = d["seconds"]
            print(f"[bench gpu] {c.frames:6d} {c.method:16s} wall {c.wall:7.2f} s  "
                  + " ".join(f"{k}={s.get(k, 0):.2f}" for k in STAGES if s.get(k))
                  + f"  floor {d['derived']['floor_s']:.2f} s  x{d['derived']['x_floor']:.2f}"
                  f"  peak {c.peak_gib:.1f} GiB  passes {c.group_passes}/{c.groups}", flush=True)
            (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

        def over_time() -> bool:
            late = bool(args.time_limit) and time.perf_counter() - t_begin > args.time_limit
            return late if layout is None else distributed.broadcast_object(late, layout)

        def guarded(label, fn):
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 - keep the other cases (an OOM, say)
                import traceback
                traceback.print_exc()
                results.setdefault("errors", []).append(f"{label}: {type(e).__name__}: {e}"[:500])
                model.clear_cache()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                return None

        def set_card(L):
            if device.type != "cuda":
                return
            total = torch.cuda.get_device_properties(device).total_memory
            if args.card_gib and L >= args.card_from:
                frac = min(1.0, args.card_gib * 2 ** 30 / total)
            else:
                frac = 1.0
            index = device.index if device.index is not None else torch.cuda.current_device()
            torch.cuda.set_per_process_memory_fraction(frac, index)

        for L in args.frames:
            set_card(L)
            for m in args.methods:
                if over_time():
                    results["skipped"].append(f"{L} {m}")
                    continue
                if m == "second_question":
                    first = any(c["frames"] == L and c["method"] == "adapttoken" for c in results["cases"])
                    if layout is not None:
                        first = distributed.broadcast_object(first, layout)
                    if not first:
                        continue
                    c = guarded(f"{L} {m}", lambda: run_case(model, vpath, L, "adapttoken", args, counter,
                                                             vis_per_slice, question=Q2, fresh=False,
                                                             layout=layout))
                    if c is not None:
                        c.method = "second_question"
                else:
                    c = guarded(f"{L} {m}", lambda: run_case(model, vpath, L, m, args, counter,
                                                             vis_per_slice, layout=layout))
                if c is not None:
                    record(c)
        model.clear_cache()
        set_card(0)

        # variants of the full method at the smallest length: what each optimisation is worth
        if args.variants is not None:
            L = args.variants_frames or min(args.frames)
            base = dict(feature_device=args.feature_device, decode_workers=args.decode_workers,
                        no_overlap=args.no_overlap, rgb_handover=args.rgb_handover,
                        nvdec=args.nvdec)
            table = {
                "threads": ("no threads, no overlap", dict(decode_workers=0, no_overlap=True), True),
                "hf_vision": ("transformers vision tower", dict(compile_vision=False), False),
                "cpu_features": ("features in CPU memory", dict(feature_device="cpu"), True),
                "one_thread": ("1 decoder thread", dict(decode_workers=1), True),
                "eager_vision": ("fast vision tower, eager (compile off)", dict(compile_vision=False), True),
                "compiled_vision": ("fast vision tower, compile forced, chunks padded",
                                    dict(compile_vision=True), True),
                "unfused_text": ("language model: transformers' eager norm/MLP/rotary (no fused kernels)",
                                 dict(fuse_text=False), True),
                "masked_suffix": ("question suffix: transformers' sdpa (repeat_kv + explicit mask)",
                                  dict(fast_suffix=False), True),
                "rgb_handover": ("decoder lanes hand over RGB (YUV handover off)",
                                 dict(rgb_handover=True), True),
                "nvdec": ("decoder lanes decode on the GPU's NVDEC", dict(nvdec=True), True),
                "repeat": ("as benchmarked above, run again (run-to-run spread)", {}, True),
            }
            names = args.variants or ["threads", "hf_vision", "cpu_features", "one_thread"]
            variants = [table[n] for n in names]
            results["variants"] = []
            base["compile_vision"] = args.compile_vision
            base["fuse_text"] = args.fuse_text
            base["fast_suffix"] = True
            has_fast_suffix = getattr(model.adapter, "fast_suffix", False)
            for name, change, fast in variants:
                if over_time():
                    results["skipped"].append(f"variant {name}")
                    continue
                for k, v in change.items():
                    setattr(args, k, v)
                model.adapter.use_fast_vision = fast
                model.adapter.compile_vision = args.compile_vision
                model.adapter.fuse_text = args.fuse_text
                if has_fast_suffix:
                    model.adapter.fast_suffix = change.get("fast_suffix", True)
                c = guarded(f"variant {name}", lambda: run_case(model, vpath, L, "adapttoken", args,
                                                                counter, vis_per_slice))
                for k, v in base.items():
                    setattr(args, k, v)
                if has_fast_suffix:
                    model.adapter.fast_suffix = True
                model.adapter.use_fast_vision = True
                model.adapter.compile_vision = args.compile_vision
                model.adapter.fuse_text = args.fuse_text
                model.clear_cache()
                if c is not None:
                    d = c.__dict__.copy()
                    d.pop("kept_set", None)
                    d["variant"] = name
                    d["derived"] = derived(d, rate)
                    results["variants"].append(d)
                    print(f"[bench gpu] variant {name:28s} {L} frames wall {c.wall:7.2f} s  "
                          + " ".join(f"{k}={c.seconds.get(k, 0):.2f}" for k in STAGES
                                     if c.seconds.get(k)), flush=True)
                    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

        if args.disk_cache and not over_time():
            import shutil
            import tempfile
            L = min(args.frames)
            cdir = Path(tempfile.mkdtemp(prefix="adapttoken-cache-"))
            try:
                a = run_case(model, vpath, L, "adapttoken", args, counter, vis_per_slice, cache_dir=cdir)
                b = run_case(model, vpath, L, "adapttoken", args, counter, vis_per_slice, cache_dir=cdir)
                size = sum(p.stat().st_size for p in cdir.rglob("*.safetensors"))
                results["disk_cache"] = {
                    "frames": L, "first_wall": a.wall, "second_wall": b.wall,
                    "second_decoded": b.decoded_frames, "second_encoded": b.encoded_slices,
                    "second_loaded": b.features.get("cache_loaded_slices", 0),
                    "second_cache_load_s": b.seconds.get("cache_load", 0.0), "bytes": size,
                    "first_seconds": a.seconds, "second_seconds": b.seconds}
                print(f"[bench gpu] disk cache {L}: {a.wall:.2f} s -> {b.wall:.2f} s "
                      f"(decoded {b.decoded_frames}, loaded {results['disk_cache']['second_loaded']})",
                      flush=True)
            finally:
                model.clear_cache()
                shutil.rmtree(cdir, ignore_errors=True)

    if layout is not None:
        distributed.shutdown()
        if not layout.is_main:
            return 0
    results["targets"] = targets(results)
    results["meta"]["total_seconds"] = time.perf_counter() - t_begin
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    md = markdown(results)
    (out / "README.md").write_text(md)
    try:
        plot(results, out / "bench_gpu.png")
    except Exception as e:  # noqa: BLE001 - the numbers matter more than the picture
        print(f"[bench gpu] plot failed: {type(e).__name__}: {e}", flush=True)
    print(md, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
