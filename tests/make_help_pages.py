"""Write the node help pages (web/js/docs/<node id>.md, served by ComfyUI for the frontend's node
help) from nodes/spec.py plus one paragraph per node on where it fits:

    python tests/make_help_pages.py

tests/test_nodes_static.py checks that every page names each input and output of its node."""
from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes import spec  # noqa: E402

FIT = {
    "AdaptToken_LoadMLLM": "Start of every AdaptToken graph. Its model goes to Attention Rank and Uniform Frames. Put model folders (config.json, .safetensors, tokenizer files) in `models/LLM`; the bundled tiny model answers only the synthetic videos it was trained on. For a card too small for bf16 weights, set `quantization` to nf4 (bitsandbytes 4-bit: Qwen2.5-VL-7B in about 6.5 GiB of weights) or int8; on a GPU with FP8 (H100/H200, L4/L40, RTX 40xx) `fp8` runs the language model's and the vision tower's matmuls in float8 for speed (about 15% faster at 4096 frames on an H200). A quantized model stays on the GPU (ComfyUI cannot move bitsandbytes weights): unloading it frees its video caches, not its weights.",
    "AdaptToken_LoadVideo": "Decodes nothing: it plans which frames to sample. Connect its video to Group Split (AdaptToken) or Uniform Frames (baseline). A connected IMAGE batch or core VIDEO wins over `path`, and `path` over the list. A core VIDEO trimmed in the UI is sampled inside its trim window (start/end count from the clip's start).",
    "AdaptToken_GroupSplit": "Between Load Video and Attention Rank. Groups of 64 two-frame slices are FlexSelect's setting; strided groups each see the whole video, so every group can find the evidence.",
    "AdaptToken_AttentionRank": "Lazy: the group passes run when Budget Allocate asks for them. Options: one per line (letters A, B, C... are added); leave empty for an open question.",
    "AdaptToken_EntropyScore": "After Attention Rank. Connect it to Budget Allocate for AdaptToken, or to Early Stop first for AdaptToken-Lite.",
    "AdaptToken_EarlyStop": "AdaptToken-Lite: between Entropy Score and Budget Allocate. Groups are processed in order; once one is confident (entropy / max below the threshold) the rest are never encoded or run.",
    "AdaptToken_BudgetAllocate": "Runs the group passes (progress on the node; Cancel stops within one pass), then splits the budget. Its summary lists each group's entropy, budget and kept tokens. Changing only the budget re-runs only this node and the answer.",
    "AdaptToken_UniformFrames": "The baseline to compare with: evenly spaced frames, all their tokens, at the same budget. Connect its selection to MLLM Answer.",
    "AdaptToken_MLLMAnswer": "The end of the graph: the answer streams onto the node. option_probs is JSON ({\"A\": 0.9, ...}) for multiple choice; report is the whole result as JSON.",
    "AdaptToken_SelectionPreview": "Connect any selection to see what the answer pass sees.",
    "AdaptToken_KeyMoments": "Connect a selection (from Budget Allocate) to get the frames the answer leans on, e.g. for Save Image or a video editor. `moments` is JSON: `time` in seconds, `frame` in the source video, `group`, `score`, `tokens`.",
    "AdaptToken_AskMany": "Takes the model and Group Split's groups, like Attention Rank, and replaces Attention Rank to MLLM Answer for a list of questions. Syntax of `questions`: one question per block, blocks separated by a blank line (or a line `---`); the lines after a question are its options (an `A.` / `B)` / `(C)` letter is optional); a block of one line is an open question; lines starting with `#` are comments. The table ends with the later questions' mean time against the first.",
}


def fmt(v) -> str:
    if isinstance(v, str):
        return f"`{v}`" if v else "empty"
    return "-" if v is None else f"`{v}`"


def page(s: spec.NodeSpec) -> str:
    lines = [f"# {s.display_name}", "", s.description, "", FIT[s.id], "", "## Inputs", "",
             "| input | type | default | what it does |", "| --- | --- | --- | --- |"]
    for i in s.inputs:
        d = "-" if not i.is_widget else fmt(i.default)
        lines.append(f"| `{i.name}` | {i.type}{' (optional)' if i.optional else ''} | {d} | {i.tooltip} |")
    lines += ["", "## Outputs", "", "| output | type | what it is |", "| --- | --- | --- |"]
    lines += [f"| `{o.name}` | {o.type} | {o.tooltip or '-'} |" for o in s.outputs]
    lines += ["", "More: the AdaptToken README (nodes, workflows) and docs/DESIGN.md.", ""]
    return "\n".join(lines)


def main() -> None:
    out = ROOT / "web" / "js" / "docs"
    out.mkdir(parents=True, exist_ok=True)
    for s in spec.SPECS:
        (out / f"{s.id}.md").write_text(page(s), encoding="utf-8")
        print(f"wrote {(out / f'{s.id}.md').relative_to(ROOT)}")


if __name__ == "__main__":
    main()
