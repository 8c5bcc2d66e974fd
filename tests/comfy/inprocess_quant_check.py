"""Load MLLM with quantized weights inside ComfyUI's memory manager, in-process (on the GPU when
there is one, else on the CPU where bitsandbytes, or torch's FP8 matmul, runs there): the model is loaded straight onto
ComfyUI's compute device, its patcher's offload device is that same device, a question runs, and
ComfyUI's unloading (/free, "Unload models", keep_loaded off) moves nothing and drops the video
caches; the model answers again afterwards.

    COMFYUI_DIR=<ComfyUI> python tests/comfy/inprocess_quant_check.py [--quantization nf4]

Run by tests/comfy/test_runtime_inprocess.py. Prints one JSON line of facts; exits non-zero on a
failed check.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quantization", default="nf4", choices=["nf4", "int8", "fp8"])
    a = ap.parse_args()
    model_dir = REPO / "adapttoken" / "assets" / "adapttoken-tiny-synth"
    video_path = str(REPO / "adapttoken" / "assets" / "sample.mp4")

    from inprocess_pack import load_pack
    mm, classes = load_pack(model_dir)
    import torch

    def run(node_id, **kw):
        cls = classes[node_id].PREPARE_CLASS_CLONE({})
        return cls.execute(**kw).result

    def question(model, groups, text):
        (ranked,) = run("AdaptToken_AttentionRank", model=model, groups=groups, question=text,
                        options="blue square\ngreen square\nyellow cross\nblue cross", layer=-1,
                        aggregation="max")
        (scored,) = run("AdaptToken_EntropyScore", ranked=ranked, mode="auto", tokens=1)
        sel, _ = run("AdaptToken_BudgetAllocate", scored=scored, budget=256, relevance="linear",
                     tau=0.1, floor=0, redundancy_threshold=0.9)
        answer, _, _ = run("AdaptToken_MLLMAnswer", selection=sel, max_new_tokens=4,
                           do_sample=False, temperature=1.0, top_p=1.0, seed=0)
        return answer

    dev = mm.get_torch_device()
    facts, fail = {"device": str(dev), "quantization": a.quantization}, []
    load_cls = classes["AdaptToken_LoadMLLM"]
    facts["validate_unknown"] = load_cls.validate_inputs(model="x", attention="sdpa",
                                                         quantization="fp4")
    if "fp4" not in str(facts["validate_unknown"]):
        fail.append(f"an unknown quantization passed validation: {facts['validate_unknown']}")
    name = "adapttoken-tiny-synth (bundled)"
    facts["validate"] = load_cls.validate_inputs(model=name, attention="sdpa",
                                                 quantization=a.quantization)
    if facts["validate"] is not True:
        fail.append(f"quantization={a.quantization} did not validate here: {facts['validate']}")
    with torch.inference_mode():
        (model,) = run("AdaptToken_LoadMLLM", model=name, dtype="auto", attention="sdpa",
                       keep_loaded=True, quantization=a.quantization)
        hf = model.adapter.model
        layer = hf.model.language_model.layers[0]
        facts["linear"] = type(layer.mlp.down_proj).__name__
        if facts["linear"] not in ("Linear4bit", "Linear8bitLt", "Float8Linear"):
            fail.append(f"the language model is not quantized: {facts['linear']}")
        p = model.patcher
        facts["load_device"], facts["offload_device"] = str(p.load_device), str(p.offload_device)
        if torch.device(p.offload_device) != torch.device(p.load_device):
            fail.append("a quantized model's offload device differs from its load device")
        facts["loaded_on"] = str(next(hf.parameters()).device)
        video = run("AdaptToken_LoadVideo", video="", path=video_path, num_frames=256, max_fps=0.0,
                    start=0.0, end=0.0, max_pixels=308 * 560)[0]
        (groups,) = run("AdaptToken_GroupSplit", video=video, group_size=16, layout="strided")
        facts["answer"] = question(model, groups, "What coloured object appeared in the video?")
        facts["features_cached"] = len(model._features)
    mm.unload_all_models()
    mm.soft_empty_cache()
    facts["weights_after_unload"] = sorted({str(t.device) for t in hf.parameters()})
    facts["features_after_unload"] = len(model._features)
    if model._features:
        fail.append("feature cache kept after the model was unloaded")
    if any(torch.device(d).type != dev.type for d in facts["weights_after_unload"]):
        fail.append(f"quantized weights moved on unload: {facts['weights_after_unload']}")
    with torch.inference_mode():
        facts["answer_after_unload"] = question(model, groups, "Which colour was the object?")
        model.keep_loaded = False
        facts["answer_keep_loaded_off"] = question(model, groups, "What appeared?")
    facts["features_after_keep_loaded_off"] = len(model._features)
    if model._features:
        fail.append("feature cache kept after a keep_loaded=False answer")
    facts["failures"] = fail
    print(json.dumps(facts))
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
