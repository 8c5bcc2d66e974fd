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
    "preview": "AdaptToken with Selection Preview and Key Moments: which frames and cells were kept, "
               "tokens over time, the budget of each group, and the frames the answer leans on.",
    "real": "AdaptToken with a real model: Qwen2.5-VL-7B-Instruct from models/LLM (download it with "
            "`python -m adapttoken download Qwen/Qwen2.5-VL-7B-Instruct models/LLM/Qwen2.5-VL-7B-Instruct`), "
            "4096 frames and FlexSelect's budget of 7040 tokens (the paper's setting). Pick your video "
            "in Load Video and type your question.",
    "compare": "AdaptToken against uniform frames on the same video, the same model and the same token "
               "budget, side by side: the upper row selects tokens with AdaptToken, the lower row takes "
               "evenly spaced frames.",
}
NOTE_TAIL = ("\n\nThe demo uses the bundled tiny model and sample video. For real videos put "
             "Qwen2.5-VL (e.g. Qwen2.5-VL-7B-Instruct) in models/LLM, pick it in Load MLLM, set "
             "budget to 7040 and choose your video (or type a path).")
STEP_NOTES = {
    "inputs": "**Inputs.** Load MLLM reads a model folder from models/LLM; Load Video only plans which "
              "frames to sample (nothing is decoded until the groups are processed).",
    "adapttoken": "**AdaptToken.** Group Split -> Attention Rank (which tokens the question looks at) "
                  "-> Entropy Score (how certain the answer is per group) -> Budget Allocate (more "
                  "tokens for confident groups, repeats dropped). Lazy: the work runs at Budget Allocate.",
    "lite": "**AdaptToken-Lite.** Early Stop between Entropy Score and Budget Allocate: groups run in "
            "order until one is confident; the rest are skipped.",
    "uniform": "**Baseline.** Uniform Frames takes evenly spaced frames at the same budget.",
    "answer": "**Answer.** MLLM Answer answers once from the kept tokens at their positions in the "
              "whole video; the answer streams onto the node.",
}
REAL_MODEL = "Qwen2.5-VL-7B-Instruct"
REAL_QUESTION = "What happens in this video?"

WIDGETS = {
    "AdaptToken_LoadMLLM": [BUNDLED_MODEL_NAME, "auto", "sdpa", True, "none"],
    "AdaptToken_LoadVideo": [SAMPLE_VIDEO_NAME, 1024, 0, 0, 0, 308 * 560, "", 24, "image"],
    "AdaptToken_GroupSplit": [64, "strided"],
    "AdaptToken_AttentionRank": [QUESTION, OPTIONS, -1, "max"],
    "AdaptToken_EntropyScore": ["auto", 1],
    "AdaptToken_EarlyStop": [0.2, 1, 2, True],
    "AdaptToken_BudgetAllocate": [BUDGET, "linear", 0.1, 0, 0.9],
    "AdaptToken_UniformFrames": [QUESTION, OPTIONS, BUDGET],
    "AdaptToken_MLLMAnswer": [64, False, 1.0, 1.0, 0, "fixed"],
    "AdaptToken_SelectionPreview": None,
    "AdaptToken_KeyMoments": [8],
}
SIZES = {"AdaptToken_LoadVideo": [300, 640], "AdaptToken_AttentionRank": [400, 330],
         "AdaptToken_UniformFrames": [400, 330], "AdaptToken_BudgetAllocate": [340, 480],
         "AdaptToken_MLLMAnswer": [360, 600], "AdaptToken_SelectionPreview": [720, 520],
         "AdaptToken_GroupSplit": [300, 110], "AdaptToken_EntropyScore": [300, 110],
         "AdaptToken_EarlyStop": [300, 110], "AdaptToken_KeyMoments": [360, 420]}


class Graph:
    def __init__(self):
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.groups: list[dict] = []

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

    def note(self, text: str, pos: tuple[int, int], size=(400, 200)) -> None:
        self.nodes.append({"id": len(self.nodes) + 1, "type": "MarkdownNote", "pos": list(pos),
                           "size": list(size), "flags": {}, "order": len(self.nodes), "mode": 0,
                           "inputs": [], "outputs": [], "properties": {}, "widgets_values": [text],
                           "color": "#432", "bgcolor": "#653"})

    def group(self, title: str, x: int, y: int, w: int, h: int, color: str) -> None:
        self.groups.append({"title": title, "bounding": [x, y, w, h], "color": color,
                            "font_size": 24, "flags": {}})

    def ui(self) -> dict:
        return {"last_node_id": len(self.nodes), "last_link_id": len(self.links), "nodes": self.nodes,
                "links": self.links, "groups": self.groups, "config": {},
                "extra": {"ds": {"scale": 0.6, "offset": [40, 40]}}, "version": 0.4}


# columns, left to right in data-flow order; every group's nodes start below its title bar (a
# group's title bar and a node's own title both sit above the node's position)
X_IN, X_SPLIT, X_RANK, X_SCORE, X_ALLOC, X_ANSWER = 40, 420, 780, 1240, 1600, 1980
Y0 = 100
TOP = 80                       # group top = node row - TOP
BLUE, GREEN, YELLOW = "#3f789e", "#3f8e57", "#b58b2a"


def _chain(g: Graph, model: dict, video: dict, y: int, lite: bool) -> dict:
    """Group Split -> Attention Rank -> Entropy Score [-> Early Stop] -> Budget Allocate at row y."""
    groups = g.add("AdaptToken_GroupSplit", (X_SPLIT, y))
    rank = g.add("AdaptToken_AttentionRank", (X_RANK, y))
    score = g.add("AdaptToken_EntropyScore", (X_SCORE, y))
    g.link(video, "video", groups, "video")
    g.link(model, "model", rank, "model")
    g.link(groups, "groups", rank, "groups")
    g.link(rank, "ranked", score, "ranked")
    if lite:
        stop = g.add("AdaptToken_EarlyStop", (X_SCORE, y + 170))
        g.link(score, "scored", stop, "scored")
        score = stop
    alloc = g.add("AdaptToken_BudgetAllocate", (X_ALLOC, y))
    g.link(score, "scored", alloc, "scored")
    return alloc


def build(kind: str) -> dict:
    g = Graph()
    model = g.add("AdaptToken_LoadMLLM", (X_IN, Y0))
    video = g.add("AdaptToken_LoadVideo", (X_IN, Y0 + 190))
    if kind == "real":
        model["widgets_values"][0] = REAL_MODEL
        video["widgets_values"][1] = 4096
    g.group("1. Inputs", X_IN - 20, Y0 - TOP, 340, TOP + 1140, BLUE)
    g.note(STEP_NOTES["inputs"], (X_IN, Y0 + 930), (300, 180))
    row_h = 540                                    # one method row: nodes, then its note
    answers = []
    if kind != "uniform":
        alloc = _chain(g, model, video, Y0, lite=(kind == "lite"))
        if kind == "real":
            alloc["widgets_values"][0] = 7040
            for n in g.nodes:
                if n["type"] == "AdaptToken_AttentionRank":
                    n["widgets_values"][0] = REAL_QUESTION
        answers.append((alloc, Y0))
        title = "2. AdaptToken-Lite" if kind == "lite" else (
            "2a. AdaptToken" if kind == "compare" else "2. AdaptToken")
        g.group(title, X_SPLIT - 20, Y0 - TOP, X_ANSWER - X_SPLIT - 20, TOP + row_h, GREEN)
        g.note(STEP_NOTES["lite" if kind == "lite" else "adapttoken"], (X_SPLIT, Y0 + 240),
               (320, 220))
    if kind in ("uniform", "compare"):
        y = Y0 if kind == "uniform" else Y0 + 680     # below the first answer and its timeline
        uni = g.add("AdaptToken_UniformFrames", (X_RANK, y))
        g.link(model, "model", uni, "model")
        g.link(video, "video", uni, "video")
        answers.append((uni, y))
        g.group("2. Baseline: uniform frames" if kind == "uniform" else "2b. Baseline: uniform frames",
                X_SPLIT - 20, y - TOP, X_ANSWER - X_SPLIT - 20, TOP + row_h, YELLOW)
        g.note(STEP_NOTES["uniform"], (X_SPLIT, y), (320, 160))
    for sel, y in answers:
        answer = g.add("AdaptToken_MLLMAnswer", (X_ANSWER, y))
        g.link(sel, "selection", answer, "selection")
    bottom = max(y for _, y in answers) + 630      # below the last MLLM Answer and its timeline
    width = 400
    if kind == "preview":
        preview = g.add("AdaptToken_SelectionPreview", (X_ANSWER + 400, Y0))
        g.link(answers[0][0], "selection", preview, "selection")
        moments = g.add("AdaptToken_KeyMoments", (X_ANSWER + 400, Y0 + 570))
        g.link(answers[0][0], "selection", moments, "selection")
        bottom, width = Y0 + 1020, 1160
    g.note(STEP_NOTES["answer"], (X_ANSWER, bottom), (360, 150))
    g.group("3. Answer", X_ANSWER - 20, Y0 - TOP, width, bottom + 170 - (Y0 - TOP), BLUE)
    about_y = Y0 + (1300 if kind == "compare" else 1140)      # below every group
    g.note(NOTE[kind] + ("" if kind == "real" else NOTE_TAIL), (X_IN, about_y), (700, 220))
    return g.ui()


FILES = {"adapttoken_full.json": "full", "adapttoken_lite.json": "lite",
         "uniform_frames_baseline.json": "uniform", "adapttoken_preview.json": "preview",
         "adapttoken_real_model.json": "real", "adapttoken_vs_uniform.json": "compare"}


def main() -> None:
    for name, kind in FILES.items():
        path = ROOT / "workflows" / name
        path.write_text(json.dumps(build(kind), indent=2) + "\n")
        print(f"wrote {path.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
