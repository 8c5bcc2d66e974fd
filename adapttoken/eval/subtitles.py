"""Subtitles (optional, off by default: the paper's setting is video only).

VideoMME: `.srt`; only the text inside `<font color="white" size=".72c">...</font>` is kept when
that wrapper is present. LongVideoBench: JSON in two shapes, `{"timestamp": [s, e], "text"}` (a
non-numeric end means the video's end) or `{"start": "HH:MM:SS.mmm", "end", "line"}`, in the
source video's clock: `starting_timestamp_for_subtitles` is subtracted. A line is kept when its
interval covers one of the sampled frames' times (lmms-eval's rule for VideoMME), in time order.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

_FONT = re.compile(r'<font color="white" size=".72c">(.*?)</font>', re.S)


def _hms(s: str) -> float:
    s = s.strip().replace(",", ".")
    parts = [float(p) for p in s.split(":")]
    t = 0.0
    for p in parts:
        t = t * 60 + p
    return t


def read_srt(path) -> list[tuple[float, float, str]]:
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    out = []
    for block in re.split(r"\n\s*\n", text.replace("\r\n", "\n")):
        lines = [l for l in block.strip().split("\n") if l.strip()]
        i = next((k for k, l in enumerate(lines) if "-->" in l), None)
        if i is None:
            continue
        a, b = lines[i].split("-->")
        body = "\n".join(lines[i + 1:])
        m = _FONT.findall(body)
        body = " ".join(x.strip() for x in m) if m else re.sub(r"<[^>]+>", "", body).strip()
        if body:
            out.append((_hms(a), _hms(b.split()[0]), body))
    return out


def read_lvb_json(path, offset: float = 0.0, duration: float | None = None) -> list[tuple[float, float, str]]:
    out = []
    for r in json.loads(Path(path).read_text(encoding="utf-8")):
        if "timestamp" in r:
            s, e = r["timestamp"]
            try:
                e = float(e)
            except (TypeError, ValueError):
                e = (duration if duration is not None else 1e12) + offset
            s, text = float(s), r.get("text", "")
        else:
            s, e, text = _hms(r["start"]), _hms(r["end"]), r.get("line", "")
        if str(text).strip():
            out.append((s - offset, e - offset, str(text).strip()))
    return out


def read_subtitles(path, offset: float = 0.0, duration: float | None = None):
    return read_srt(path) if str(path).lower().endswith(".srt") else read_lvb_json(path, offset, duration)


def subtitles_at(lines, timestamps) -> list[str]:
    """The lines whose [start, end] covers one of the sampled times, in time order, once each."""
    ts = sorted(float(t) for t in timestamps)
    import bisect
    keep = []
    for s, e, text in sorted(lines):
        k = bisect.bisect_left(ts, s)
        if k < len(ts) and ts[k] <= e:
            keep.append(text)
    return keep
