"""Peak host memory (RSS) of `ask` against the number of sampled frames, on a high-resolution clip.

    python -m adapttoken bench rss                       # 2160x3840 (vertical 4K) H.264, 40 s, 30 fps
    python -m adapttoken bench rss --frames 256 1024 --backends decord pyav
    python -m adapttoken bench rss --pix-fmt yuv420p10le --width 1920 --height 1080
    python -m adapttoken bench rss --seconds 300 --frames 1024 4096 --backends pyav

Writes (once, then reuses) a real H.264 clip of the asked size with PyAV (libx264, no ffmpeg binary
needed): a moving gradient, a moving box and a fixed noise texture, so frames differ and the
encoder has real work. Then, per backend and frame count, runs
`python -m adapttoken ask CLIP ... --frames N --device cpu --backend B` with the bundled tiny model in
a fresh process, and reads the child's peak resident set size from the kernel (wait4's ru_maxrss: the
high-water mark of that one process, threads included). The ratio of the peaks at the largest and the
smallest frame count says whether memory grows with the number of sampled frames; a process that
holds only bounded buffers stays near 1.0.

Prints a table and one JSON line per run; --out FILE also writes the rows as JSON.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import tempfile
import threading
import time
from fractions import Fraction
from pathlib import Path

import numpy as np

PIX_FMTS = ("yuv420p", "yuv420p10le")
BACKENDS = ("decord", "pyav", "auto")


def default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    if not os.access(os.path.dirname(base) if not os.path.exists(base) else base, os.W_OK):
        base = tempfile.gettempdir()
    return Path(base) / "adapttoken" / "bench_rss"


def clip_name(width: int, height: int, seconds: float, fps: int, pix_fmt: str, codec: str,
              gop: int, rotation: int) -> str:
    rot = f"_rot{rotation}" if rotation else ""
    return f"clip_{width}x{height}_{seconds:g}s_{fps}fps_{pix_fmt}_{codec}_g{gop}{rot}.mp4"


def _planes(width: int, height: int, ten_bit: bool):
    """Precomputed pieces the frames are cut from (rolling views are cheap, drawing is not)."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    # a diagonal gradient twice as wide as the picture, so it can scroll
    grad = ((xx + yy) / (width + height) * 160 + 40).astype(np.float32)
    noise = rng.normal(0, 6, (height, width)).astype(np.float32)
    luma = np.clip(grad + noise, 0, 255)
    cw, ch = width // 2, height // 2
    u = (128 + 60 * np.sin(np.linspace(0, 6.28, cw, dtype=np.float32)))[None, :].repeat(ch, 0)
    v = (128 + 60 * np.cos(np.linspace(0, 6.28, ch, dtype=np.float32)))[:, None].repeat(cw, 1)
    if ten_bit:
        return (luma * 4).astype(np.uint16), (u * 4).astype(np.uint16), (v * 4).astype(np.uint16)
    return luma.astype(np.uint8), u.astype(np.uint8), v.astype(np.uint8)


def write_clip(path: str | os.PathLike, width: int = 2160, height: int = 3840, seconds: float = 40.0,
               fps: int = 30, pix_fmt: str = "yuv420p", codec: str = "h264", gop: int = 30,
               rotation: int = 0, verbose: bool = True) -> str:
    """Encode a synthetic clip (stored size width x height; with `rotation`, the upright picture is
    that size and the file stores it turned, with rotation metadata, as phones do)."""
    import av
    path = os.fspath(path)
    if pix_fmt not in PIX_FMTS:
        raise ValueError(f"pix_fmt must be one of {PIX_FMTS}")
    if width % 2 or height % 2:
        raise ValueError("width and height must be even (4:2:0)")
    sw, sh = (height, width) if rotation % 180 else (width, height)
    n = int(round(seconds * fps))
    ten = pix_fmt == "yuv420p10le"
    luma, u, v = _planes(sw, sh, ten)
    hi = 1023 if ten else 255
    tmp = path + ".part"
    t0 = time.perf_counter()
    container = av.open(tmp, "w", format="mp4")
    try:
        name = "libx264" if codec in ("h264", "libx264") else codec
        stream = container.add_stream(name, rate=fps, options={"preset": "ultrafast", "crf": "28"})
        stream.width, stream.height, stream.pix_fmt = sw, sh, pix_fmt
        stream.codec_context.gop_size = gop
        stream.codec_context.thread_count = 0
        if rotation:
            stream.set_display_rotation(-rotation)      # PyAV takes counter-clockwise degrees
        bw, bh = max(16, sw // 6), max(16, sh // 8)
        for i in range(n):
            dx = (i * 7) % sw
            y = np.roll(luma, dx, axis=1)
            x0 = (i * 11) % max(1, sw - bw)
            y0 = (i * 5) % max(1, sh - bh)
            y[y0:y0 + bh, x0:x0 + bw] = hi - (i * 3) % (hi // 2)
            frame = av.VideoFrame(sw, sh, pix_fmt)
            for plane, arr in zip(frame.planes, (y, np.roll(u, dx // 2, axis=1), v)):
                ls = plane.line_size // arr.itemsize
                buf = np.frombuffer(plane, dtype=arr.dtype).reshape(-1, ls)
                buf[:arr.shape[0], :arr.shape[1]] = arr
            frame.pts = i
            frame.time_base = Fraction(1, fps)
            for packet in stream.encode(frame):
                container.mux(packet)
            if verbose and i and i % (fps * 10) == 0:
                print(f"  encoded {i}/{n} frames ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
        for packet in stream.encode():
            container.mux(packet)
    finally:
        container.close()
    os.replace(tmp, path)
    if verbose:
        print(f"  wrote {path} ({os.path.getsize(path) / 2**20:.0f} MiB, {n} frames, "
              f"{time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    return path


def _vm(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    k, v = line.split(":")
                    out[k] = int(v.split()[0]) * 1024
    except OSError:
        pass
    return out


def run_once(clip: str, frames: int, backend: str, question: str, extra: list[str],
             env: dict | None = None, timeline: bool = False) -> dict:
    """One `ask` in a fresh process; peak RSS in bytes from wait4 (and /proc sampling)."""
    cmd = [sys.executable, "-m", "adapttoken", "ask", clip, question, "--frames", str(frames),
           "--device", "cpu", "--json", "--backend", backend, *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    samples: list[tuple[float, int]] = []
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            vm = _vm(proc.pid)
            if "VmRSS" in vm:
                samples.append((round(time.perf_counter() - t0, 2), vm["VmRSS"]))
            stop.wait(0.25)

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    out_chunks, err_chunks = [], []
    readers = [threading.Thread(target=lambda s, acc: acc.append(s.read()), args=(s, acc), daemon=True)
               for s, acc in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))]
    for r in readers:
        r.start()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    stop.set()
    for r in readers + [th]:
        r.join()
    wall = time.perf_counter() - t0
    stdout, stderr = "".join(out_chunks), "".join(err_chunks)
    row = {"backend": backend, "frames": frames, "peak_rss_bytes": usage.ru_maxrss * 1024,
           "peak_rss_sampled_bytes": max((s[1] for s in samples), default=0),
           "wall_s": round(wall, 1), "rc": proc.returncode,
           # as one would type it (no interpreter or cache paths in the written rows)
           "command": shlex.join(["python", *cmd[1:4], os.path.basename(clip), *cmd[5:]])}
    if proc.returncode == 0:
        try:
            res = json.loads(stdout.strip().splitlines()[-1])
            row["decoded_frames"] = res.get("decoded_frames")
            row["seconds"] = res.get("seconds")
        except (ValueError, IndexError):
            pass
    else:
        row["error"] = (stderr.strip().splitlines() or ["?"])[-1][:300]
    if timeline:
        row["timeline"] = samples
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapttoken bench rss", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--width", type=int, default=2160, help="upright width (default 2160)")
    ap.add_argument("--height", type=int, default=3840, help="upright height (default 3840)")
    ap.add_argument("--seconds", type=float, default=40.0)
    ap.add_argument("--fps", type=int, default=30)
    ap.add_argument("--pix-fmt", choices=PIX_FMTS, default="yuv420p")
    ap.add_argument("--codec", choices=["h264"], default="h264")
    ap.add_argument("--gop", type=int, default=30, help="keyframe interval in frames (default 30)")
    ap.add_argument("--rotation", type=int, choices=[0, 90, 180, 270], default=0,
                    help="store the picture turned, with rotation metadata (a phone's portrait: 90)")
    ap.add_argument("--frames", type=int, nargs="+", default=[256, 1024],
                    help="sampled frame counts (default 256 1024)")
    ap.add_argument("--backends", nargs="+", choices=BACKENDS, default=["decord", "pyav"])
    ap.add_argument("--clip", default=None, help="use this video file instead of generating one")
    ap.add_argument("--cache", default=None, help="folder for the generated clip "
                                                 "(default: $XDG_CACHE_HOME/adapttoken/bench_rss)")
    ap.add_argument("--question", default="What moves across the picture?")
    ap.add_argument("--timeline", action="store_true", help="keep RSS samples (4 per second)")
    ap.add_argument("--out", default=None, help="write the rows as JSON to this file")
    ap.add_argument("ask_args", nargs="*", help="more `ask` options after --, e.g. -- --lite")
    args = ap.parse_args(argv)

    clip = args.clip
    if clip is None:
        cache = Path(args.cache) if args.cache else default_cache()
        cache.mkdir(parents=True, exist_ok=True)
        clip = str(cache / clip_name(args.width, args.height, args.seconds, args.fps, args.pix_fmt,
                                     args.codec, args.gop, args.rotation))
        if not os.path.exists(clip):
            print(f"generating {clip}", file=sys.stderr)
            write_clip(clip, args.width, args.height, args.seconds, args.fps, args.pix_fmt,
                       args.codec, args.gop, args.rotation)
    rows = []
    for backend in args.backends:
        for n in args.frames:
            row = run_once(clip, n, backend, args.question, args.ask_args, timeline=args.timeline)
            row["clip"] = os.path.basename(clip)
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "timeline"}), flush=True)
    print(f"\nclip: {clip}")
    print(f"{'backend':8s} {'frames':>7s} {'peak RSS':>10s} {'ratio':>7s} {'wall s':>7s}  status")
    for backend in args.backends:
        mine = [r for r in rows if r["backend"] == backend]
        base = next((r["peak_rss_bytes"] for r in mine if r["rc"] == 0), None)
        for r in mine:
            ratio = f"{r['peak_rss_bytes'] / base:.2f}" if base and r["rc"] == 0 else "-"
            status = "ok" if r["rc"] == 0 else f"rc={r['rc']}: {r.get('error', '')}"
            print(f"{backend:8s} {r['frames']:7d} {r['peak_rss_bytes'] / 2**30:8.2f} GiB {ratio:>7s} "
                  f"{r['wall_s']:7.1f}  {status}")
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    return 0 if all(r["rc"] == 0 for r in rows) else 1
