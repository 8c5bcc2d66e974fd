"""The pack's caches inside ComfyUI's memory manager, in-process (CPU with --cpu, or the GPU):

- after Budget Allocate, ComfyUI's entry for the model (LoadedModel.model_memory/model_loaded_memory,
  i.e. the patcher's model_size/loaded_size) counts the bytes the caches hold on the load device;
- ComfyUI asking the model for fewer bytes than its caches (LoadedModel.model_unload with
  memory_to_free, what free_memory does) drops the caches and keeps the weights loaded;
- free_memory(huge, device) and unload_all_models() (/free) drop every cache and the figure falls
  back to the weights;
- on CUDA: loading another model with load_models_gpu(..., memory_required=<more than is free>)
  frees the caches (torch.cuda.memory_allocated drops by at least their bytes);
- a GPU out-of-memory error inside a node (raised by a hook on a real decoder layer) gives a one-line
  message naming what to lower, and leaves no cache behind.

    COMFYUI_DIR=<ComfyUI> python tests/comfy/inprocess_memory_check.py [--frames N]

Prints one JSON line of facts; exits non-zero on a failed check (2: ComfyUI not importable here).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
Q = "What coloured object appeared in the video?"
OPTIONS = "blue square\ngreen square\nyellow cross\nblue cross"


def setup(model_dir: Path):
    """ComfyUI's memory manager and the pack's nodes, imported as ComfyUI would (no server)."""
    from inprocess_pack import load_pack
    mm, classes = load_pack(model_dir)

    def run(node_id, **kw):
        return classes[node_id].PREPARE_CLASS_CLONE({}).execute(**kw).result

    return mm, run


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=str(REPO / "adapttoken" / "assets" / "adapttoken-tiny-synth"))
    ap.add_argument("--video", default=str(REPO / "adapttoken" / "assets" / "sample.mp4"))
    ap.add_argument("--frames", type=int, default=512)
    a = ap.parse_args()
    try:
        mm, run = setup(Path(a.model))
    except ImportError as e:
        print(json.dumps({"skipped": f"ComfyUI cannot be imported here: {e}"}))
        return 2
    import torch
    from adapttoken_pack.nodes import runtime

    dev = mm.get_torch_device()
    cuda = dev.type == "cuda"
    facts, fail = {"device": str(dev)}, []
    name = Path(a.model).name
    if name == "adapttoken-tiny-synth":
        name = "adapttoken-tiny-synth (bundled)"

    def sync():
        if cuda:
            torch.cuda.synchronize()
        return torch.cuda.memory_allocated() if cuda else 0

    def entry(model):
        return next((lm for lm in mm.current_loaded_models if lm.model is model.patcher), None)

    with torch.inference_mode():
        (model,) = run("AdaptToken_LoadMLLM", model=name, dtype="auto", attention="sdpa",
                       keep_loaded=True)
        video = run("AdaptToken_LoadVideo", video="", path=a.video, num_frames=a.frames,
                    max_fps=0.0, start=0.0, end=0.0, max_pixels=112 * 112)[0]
        (groups,) = run("AdaptToken_GroupSplit", video=video, group_size=32, layout="strided")

        def allocate(question=Q):
            (ranked,) = run("AdaptToken_AttentionRank", model=model, groups=groups,
                            question=question, options=OPTIONS, layer=-1, aggregation="max")
            (scored,) = run("AdaptToken_EntropyScore", ranked=ranked, mode="auto", tokens=1)
            return run("AdaptToken_BudgetAllocate", scored=scored, budget=256, relevance="linear",
                       tau=0.1, floor=0, redundancy_threshold=0.9)[0]

        allocate()
    weights = mm.module_size(model.patcher.model)
    lm = entry(model)
    cache = model.patcher.cache_bytes()
    facts["weights_bytes"] = weights
    facts["held_bytes"] = model.held_bytes()
    facts["comfy_model_memory"] = lm.model_memory() if lm else None
    facts["comfy_loaded_memory"] = lm.model_loaded_memory() if lm else None
    if lm is None:
        fail.append("the model is not in ComfyUI's loaded models after Budget Allocate")
    elif cache <= 0:
        fail.append(f"no cache bytes on {dev} after a run: {facts['held_bytes']}")
    elif lm.model_memory() != weights + cache or lm.model_loaded_memory() != weights + cache:
        fail.append(f"ComfyUI sees {lm.model_memory()} / {lm.model_loaded_memory()} bytes, "
                    f"not weights {weights} + caches {cache}")
    if lm is not None and lm.model_offloaded_memory() != 0:
        fail.append(f"offloaded memory {lm.model_offloaded_memory()} != 0 for a loaded model")

    # 1. ComfyUI asks this model for half of what its caches hold: the caches go, the weights stay
    before = sync()
    if lm is not None:
        unloaded = lm.model_unload(memory_to_free=max(1, cache // 2))
        facts["partial_unload_unloaded_weights"] = unloaded
        if unloaded:
            fail.append("ComfyUI unloaded the weights although the caches were enough")
    facts["held_after_partial"] = model.held_bytes().get(runtime._device_key(dev), 0)
    if facts["held_after_partial"]:
        fail.append(f"caches left after a partial unload: {model.held_bytes()}")
    if entry(model) is None or entry(model).model_memory() != weights:
        fail.append("after the partial unload ComfyUI does not see the weights alone")
    if cuda:
        facts["cuda_freed_by_partial"] = before - sync()
        if facts["cuda_freed_by_partial"] < cache:
            fail.append(f"partial unload freed {facts['cuda_freed_by_partial']} < {cache} bytes")

    # 2. free_memory(huge) on the device: the model and every cache go
    with torch.inference_mode():
        allocate("Which colour?")
    cache = model.patcher.cache_bytes()
    before = sync()
    mm.free_memory(1e30, dev)
    facts["held_after_free_memory"] = model.held_bytes()
    facts["loaded_after_free_memory"] = entry(model) is not None
    if model.held_bytes() or entry(model) is not None:
        fail.append(f"free_memory left caches {model.held_bytes()} or the model loaded")
    if cuda:
        facts["cuda_freed_by_free_memory"] = before - sync()
        if facts["cuda_freed_by_free_memory"] < cache:
            fail.append(f"free_memory freed {facts['cuda_freed_by_free_memory']} < {cache} bytes")

    # 3. unload_all_models (/free, "Unload models")
    with torch.inference_mode():
        allocate("Which shape?")
    if not model.held_bytes():
        fail.append("no caches after a run")
    mm.unload_all_models()
    facts["held_after_unload_all"] = model.held_bytes()
    if model.held_bytes():
        fail.append(f"unload_all_models left caches: {model.held_bytes()}")
    if model.patcher.model_size() != weights:
        fail.append("the size ComfyUI reads is not the weights' after unloading")

    # 4. CUDA: another model loaded with more working memory than is free takes the caches' room
    if cuda:
        import comfy.model_patcher
        with torch.inference_mode():
            allocate("Which colour came first?")
        cache = model.patcher.cache_bytes()
        other = comfy.model_patcher.ModelPatcher(torch.nn.Linear(1024, 1024), load_device=dev,
                                                 offload_device=torch.device("cpu"))
        before = sync()
        mm.load_models_gpu([other], memory_required=int(mm.get_free_memory(dev)) + 2 * cache)
        facts["cuda_cache_bytes_before_second_model"] = cache
        facts["cuda_freed_by_second_model"] = before - sync()
        facts["held_after_second_model"] = model.held_bytes()
        facts["weights_loaded_after_second_model"] = entry(model) is not None
        if model.held_bytes().get(runtime._device_key(dev), 0):
            fail.append(f"the caches survived another model's load: {model.held_bytes()}")
        if facts["cuda_freed_by_second_model"] + other.model_size() < cache:
            fail.append("memory_allocated did not drop by the caches' bytes")
        mm.unload_all_models()

    # 5. out of memory inside a node: one line naming what to lower, caches gone
    layer = model.adapter.text_model.layers[1]
    calls = []

    def boom(module, args, out):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    h = layer.register_forward_hook(boom)
    try:
        with torch.inference_mode():
            allocate("Out of memory?")
        fail.append("no error although the layer raised out of memory")
    except ValueError as e:
        facts["oom_message"] = str(e)
        if "\n" in str(e) or not all(k in str(e) for k in ("frames", "budget", "max_pixels")):
            fail.append(f"out-of-memory message: {str(e)!r}")
    finally:
        h.remove()
    facts["held_after_oom"] = model.held_bytes()
    if model.held_bytes():
        fail.append(f"caches left after out of memory: {model.held_bytes()}")
    mm.unload_all_models()
    facts["failures"] = fail
    print(json.dumps(facts))
    return 1 if fail else 0


if __name__ == "__main__":
    sys.exit(main())
