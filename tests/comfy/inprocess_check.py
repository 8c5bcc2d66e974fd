"""The pack's nodes called in-process inside ComfyUI's memory manager, on the GPU when there is one:
where the weights and the cached video features live before and after ComfyUI unloads the model.

    COMFYUI_DIR=<ComfyUI> python tests/comfy/inprocess_check.py [--model DIR] [--video FILE]

Run by tests/comfy/test_runtime_inprocess.py (a subprocess: ComfyUI's modules, e.g. its top-level
`nodes`, stay out of the test process). Prints one JSON line of facts; exits non-zero on a failed
check. Defaults: the bundled demo model and sample video.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "adapttoken" / "assets" / "adapttoken-tiny-synth"))
    ap.add_argument("--video", default=str(REPO / "adapttoken" / "assets" / "sample.mp4"))
    ap.add_argument("--frames", type=int, default=256)
    a = ap.parse_args()

    from inprocess_pack import load_pack
    mm, classes = load_pack(Path(a.model), with_core_nodes=True)
    import torch
    from adapttoken_pack.nodes import runtime

    asked: list[tuple[str, int]] = []          # (node, memory_required) of each load_models_gpu
    current = {"node": ""}
    load_models_gpu = mm.load_models_gpu

    def recording_load_models_gpu(models, memory_required=0, *args, **kwargs):
        asked.append((current["node"], memory_required))
        return load_models_gpu(models, memory_required, *args, **kwargs)

    mm.load_models_gpu = recording_load_models_gpu     # calls through: ComfyUI does the work

    def run(node_id, **kw):
        current["node"] = node_id
        cls = classes[node_id].PREPARE_CLASS_CLONE({})
        return cls.execute(**kw).result

    facts, fail = {"device": str(mm.get_torch_device())}, []
    name = Path(a.model).name
    if name == "adapttoken-tiny-synth":
        name = "adapttoken-tiny-synth (bundled)"
    with torch.inference_mode():
        (model,) = run("AdaptToken_LoadMLLM", model=name, dtype="auto", attention="sdpa",
                       keep_loaded=True)
        hf = model.adapter.model
        facts["loaded_on"] = str(next(hf.parameters()).device)
        video = run("AdaptToken_LoadVideo", video="", path=a.video, num_frames=a.frames, max_fps=0.0,
                    start=0.0, end=0.0, max_pixels=308 * 560)[0]
        (groups,) = run("AdaptToken_GroupSplit", video=video, group_size=16, layout="strided")
        (ranked,) = run("AdaptToken_AttentionRank", model=model, groups=groups,
                        question="What coloured object appeared in the video?",
                        options="blue square\ngreen square\nyellow cross\nblue cross", layer=-1,
                        aggregation="max")
        (scored,) = run("AdaptToken_EntropyScore", ranked=ranked, mode="auto", tokens=1)
        sel, summary = run("AdaptToken_BudgetAllocate", scored=scored, budget=256, relevance="linear",
                           tau=0.1, floor=0, redundancy_threshold=0.9)
        dev = mm.get_torch_device()
        facts["weights_during_run"] = str(next(hf.parameters()).device)
        buffers = {str(b.device) for b in hf.buffers()}
        facts["buffers_during_run"] = sorted(buffers)
        if any(torch.device(d).type != dev.type for d in buffers):
            fail.append(f"buffers not on {dev}: {buffers}")
        answer, probs, report = run("AdaptToken_MLLMAnswer", selection=sel, max_new_tokens=8,
                                    do_sample=False, temperature=1.0, top_p=1.0, seed=0)
        facts["answer"] = answer
        mm.interrupt_current_processing(True)       # Cancel pressed: the answer must not run
        try:
            run("AdaptToken_MLLMAnswer", selection=sel, max_new_tokens=8, do_sample=False,
                temperature=1.0, top_p=1.0, seed=1)
            fail.append("MLLM Answer ran although Cancel was pressed")
        except mm.InterruptProcessingException:
            facts["cancel"] = "InterruptProcessingException"
        if mm.processing_interrupted():
            fail.append("the interrupt flag was left set after the cancel")
            mm.interrupt_current_processing(False)
        facts["features_cached"] = len(model._features)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            facts["cuda_allocated_before_unload_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
    mm.unload_all_models()                  # what /free and "Unload models" do (outside inference mode)
    mm.soft_empty_cache()
    facts["weights_after_unload"] = str(next(hf.parameters()).device)
    facts["features_after_unload"] = len(model._features)
    if model._features:
        fail.append("feature cache kept after the model was unloaded")
    if dev.type == "cuda":
        facts["cuda_allocated_after_unload_mb"] = round(torch.cuda.memory_allocated() / 2**20, 1)
        if next(hf.parameters()).device.type == "cuda":
            fail.append("weights still on the GPU after unload")
    with torch.inference_mode():               # and it comes back for the next prompt
        (ranked2,) = run("AdaptToken_AttentionRank", model=model, groups=groups, question="Which colour?",
                         options="", layer=-1, aggregation="max")
        (scored2,) = run("AdaptToken_EntropyScore", ranked=ranked2, mode="auto", tokens=1)
        sel2, _ = run("AdaptToken_BudgetAllocate", scored=scored2, budget=256, relevance="linear",
                      tau=0.1, floor=0, redundancy_threshold=0.9)
        facts["weights_after_reload"] = str(next(hf.parameters()).device)
        model.keep_loaded = False            # keep_loaded off: offloaded right after the answer
        run("AdaptToken_MLLMAnswer", selection=sel2, max_new_tokens=4, do_sample=False,
            temperature=1.0, top_p=1.0, seed=0)
    facts["weights_after_keep_loaded_off"] = str(next(hf.parameters()).device)
    facts["features_after_keep_loaded_off"] = len(model._features)
    if model._features:
        fail.append("feature cache kept after keep_loaded=False answer")
    if dev.type == "cuda" and next(hf.parameters()).device.type == "cuda":
        fail.append("weights still on the GPU with keep_loaded off")

    def loaded() -> bool:
        return any(lm.model is model.patcher for lm in mm.current_loaded_models)

    with torch.inference_mode():               # keep_loaded off and Cancel: nothing stays loaded
        (ranked3,) = run("AdaptToken_AttentionRank", model=model, groups=groups, question="Cancelled?",
                         options="", layer=-1, aggregation="max")
        (scored3,) = run("AdaptToken_EntropyScore", ranked=ranked3, mode="auto", tokens=1)
        sel3, _ = run("AdaptToken_BudgetAllocate", scored=scored3, budget=256, relevance="linear",
                      tau=0.1, floor=0, redundancy_threshold=0.9)
        if not (loaded() and model._features):
            fail.append("Budget Allocate left the model unloaded or without features")
        mm.interrupt_current_processing(True)
        try:
            run("AdaptToken_MLLMAnswer", selection=sel3, max_new_tokens=4, do_sample=False,
                temperature=1.0, top_p=1.0, seed=0)
            fail.append("MLLM Answer ran although Cancel was pressed (keep_loaded off)")
        except mm.InterruptProcessingException:
            pass
        mm.interrupt_current_processing(False)
    facts["loaded_after_cancel_keep_loaded_off"] = loaded()
    facts["features_after_cancel_keep_loaded_off"] = len(model._features)
    if loaded() or model._features:
        fail.append("a cancelled answer with keep_loaded off left the model loaded or its features")
    if dev.type == "cuda" and next(hf.parameters()).device.type == "cuda":
        fail.append("weights still on the GPU after a cancelled answer with keep_loaded off")

    # every load asked ComfyUI for the step's working memory besides the weights
    facts["memory_required"] = asked
    for node in ("AdaptToken_BudgetAllocate", "AdaptToken_MLLMAnswer"):
        sizes = [m for n, m in asked if n == node]
        if not sizes or min(sizes) <= 0:
            fail.append(f"{node} loaded the model without memory_required: {sizes}")
    mm.load_models_gpu = load_models_gpu
    # the pack's library is its own subpackage: no top-level `adapttoken` was imported
    facts["top_level_adapttoken"] = sorted(k for k in sys.modules
                                           if k == "adapttoken" or k.startswith("adapttoken."))
    if facts["top_level_adapttoken"]:
        fail.append(f"the pack imported a top-level adapttoken: {facts['top_level_adapttoken'][:5]}")
    facts["failures"] = fail
    print(json.dumps(facts))
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
