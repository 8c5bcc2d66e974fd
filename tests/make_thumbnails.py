"""Template thumbnails (workflows/<stem>.jpg, shown by ComfyUI's template browser) and the docs'
screenshots (docs/screenshots/<stem>.jpg) from the browser tests' screenshots:

    COMFYUI_DIR=<ComfyUI> pytest tests/comfy/test_nodes_server.py -k "queued_from_the_page or real_model"
    python tests/make_thumbnails.py

Each runnable workflow is shown after its run in the real frontend (tests/_artifacts/comfy/queued/
<stem>.after.png); the real-model workflow, which needs Qwen2.5-VL-7B, as loaded
(tests/_artifacts/comfy/<stem>.png)."""
from __future__ import annotations

import sys
from pathlib import Path

from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
ART = ROOT / "tests" / "_artifacts" / "comfy"


def main() -> int:
    (ROOT / "docs" / "screenshots").mkdir(parents=True, exist_ok=True)
    missing = []
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        stem = wf.stem
        src = ART / "queued" / f"{stem}.after.png"
        if not src.is_file():
            src = ART / f"{stem}.png"
        if not src.is_file():
            missing.append(stem)
            continue
        img = Image.open(src).convert("RGB")
        img.save(ROOT / "docs" / "screenshots" / f"{stem}.jpg", quality=80, optimize=True)
        thumb = img.copy()
        thumb.thumbnail((640, 400))
        thumb.save(wf.with_suffix(".jpg"), quality=85, optimize=True)
        print(f"{stem}: {src.relative_to(ROOT)}")
    if missing:
        print(f"no screenshot for {', '.join(missing)}: run the browser tests first", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
