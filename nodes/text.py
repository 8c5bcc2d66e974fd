"""Text in and out of the nodes, free of ComfyUI (tested anywhere): answer options typed one per
line, and the per-group summary Budget Allocate shows."""
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
