"""Decoder lane throughput: frames per second of the library's FrameDecoder handing over 4:2:0
planes, CPU lanes against NVDEC lanes (nvdec.py), alone and while the GPU multiplies bf16 matrices on
the default stream (the vision tower's place in the pipeline).

`python -m adapttoken bench decode --source-size 2160x3840 --frames 512 --lanes 4 8 12 --out OUT`
(generates the H.264 file like `bench gpu --source-size`; `--video PATH` reads an existing one).
Each case decodes every frame of the file once, split over the lanes as the pipeline splits a long
request (contiguous runs, one per lane), after one warm-up pass over the first frames.
"""
from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

import numpy as np
import torch


def _load(stop: threading.Event, done: list, device: torch.device) -> None:
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    n = 0
    while not stop.is_set():
        for _ in range(8):
            a @ a
        n += 8
        torch.cuda.synchronize(device)
    done.append(n)


def measure(path: str, lanes: int, hw: bool, load: bool, device: torch.device) -> dict:
    from ..decode import FrameDecoder, open_video
    video = open_video(path, num_frames=10 ** 9, max_pixels=None, backend="pyav")
    yuv = video.yuv420
    if yuv is None:
        raise SystemExit(f"{path}: not a 4:2:0 8-bit stream the lanes can hand over as planes")
    dec = FrameDecoder(video, lanes, pin=device.type == "cuda", yuv=yuv,
                       device=device if hw else None)
    n = video.num_frames
    stop, done = threading.Event(), []
    t = None
    try:
        warm = np.arange(min(n, 16 * lanes))
        dec.submit(warm).result()                   # readers open, NVDEC sessions start
        if load:
            t = threading.Thread(target=_load, args=(stop, done, device), daemon=True)
            t.start()
            time.sleep(0.5)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        busy0 = dec.busy_seconds
        t0 = time.perf_counter()
        out = dec.submit(np.arange(n)).result()
        if out.is_cuda:
            torch.cuda.synchronize(device)
        dt = time.perf_counter() - t0
        if device.type == "cuda":
            free, total = torch.cuda.mem_get_info(device)
            outside = (total - free - torch.cuda.memory_reserved(device)) / 2 ** 30
        else:
            outside = 0.0
    finally:
        stop.set()
        if t is not None:
            t.join()
        dec.close()
    return {"lanes": lanes, "decoder": "nvdec" if hw else "cpu", "gpu_load": load, "frames": n,
            "seconds": round(dt, 3), "fps": round(n / dt, 1),
            "lane_busy_s": round(dec.busy_seconds - busy0, 2), "outside_torch_gib": round(outside, 2),
            "load_matmuls": done[0] if done else None}


def main(argv=None) -> int:
    from .gpu import make_video, parse_size
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--video", default=None, help="an existing file (else one is generated)")
    ap.add_argument("--source-size", default="2160x3840", help="HxW of the generated file")
    ap.add_argument("--frames", type=int, default=512, help="frames of the generated file")
    ap.add_argument("--lanes", type=int, nargs="+", default=[8])
    ap.add_argument("--decoders", nargs="+", default=["cpu", "nvdec"], choices=["cpu", "nvdec"])
    ap.add_argument("--no-load", action="store_true", help="skip the cases with a GPU load")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        device = torch.device("cuda", torch.cuda.current_device())
    out = Path(args.out) if args.out else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    path = args.video
    made = None
    if path is None:
        work = out or Path("bench_decode_video")
        work.mkdir(parents=True, exist_ok=True)
        path = str(work / f"src_{args.source_size}_{args.frames}.mp4")
        if not Path(path).exists():
            made = make_video(Path(path), args.frames, parse_size(args.source_size))
            print(json.dumps(made), flush=True)
    if "nvdec" in args.decoders:
        from ..video import probe_video
        from ..nvdec import nvdec_available
        info = probe_video(path)
        if not nvdec_available(path, info.frame_index.stream_index, device):
            print("NVDEC is not available for this file here: CPU lanes only", flush=True)
            args.decoders = [d for d in args.decoders if d != "nvdec"]
    rows = []
    for load in ([False] if args.no_load or device.type != "cuda" else [False, True]):
        for lanes in args.lanes:
            for d in args.decoders:
                r = measure(path, lanes, d == "nvdec", load, device)
                rows.append(r)
                print(json.dumps(r), flush=True)
    if out:
        meta = {"video": made or {"path": path}, "torch": torch.__version__,
                "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"}
        try:
            import av
            meta["av"] = av.__version__
        except ImportError:
            pass
        (out / "results.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
        if made is not None and Path(path).parent == out:
            Path(path).unlink()                        # do not bring the file back
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
