"""Text and small rules of the nodes, free of ComfyUI (tested anywhere): answer options typed one
per line, the per-group summary Budget Allocate shows, a core VIDEO's trim window as a sampling
range."""
from __future__ import annotations

import re

_LETTERED = re.compile(r"^\(?([A-Z])[.):]\s+(.*)$")


def parse_options(text: str) -> tuple[str, ...]:
    """One option per non-empty line; a pasted "A. ..." / "(B) ..." letter prefix is dropped."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    m = [_LETTERED.match(ln) for ln in lines]
    if lines and all(m) and [x.group(1) for x in m] == [chr(65 + i) for i in range(len(m))]:
        return tuple(x.group(2).strip() for x in m)
    return tuple(lines)


def summary(sel) -> str:
    """A Selection as text: per processed group the frames it saw, H/Hmax, relevance, budget and
    kept tokens; then the groups Lite skipped."""
    lines = [f"{sel.method}: {len(sel.gids)} tokens kept of budget {sel.budget}, "
             f"{sel.redundant_dropped} dropped as redundant"]
    size, asked = getattr(sel, "group_size", None), getattr(sel, "requested_group_size", None)
    if size is not None:
        n = len(sel.groups)
        lines.append(f"{n} group{'s' if n != 1 else ''} of <= {size} slices"
                     + (f" (group_size={asked} clamped to the video's slices)"
                        if asked is not None and asked != size else ""))
    lines.append("group  frames  H/Hmax  relevance  budget  kept")
    for g in sel.groups:
        if g.entropy is None:
            continue
        lines.append(f"{g.group:>5}  {len(g.frame_indices):>6}  {g.entropy_norm:>6.3f}  "
                     f"{g.relevance:>9.3f}  {g.budget:>6}  {g.kept:>4}")
    if sel.skipped_groups:
        lines.append(f"skipped by Early Stop (never encoded or run): groups {sel.skipped_groups}")
    return "\n".join(lines)


def trimmed_sampling(sampling: dict, window: tuple[float, float]) -> dict:
    """Load Video's sampling range moved into a core VIDEO's trim window (start, duration in
    seconds; duration 0 = to the end): the start/end typed on Load Video count from the start of
    the trimmed clip, and never reach past its end."""
    t0, dur = float(window[0] or 0.0), float(window[1] or 0.0)
    if t0 <= 0 and dur <= 0:
        return sampling
    out = dict(sampling)
    out["start"] = t0 + float(sampling.get("start") or 0.0)
    end = sampling.get("end")
    stop = t0 + dur if dur > 0 else None
    if end:
        out["end"] = t0 + float(end) if stop is None else min(stop, t0 + float(end))
    else:
        out["end"] = stop
    return out


def parse_question_list(text: str) -> list[tuple[str, tuple[str, ...]]]:
    """The Ask Many node's question list, as plain text:

        What colour is the car?
        A. red
        B. blue

        How many people cross the street?

    Questions are separated by a blank line (or a line `---`). In each block the first line is the
    question and every further line one answer option (a typed "A." / "B)" / "(C)" letter is
    dropped, as in the options box); a block of one line is an open question. Lines starting with
    `#` are comments. Returns [(question, options)] in order."""
    blocks, cur = [], []
    for raw in (text or "").splitlines():
        line = raw.strip()
        if line.startswith("#"):
            continue
        if not line or line == "---":
            if cur:
                blocks.append(cur)
            cur = []
            continue
        cur.append(line)
    if cur:
        blocks.append(cur)
    return [(b[0], parse_options("\n".join(b[1:]))) for b in blocks]


def images_fps_of(video_info, typed: float) -> float:
    """The frame rate of an IMAGE batch: VideoHelperSuite's video info (its `loaded_fps`, the rate
    of the frames it returned after any select_every_nth / force_rate) when connected and valid,
    else the rate typed on Load Video."""
    try:
        fps = float((video_info or {}).get("loaded_fps") or 0)
    except (TypeError, ValueError, AttributeError):
        fps = 0.0
    return fps if fps > 0 and fps == fps and fps != float("inf") else float(typed)
