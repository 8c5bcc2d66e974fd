"""Write the shipped UI-format workflows (workflows/*.json) from nodes/spec.py.

    python tests/make_workflows.py

The files are what the ComfyUI frontend saves (format version 0.4: nodes with socket inputs,
outputs with their links, widgets_values in the frontend's widget order, links as
[id, from_node, from_slot, to_node, to_slot, type]). They point at the bundled demo model and the
bundled sample video (copied into ComfyUI's input folder by the pack). tests/test_nodes_static.py
checks them against the spec; tests/comfy/ loads them in the real frontend and runs them.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes.spec import BUNDLED_MODEL_NAME, BY_ID, SAMPLE_VIDEO_NAME  # noqa: E402

SAMPLE = json.loads((ROOT / "adapttoken" / "assets" / "sample.json").read_text())
# The open form of the sample's question: type options (one per line) for multiple choice.
OPEN = next(q for q in SAMPLE["questions"] if not q["options"])
QUESTION, OPTIONS = OPEN["text"], ""
BUDGET = 1024   # the sample: 480 slices of 4x4 tokens; a 7B model on real video: 7040

NOTE = {
    "full": "AdaptToken: each group of frames is ranked by the question's attention and scored by "
            "how certain the answer is (entropy); Budget Allocate gives confident groups more tokens.",
    "lite": "AdaptToken-Lite: the same graph plus Early Stop. Groups are processed in order and the "
            "run stops once the model is certain: the remaining groups are never encoded or run.",
    "uniform": "Baseline: evenly spaced frames that fit the same token budget, no selection.",
    "preview": "AdaptToken with Selection Preview: which frames and cells were kept, tokens over time, "
               "and the budget of each group.",
}
NOTE_TAIL = ("\n\nThe demo uses the bundled tiny model and sample video. For real videos put "
             "Qwen2.5-VL (e.g. Qwen2.5-VL-7B-Instruct) in models/LLM, pick it in Load MLLM, set "
             "budget to 7040 and choose your video (or type a path).")

WIDGETS = {
    "AdaptToken_LoadMLLM": [BUNDLED_MODEL_NAME, "auto", "sdpa", True],
    "AdaptToken_LoadVideo": [SAMPLE_VIDEO_NAME, 1024, 0, 0, 0, 308 * 560, "", 24, "image"],
    "AdaptToken_GroupSplit": [64, "strided"],
    "AdaptToken_AttentionRank": [QUESTION, OPTIONS, -1, "max"],
    "AdaptToken_EntropyScore": ["auto", 1],
    "AdaptToken_EarlyStop": [0.2, 1],
    "AdaptToken_BudgetAllocate": [BUDGET, "linear", 0.1, 0, 0.9],
    "AdaptToken_UniformFrames": [QUESTION, OPTIONS, BUDGET],
    "AdaptToken_MLLMAnswer": [64, False, 1.0, 1.0, 0, "fixed"],
    "AdaptToken_SelectionPreview": None,
}
SIZES = {"AdaptToken_LoadVideo": [300, 640], "AdaptToken_AttentionRank": [400, 330],
         "AdaptToken_UniformFrames": [400, 330], "AdaptToken_BudgetAllocate": [320, 330],
         "AdaptToken_MLLMAnswer": [360, 420], "AdaptToken_SelectionPreview": [720, 520],
         "AdaptToken_GroupSplit": [300, 110], "AdaptToken_EntropyScore": [300, 110],
         "AdaptToken_EarlyStop": [300, 110]}


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []

    def add(self, type_: str, pos: tuple[int, int]) -> dict:
        s = BY_ID[type_]
        node = {"id": len(self.nodes) + 1, "type": type_, "pos": list(pos),
                "size": SIZES.get(type_, [300, 130]), "flags": {}, "order": len(self.nodes), "mode": 0,
                "inputs": [{"name": i.name, "type": i.type, "link": None}
                           for i in s.inputs if not i.is_widget],
                "outputs": [{"name": o.name, "type": o.type, "links": [], "slot_index": k}
                            for k, o in enumerate(s.outputs)],
                "properties": {"Node name for S&R": type_}}
        if WIDGETS[type_] is not None:
            node["widgets_values"] = list(WIDGETS[type_])
        self.nodes.append(node)
        return node

    def link(self, src: dict, out_name: str, dst: dict, in_name: str) -> None:
        o = next(k for k, x in enumerate(src["outputs"]) if x["name"] == out_name)
        i = next(k for k, x in enumerate(dst["inputs"]) if x["name"] == in_name)
        lid = len(self.links) + 1
        typ = src["outputs"][o]["type"]
        self.links.append([lid, src["id"], o, dst["id"], i, typ])
        src["outputs"][o]["links"].append(lid)
        dst["inputs"][i]["link"] = lid

    def note(self, text: str, pos: tuple[int, int]) -> None:
        self.nodes.append({"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": list(pos),
                           "size": [400, 200], "flags": {}, "order": len(self.nodes), "mode": 0,
                           "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                           "color": "#432", "bgcolor": "#653"})

    def ui(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": [], "config": {},
                "extra": {"ds": {"scale": 0.8, "offset": [40, 40]}}, "version": 0.4}


def build(kind: str) -> dict:
    g = Graph()
    model = g.add("AdaptToken_LoadMLLM", (40, 40))
    video = g.add("AdaptToken_LoadVideo", (40, 230))
    if kind == "uniform":
        uni = g.add("AdaptToken_UniformFrames", (380, 40))
        g.link(model, "model", uni, "model")
        g.link(video, "video", uni, "video")
        selection = uni
        answer_pos, note_pos = (820, 40), (380, 420)
    else:
        groups = g.add("AdaptToken_GroupSplit", (380, 420))
        rank = g.add("AdaptToken_AttentionRank", (380, 40))
        score = g.add("AdaptToken_EntropyScore", (820, 40))
        g.link(video, "video", groups, "video")
        g.link(model, "model", rank, "model")
        g.link(groups, "groups", rank, "groups")
        g.link(rank, "ranked", score, "ranked")
        if kind == "lite":
            stop = g.add("AdaptToken_EarlyStop", (820, 200))
            g.link(score, "scored", stop, "scored")
            score = stop
        selection = g.add("AdaptToken_BudgetAllocate", (1160, 40))
        g.link(score, "scored", selection, "scored")
        answer_pos, note_pos = (1520, 40), (380, 580)
    answer = g.add("AdaptToken_MLLMAnswer", answer_pos)
    g.link(selection, "selection", answer, "selection")
    if kind == "preview":
        preview = g.add("AdaptToken_SelectionPreview", (1160, 540))
        g.link(selection, "selection", preview, "selection")
    g.note(NOTE[kind] + NOTE_TAIL, note_pos)
    return g.ui()


FILES = {"adapttoken_full.json": "full", "adapttoken_lite.json": "lite",
         "uniform_frames_baseline.json": "uniform", "adapttoken_preview.json": "preview"}


def main() -> None:
    for name, kind in FILES.items():
        path = ROOT / "workflows" / name
        path.write_text(json.dumps(build(kind), indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
