"""The report of `bench gpu`: per-case derived figures (compute floor, TFLOP/s, tokens per second),
the markdown table, the stage plot, the targets met or missed, and merging several runs' results."""
from __future__ import annotations

import json
from pathlib import Path

STAGES = ("probe", "cache_load", "decode", "preprocess", "vision", "group_pass", "allocate", "answer")
METHODS = ("uniform", "adapttoken", "second_question", "lite")
QWEN25_ARCHS = ("qwen2.5-vl-7b", "qwen2.5-vl-72b")
ARCH_LABELS = {"qwen2.5-vl-7b": "Qwen2.5-VL-7B", "qwen2.5-vl-72b": "Qwen2.5-VL-72B",
               "qwen3-vl-8b": "Qwen3-VL-8B", "internvl3-8b": "InternVL3-8B"}


# ----------------------------------------------------------------------------------------------
# report


def derived(c: dict, rate: float) -> dict:
    s, f = c["seconds"], c["flops"]
    out = {"floor_s": f["total"] / rate if rate else None}
    out["x_floor"] = c["wall"] / out["floor_s"] if out["floor_s"] else None
    out["tflops_e2e"] = f["total"] / c["wall"] / 1e12 if c["wall"] else 0.0
    for k in ("vision", "group_pass", "answer"):
        t = s.get(k, 0.0)
        out[f"tflops_{k}"] = f[k] / t / 1e12 if t > 0 and f[k] > 0 else None
    out["frames_per_s"] = c["frames"] / c["wall"] if c["wall"] else 0.0
    llm_t = s.get("group_pass", 0.0) + s.get("answer", 0.0)
    llm_tok = c["tokens"].get("group_pass_tokens", 0) + c["tokens"].get("answer_prefill_tokens", 0)
    out["llm_tokens_per_s"] = llm_tok / llm_t if llm_t > 0 else None
    vt = s.get("vision", 0.0) + s.get("preprocess", 0.0)
    out["vision_tokens_per_s"] = c["tokens"]["vision_tokens"] / vt if vt > 0 else None
    return out


def text_path(meta: dict) -> str:
    if "fuse_text" not in meta:
        return "transformers' eager RMSNorm/MLP (runs before fused_text.py)"
    if meta["fuse_text"] is False:
        return "transformers' eager RMSNorm/MLP (--no-fuse-text)"
    return "compiled RMSNorm / SiLU-MLP (torch.compile, the library's default on CUDA; rotary fused only in runs before the no-patching change)"


def vision_path(meta: dict) -> str:
    cv = meta.get("compile_vision")
    if meta.get("arch", "qwen2.5-vl-7b") not in QWEN25_ARCHS:
        if meta.get("arch", "").startswith("qwen3") and meta.get("fast_vision"):
            how = {True: "torch.compile (forced)", False: "eager (compile off)"}.get(
                cv, "torch.compile on CUDA (the library's default)")
            return f"fast batched (one attention call per block, qwen3_vision_fast), {how}"
        return "transformers' own tower (sdpa)"
    if "fuse_text" not in meta and not cv:
        # runs before the tri-state flag: False meant "not forced", i.e. qwen_vision_fast's
        # default, which compiles on CUDA (the report then called it "eager")
        return "fast batched, torch.compile on CUDA (the library's default; reported as eager then)"
    if cv is True:
        return "fast batched + torch.compile (forced, chunks padded to one shape)"
    if cv is False:
        return "fast batched, eager (compile off)"
    return "fast batched, torch.compile on CUDA (the library's default)"


def _fmt(x, nd=2):
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.{nd}f}"
    return str(x)


def markdown(results: dict) -> str:
    meta, rate = results["meta"], results["matmul"]["flops_per_s"]
    arch = meta.get("arch", "qwen2.5-vl-7b")
    fps_slice = meta.get("frames_per_slice", 2)
    qwen25 = arch in QWEN25_ARCHS      # one adapter: fast tower, fused text, prefix KV cache
    quant = meta.get("quantization") or "none"
    weights = ("random bf16 weights" if quant == "none" else
               f"random weights in {quant} (bitsandbytes; vision tower and LM head bf16)")
    video = meta["video"]
    source = (f"{video['frames']} frames of {video['height']}x{video['width']} held in memory as "
              f"uint8 (--in-memory: no file, no decoder)" if meta.get("in_memory") else
              f"{video['frames']} frames of {video['height']}x{video['width']} H.264 (GOP "
              f"{video.get('gop')}) decoded from local disk with PyAV")
    lines = [f"# `bench gpu`: {ARCH_LABELS.get(arch, arch)} architecture, {weights}, end to end", "",
             *([f"- language model: {meta['llm_layers']} of the architecture's decoder layers "
                f"(a slice; full widths)"] if meta.get("llm_layers") else []),
             *([f"- {meta['nproc']} processes under torchrun, groups divided among them; the floor "
                f"is {meta['nproc']} x the per-GPU matmul rate"] if meta.get("nproc") else []),
             f"- device: {meta.get('gpu', meta['device'])}; torch {meta['torch']}, transformers "
             f"{meta['transformers']}, PyAV {meta.get('av')}, Python {meta['python']}, "
             f"{meta['cpu_count']} CPU cores",
             f"- bf16 {results['matmul']['n']}^3 matmul in this run: {rate / 1e12:.0f} TFLOP/s"
             + (" (median of " + " / ".join(f"{r / 1e12:.0f}" for r in results["matmul"]["runs"])
                + ")" if len(results["matmul"].get("runs") or []) > 1 else "")
             + (f"; device copy {results['copy_bw'] / 1e9:.0f} GB/s" if results.get("copy_bw") else ""),
             f"- video: {source}; "
             + (f"resized to {meta['resized'][0]}x{meta['resized'][1]} for the model; "
                if meta.get("resized") and tuple(meta["resized"]) != (video["height"], video["width"])
                and arch != "internvl3-8b" else "")
             + (f"{meta['pixels']} pixels per frame" if arch != "internvl3-8b"
                else "each frame squashed to 448x448")
             + f" = {meta['tokens_per_slice']} tokens per {fps_slice}-frame slice",
             f"- budget {meta['budget']} tokens, groups of {meta['group_size']} slices (strided), "
             f"answer: {meta['max_new_tokens']} new tokens; vision path: {vision_path(meta)}; "
             + (f"language model: {text_path(meta)}; " if qwen25 else "")
             + f"features kept: {meta['feature_device']}; decoder threads: {meta['decode_workers']}",
             f"- Lite: random weights give no confident group, so the stop point is a benchmark "
             f"parameter: Lite stops after round({meta['lite_stop_fraction']} x groups) groups.",
             f"- second question: a new question on the same video and sampling right after "
             f"adapttoken; its vision features are still in memory"
             + (", and so are the keys/values of each group's prefix (system prompt + visual "
                "tokens) where they fit (PrefixKVCache)." if qwen25 else
                "; this family has no prefix key/value cache, so every group pass runs again."),
             (f"- lengths >= {meta['card_from']} frames run as on a {meta['card_gib']:g} GiB card: "
              f"torch.cuda.set_per_process_memory_fraction caps the allocator there (allocations "
              f"beyond it fail) and the library sizes its GPU caches to it." if meta.get("card_gib")
              else "- no memory cap."),
             (f"- report rebuilt from the runs below with: `{meta['command']}`" if results.get("runs")
              else f"- rerun: `{meta['command']}`")]
    for i, r in enumerate(results.get("runs", []), 1):
        lines.append(f"- run {i}: `{r['command']}` ({r.get('gpu')}, matmul "
                     f"{r['matmul_tflops']:.0f} TFLOP/s){': ' + r['note'] if r.get('note') else ''}")
    lines += ["",
             "Seconds per stage (decode = time the pipeline waited for frames; the decoder threads "
             "run alongside the GPU), wall time, compute floor (counted FLOPs / measured matmul "
             "rate), achieved TFLOP/s, peak GPU memory.", ""]
    hdr = ("| frames | method | groups run | decode | preproc | vision | group pass | allocate | "
           "answer | wall s | floor s | x floor | TFLOP/s e2e | vision TFLOP/s | group TFLOP/s | "
           "frames/s | LLM tok/s | peak GiB | run |")
    lines += [hdr, "|" + "|".join(["---"] * 19) + "|"]
    order = {m: i for i, m in enumerate(METHODS)}
    for c in sorted(results["cases"], key=lambda c: (c["frames"], order.get(c["method"], 9))):
        s, d = c["seconds"], c["derived"]
        runs = f"{c['group_passes']}/{c['groups']}" if c["groups"] else "-"
        lines.append("| " + " | ".join([
            str(c["frames"]), c["method"], runs, _fmt(s.get("decode", 0.0)),
            _fmt(s.get("preprocess", 0.0)), _fmt(s.get("vision", 0.0)),
            _fmt(s.get("group_pass", 0.0)), _fmt(s.get("allocate", 0.0)), _fmt(s.get("answer", 0.0)),
            _fmt(c["wall"]), _fmt(d["floor_s"]), _fmt(d["x_floor"]), _fmt(d["tflops_e2e"], 0),
            _fmt(d["tflops_vision"], 0), _fmt(d["tflops_group_pass"], 0), _fmt(d["frames_per_s"], 0),
            _fmt(d["llm_tokens_per_s"], 0), _fmt(c["peak_gib"], 1), str(c.get("run", 1))]) + " |")
    lines += ["", "## Targets" + ("" if arch == "qwen2.5-vl-7b" else
                                  " (set for Qwen2.5-VL-7B in issue #5; shown here for comparison)"), ""]
    for t in results.get("targets", []):
        lines.append(f"- {'MET' if t['met'] else 'MISSED'}: {t['what']}: {t['measured']}")
    if results.get("disk_cache"):
        dc = results["disk_cache"]
        lines += ["", "## On-disk feature cache" + (f" (run {dc['run']})" if dc.get("run") else ""), "",
                  f"- {dc['frames']} frames: first run (computes and writes) {dc['first_wall']:.2f} s; "
                  f"new in-memory cache, same cache folder: {dc['second_wall']:.2f} s "
                  f"(decoded {dc['second_decoded']} frames, loaded {dc['second_loaded']} slices in "
                  f"{dc['second_cache_load_s']:.2f} s); cache size {dc['bytes'] / 2 ** 30:.2f} GiB"]
    if results.get("variants"):
        lines += ["", "## One optimisation undone at a time (full method)", "",
                  "| variant | frames | run | decode | preproc | vision | group pass | allocate | answer "
                  "| wall s | x floor |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        rows = [(v["variant"], v) for v in results["variants"]]
        if not any(v.get("reference") for v in results["variants"]):
            L = results["variants"][0]["frames"]
            ref = next((c for c in results["cases"] if c["frames"] == L
                        and c["method"] == "adapttoken"), None)
            rows = ([("as benchmarked above", ref)] if ref else []) + rows
        for name, c in rows:
            s = c["seconds"]
            lines.append("| " + " | ".join([name, str(c["frames"]), str(c.get("run", 1))]
                         + [_fmt(s.get(k, 0.0)) for k in
                            ("decode", "preprocess", "vision", "group_pass", "allocate", "answer")]
                         + [_fmt(c["wall"]), _fmt(c["derived"]["x_floor"])]) + " |")
    if results.get("errors"):
        lines += ["", "Errors: " + "; ".join(results["errors"])]
    lines += ["", "## Rerun", "",
              "On a CUDA machine with PyAV (the video is generated, then decoded for real):", "",
              ("    python -m adapttoken bench gpu --frames 4096 10000 1024 --out docs/bench_gpu "
               "--disk-cache --variants" if arch == "qwen2.5-vl-7b" else
               f"    python -m adapttoken bench gpu --arch {arch} --frames 1024 4096"), "",
              "`--eager-vision` / `--compile-vision` force the Qwen2.5-VL / Qwen3-VL fast tower eager / compiled (the "
              "default compiles it on CUDA), `--card-gib 0` lifts the "
              "24 GiB cap of the 10,000-frame cases, `--tiny --device cpu` runs a smoke test. "
              "`--from-json A.json B.json` rebuilds this page from saved runs.",
              "", "Columns: decode = seconds the pipeline waited for frames (the decoder lanes work "
              "alongside the GPU); preproc/vision/group pass/answer include the GPU work they "
              "launched; floor = counted FLOPs / the bf16 matmul rate of the same run; frames/s = "
              "sampled frames / wall; LLM tok/s = tokens through the language model (group passes + "
              "answer prefill) / their seconds; peak = torch.cuda.max_memory_allocated, reset per case."]
    if results.get("skipped"):
        lines += ["", "Not run (time limit): " + ", ".join(results["skipped"])]
    lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    """Stacked bars of seconds per stage, per length and method, with the compute floor marked."""
    from PIL import Image, ImageDraw

    cases = results["cases"]
    if not cases:
        return
    colours = {"probe": (200, 200, 200), "cache_load": (150, 150, 150), "decode": (230, 159, 0),
               "preprocess": (240, 228, 66), "vision": (0, 114, 178), "group_pass": (0, 158, 115),
               "allocate": (204, 121, 167), "answer": (213, 94, 0), "other": (90, 90, 90)}
    W, H, left, bottom, top = 1200, 560, 70, 120, 40
    bar, gap = 34, 12
    img = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(img)
    lengths = sorted({c["frames"] for c in cases})
    n_slots = len(cases) + len(lengths)
    bar = max(8, min(bar, (W - left - 20) // max(1, n_slots) - gap))
    # one scale per panel is unreadable across 1k..10k; use log-free linear scale of the max
    vmax = max(max(c["wall"], c["derived"]["floor_s"] or 0) for c in cases) * 1.05
    plot_h = H - bottom - top

    def y(v):
        return H - bottom - int(plot_h * v / vmax)

    d.line([(left, top), (left, H - bottom)], fill="black")
    d.line([(left, H - bottom), (W - 10, H - bottom)], fill="black")
    for i in range(6):
        v = vmax * i / 5
        d.line([(left - 4, y(v)), (left, y(v))], fill="black")
        d.text((5, y(v) - 6), f"{v:.0f} s", fill="black")
    x = left + gap
    for L in lengths:
        for c in [c for c in cases if c["frames"] == L]:
            acc = 0.0
            for st in STAGES:
                v = c["seconds"].get(st, 0.0)
                if v > 0:
                    d.rectangle([x, y(acc + v), x + bar, y(acc)], fill=colours[st])
                    acc += v
            other = max(0.0, c["wall"] - acc)
            if other > 0:
                d.rectangle([x, y(acc + other), x + bar, y(acc)], fill=colours["other"])
            fl = c["derived"]["floor_s"]
            if fl:
                d.line([(x - 3, y(fl)), (x + bar + 3, y(fl))], fill="red", width=2)
            label = {"uniform": "unif", "adapttoken": "full", "second_question": "2nd q",
                     "lite": "lite"}.get(c["method"], c["method"])
            d.text((x, H - bottom + 6), label, fill="black")
            x += bar + gap
        d.text((x - (bar + gap) * 2, H - bottom + 22), f"{L} frames", fill="black")
        x += bar
    lx, ly = left, H - bottom + 50
    for st in (*STAGES, "other"):
        d.rectangle([lx, ly, lx + 12, ly + 12], fill=colours[st])
        d.text((lx + 16, ly), st, fill="black")
        lx += 120
        if lx > W - 120:
            lx, ly = left, ly + 18
    d.line([(lx, ly + 6), (lx + 14, ly + 6)], fill="red", width=2)
    d.text((lx + 18, ly), "compute floor", fill="black")
    arch = results["meta"].get("arch", "qwen2.5-vl-7b")
    d.text((left, 10), f"AdaptToken on {ARCH_LABELS.get(arch, arch)} (random weights), "
                       f"{results['meta'].get('gpu', results['meta']['device'])}: seconds per question",
           fill="black")
    img.save(path)


def targets(results: dict) -> list[dict]:
    out = []
    by = {(c["frames"], c["method"]): c for c in results["cases"]}
    full = by.get((4096, "adapttoken"))
    if full:
        x = full["derived"]["x_floor"]
        out.append({"what": "AdaptToken end to end at 4096 frames within 1.5x the compute floor",
                    "met": x is not None and x <= 1.5,
                    "measured": f"{full['wall']:.2f} s vs floor {full['derived']['floor_s']:.2f} s "
                                f"= {x:.2f}x"})
    for L in sorted({c["frames"] for c in results["cases"]}):
        f, lt = by.get((L, "adapttoken")), by.get((L, "lite"))
        if f and lt and L == 4096:
            r = lt["wall"] / f["wall"]
            out.append({"what": f"Lite stopping after a quarter of the groups <= 0.5x full ({L} frames)",
                        "met": r <= 0.5, "measured": f"{lt['wall']:.2f} s / {f['wall']:.2f} s = {r:.2f}x"})
    peak = [c for c in results["cases"] if c["frames"] == 10000]
    if peak:
        p = max(c["peak_gib"] for c in peak)
        out.append({"what": "peak GPU memory <= 24 GB at 10,000 frames (bf16 weights)",
                    "met": p * 2 ** 30 <= 24e9,
                    "measured": f"{p:.2f} GiB = {p * 2 ** 30 / 1e9:.2f} GB (max over the 10,000-frame cases)"})
    for L in sorted({c["frames"] for c in results["cases"]}):
        f, s2 = by.get((L, "adapttoken")), by.get((L, "second_question"))
        if f and s2:
            r = s2["wall"] / f["wall"]
            out.append({"what": f"second question on the same video <= 0.4x the first ({L} frames)",
                        "met": r <= 0.4, "measured": f"{s2['wall']:.2f} s / {f['wall']:.2f} s = {r:.2f}x"})
    return out


# ----------------------------------------------------------------------------------------------
# main


def merge_results(paths, notes=()) -> dict:
    """Several runs' results.json as one report: a later run's case replaces an earlier run's case
    of the same (frames, method); each case keeps the number of its run and its own run's floor."""
    runs = [json.loads(Path(p).read_text()) for p in paths]
    out = {"meta": dict(runs[-1]["meta"]), "matmul": runs[-1]["matmul"],
           "copy_bw": runs[-1].get("copy_bw"), "runs": [], "skipped": [], "cases": []}
    by = {}
    for i, r in enumerate(runs, 1):
        out["runs"].append({"command": r["meta"]["command"], "gpu": r["meta"].get("gpu"),
                            "matmul_tflops": r["matmul"]["flops_per_s"] / 1e12,
                            "note": notes[i - 1] if i - 1 < len(notes) else ""})
        for c in r["cases"]:
            c = dict(c, run=i)
            by[(c["frames"], c["method"])] = c
        if r.get("disk_cache"):
            out["disk_cache"] = dict(r["disk_cache"], run=i)
        if r.get("variants"):
            # every run's variants, each after its own run's reference case at that length
            L = r["variants"][0]["frames"]
            ref = next((c for c in r["cases"] if c["frames"] == L and c["method"] == "adapttoken"), None)
            if ref is not None:
                out.setdefault("variants", []).append(dict(ref, variant="as benchmarked (reference)",
                                                           reference=True, run=i))
            out.setdefault("variants", []).extend(dict(v, run=i) for v in r["variants"])
        out.setdefault("errors", []).extend(r.get("errors", []))
    out["cases"] = list(by.values())
    out["meta"]["command"] = "python -m adapttoken bench gpu --from-json " + " ".join(map(str, paths))
    out["targets"] = targets(out)
    return out
