"""The Table-1-shaped report: merge every worker file, score, write report.md / report.json /
accuracy.png into OUT. `rescore` re-parses the stored raw outputs under another profile's rule
(no model, no GPU)."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from . import metrics, profiles
from .runner import read_rows

# The paper's Table 1 (Qwen2.5-VL-7B, accuracy %; seconds per question Lite / full). Printed only
# beside runs of the named configuration `paper`.
PAPER = {
    "videomme": {"native": 65.4, "adapttoken": 70.5, "lite": 69.8, "seconds": {"lite": 8.6, "adapttoken": 17.8}},
    "mlvu": {"native": 70.2, "adapttoken": 76.8, "lite": 76.3, "seconds": {"lite": 10.1, "adapttoken": 21.5}},
    "longvideobench": {"native": 59.5, "adapttoken": 65.2, "lite": 65.1, "seconds": {"lite": 11.0, "adapttoken": 18.2}},
    "lvbench": {"native": 45.3, "adapttoken": 54.8, "lite": 53.3, "seconds": {"lite": 19.3, "adapttoken": 32.8}},
}
NAMES = {"native": "native (baseline)", "adapttoken": "AdaptToken", "lite": "AdaptToken-Lite",
         "uniform": "uniform frames at the budget", "even_split": "even split"}
METHOD_ORDER = ("native", "adapttoken", "lite", "even_split", "uniform")
STAGES = ("probe", "cache_load", "decode", "preprocess", "vision", "group_pass", "allocate", "answer")
BREAKDOWN = {"videomme": ("by_duration", ("short", "medium", "long")),
             "longvideobench": ("by_duration_group", ("15", "60", "600", "3600")),
             "mlvu": ("by_task", ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")),
             "lvbench": ("by_question_type", None), "jsonl": ("by_category", None)}
MAIN_NAME = {"videomme": "overall", "mlvu": "M-Avg", "longvideobench": "overall",
             "lvbench": "overall", "jsonl": "overall"}


def rescore(rows: list[dict], profile: str, bench: str) -> list[dict]:
    """The rows with `letter`/`correct` re-derived from `raw` under `profile`'s parser."""
    out = []
    for r in rows:
        r = dict(r)
        if not r.get("error") and r.get("raw") is not None:
            letters = [chr(65 + i) for i in range(int(r.get("n_options") or 4))]
            r["letter"] = profiles.parse(profile, bench, r["raw"], letters)
            r["correct"] = r["letter"] == r["gold"]
        out.append(r)
    return out


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def timing(rows: list[dict]) -> dict:
    ok = [r for r in rows if not r.get("error") and r.get("seconds")]
    out = {}
    for name, sel in (("cold", [r for r in ok if r.get("cold")]), ("warm", [r for r in ok if not r.get("cold")])):
        out[name] = {"n": len(sel), "seconds": _mean([r["wall_s"] for r in sel]),
                     "group_passes": _mean([r.get("group_passes") for r in sel]),
                     "groups": _mean([r.get("groups") for r in sel]),
                     "decoded_frames": _mean([r.get("decoded_frames") for r in sel]),
                     "encoded_slices": _mean([r.get("encoded_slices") for r in sel]),
                     "stages": {s: _mean([r["seconds"].get(s, 0.0) for r in sel]) for s in STAGES} if sel else {}}
        out[name]["wall_share"] = wall_shares(out[name])
    tot = defaultdict(float)
    for r in ok:
        for s in STAGES:
            tot[s] += r["seconds"].get(s, 0.0)
    all_s = sum(tot.values())
    out["stage_share"] = {s: (tot[s] / all_s if all_s else None) for s in STAGES}
    out["kept_tokens"] = _mean([r.get("kept_tokens") for r in ok])
    return out


SHARE_OF = {"decode": ("decode",), "vision": ("preprocess", "vision", "cache_load"),
            "group_pass": ("group_pass",), "answer": ("answer",)}


def wall_shares(t: dict) -> dict:
    """Shares of the mean wall seconds: decode (waiting for frames), vision (preprocess + tower +
    cache loads), group passes, answer, and other (probe, allocation, Python between stages)."""
    wall, st = t.get("seconds"), t.get("stages") or {}
    if not wall or not st:
        return {}
    sh = {k: sum(st.get(x) or 0.0 for x in xs) / wall for k, xs in SHARE_OF.items()}
    sh["other"] = max(0.0, 1.0 - sum(sh.values()))
    return sh


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def summarize(out, profile: str | None = None, expected: int | None = None) -> dict:
    out = Path(out)
    meta = json.loads((out / "run.json").read_text())
    fp, spec = meta["fingerprint"], meta.get("spec", {})
    bench = fp["bench"]
    rows, cut = read_rows(out)
    run_profile = fp["profile"]
    profile = profile or run_profile
    if profile != run_profile:
        rows = rescore(rows, profile, bench)
    by_m = defaultdict(list)
    for r in rows:
        by_m[r["method"]].append(r)
    methods = [m for m in METHOD_ORDER if m in by_m] + sorted(m for m in by_m if m not in METHOD_ORDER)
    res = {"bench": bench, "profile": profile, "run_profile": run_profile, "fingerprint": fp,
           "spec": {k: spec.get(k) for k in ("methods", "device", "dtype", "quantization", "workers", "limit",
                                                     "model")},
           "expected_questions": expected, "cut_lines_skipped": cut, "methods": {},
           "random_weights": bool(fp.get("arch")),
           "warmup": [w for w in (_read_json(p) for p in sorted(out.glob("warmup-worker*.json"))) if w],
           "built_models": [w for w in (_read_json(p) for p in sorted(out.glob("model-worker*.json"))) if w]}
    # the paper's accuracy beside a run of its configuration with its model and Lite's own stop rule
    claims = fp.get("config_name") == "paper" and not fp.get("arch") and fp.get("lite_stop_fraction") is None
    for m in methods:
        rs = by_m[m]
        e = {"metrics": metrics.compute(bench, rs), "timing": timing(rs)}
        probs = [r for r in rs if r.get("argmax") is not None]
        e["argmax_option_prob_acc"] = metrics.acc_entry(sum(r["argmax"] == r["gold"] for r in probs), len(probs))
        if claims and bench in PAPER and m in PAPER[bench]:
            e["paper"] = {"acc": PAPER[bench][m], "seconds": PAPER[bench]["seconds"].get(m)}
        if bench in PAPER and PAPER[bench]["seconds"].get(m) is not None:
            e["paper_seconds"] = PAPER[bench]["seconds"][m]
        res["methods"][m] = e
    return res


def _pct(e) -> str:
    if e is None or e.get("acc") is None:
        return "-"
    return f"{100 * e['acc']:.1f} ({100 * e['ci95'][0]:.1f}-{100 * e['ci95'][1]:.1f})"


def _num(x, f="{:.2f}") -> str:
    return "-" if x is None else f.format(x)


def markdown(s: dict) -> str:
    bench, fp = s["bench"], s["fingerprint"]
    paper = any(e.get("paper") for e in s["methods"].values())
    bkey, cols = BREAKDOWN[bench]
    if cols is None:
        cols = sorted({k for e in s["methods"].values() for k in e["metrics"].get(bkey, {})})
    main = MAIN_NAME[bench]
    head = ["method", f"{main} % (95% CI)"] + (["paper %"] if paper else []) + \
        [f"{c}" for c in cols] + ["n", "errors", "parse fail", "s/q cold", "s/q warm",
                                   "passes cold", "passes warm"] + (["paper s/q"] if paper else [])
    lines = [f"# {bench}: {s['profile']} profile" + (f" (re-scored; run with {s['run_profile']})"
                                                      if s["profile"] != s["run_profile"] else ""), ""]
    if s.get("random_weights"):
        lines += [f"**Speed run: {fp.get('model')}. Random weights answer at random: the accuracy "
                  f"columns below mean nothing (they only show the run worked end to end).**", ""]
    if fp.get("lite_stop_fraction") is not None:
        lines += [f"**Lite's stop is fixed: it stops after round({fp['lite_stop_fraction']:g} x groups) "
                  f"groups whatever the entropies (a benchmarking aid), so Lite's accuracy is not the "
                  f"method's.**", ""]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m, e in s["methods"].items():
        mt, t = e["metrics"], e["timing"]
        cells = [NAMES.get(m, m), _pct(mt["main"])]
        if paper:
            cells.append(_num((e.get("paper") or {}).get("acc"), "{:.1f}"))
        sub = mt.get(bkey, {})
        cells += [f"{100 * sub[c]['acc']:.1f}" if sub.get(c) and sub[c]["acc"] is not None else "-"
                  for c in cols]
        cells += [str(mt["overall"]["n"]), str(mt["errors"]), str(mt["parse_failures"]),
                  _num(t["cold"]["seconds"]), _num(t["warm"]["seconds"]),
                  _num(t["cold"]["group_passes"], "{:.1f}"), _num(t["warm"]["group_passes"], "{:.1f}")]
        if paper:
            cells.append(_num((e.get("paper") or {}).get("seconds"), "{:.1f}"))
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Seconds per stage (mean per answered question; share of all stage time):", "",
              "| method | " + " | ".join(STAGES) + " |", "|" + " --- |" * (len(STAGES) + 1)]
    for m, e in s["methods"].items():
        t = e["timing"]
        ok = [t["cold"], t["warm"]]
        n = sum(x["n"] for x in ok)
        cells = []
        for st in STAGES:
            v = sum((x["stages"].get(st) or 0) * x["n"] for x in ok if x["n"]) / n if n else None
            share = t["stage_share"].get(st)
            cells.append("-" if v is None else f"{v:.3f} ({100 * (share or 0):.0f}%)")
        lines.append(f"| {NAMES.get(m, m)} | " + " | ".join(cells) + " |")
    lines += speed_table(s)
    extra = []
    if bench == "mlvu":
        extra.append("M-Avg is the mean of the 7 task accuracies (interval: normal, from the per-task "
                     "variances); the micro average is in report.json (`micro_avg`).")
    if bench == "lvbench":
        extra.append("A question with several types counts in each of its types.")
    f = fp
    extra += [
        f"Settings: configuration `{f['config_name']}`: {f['num_frames']} frames, budget {f['budget']} "
        f"tokens, max {f['max_pixels']} pixels per frame, group size {f['group_size']}, Lite "
        + (f"stop fixed after round({f['lite_stop_fraction']:g} x groups) groups"
           if f.get("lite_stop_fraction") is not None else f"stop threshold {f['stop_threshold']}")
        + f"; native baseline: {f['native_frames']} uniformly sampled "
        f"frames, max {f['native_max_pixels']} pixels per frame, every token, no selection; "
        f"subtitles {'on' if f['subtitles'] else 'off'}; model {f['model']}; "
        f"new tokens {profiles.max_new_tokens(s['run_profile'], bench)} ({s['run_profile']}).",
        "Accuracy counts every question: error rows (missing or unreadable video, a failed run) and "
        "parse failures are wrong. Intervals: 95% Wilson. Cold: the first question on a video for its "
        "sampling (decodes and runs the vision tower); warm: the others (reuse the features). "
        "The method order rotates per video so each method is cold on its share of videos.",
    ]
    for w in s.get("warmup") or []:
        extra.append(f"Warm-up before the recorded questions: one question per method on {Path(w['video']).name} "
                     f"({w['seconds']:.1f} s, not recorded; every cache emptied after it).")
    for b in s.get("built_models") or []:
        extra.append(f"Model: {b['arch']} with random weights, {b['dtype']} on {b['device']}, built in "
                     f"{b['build_s']:.1f} s.")
    if paper:
        extra.append("Paper: Table 1 of arXiv 2603.28696 (Qwen2.5-VL-7B); its seconds are Lite / full per question.")
    elif fp.get("config_name") == "paper":
        extra.append("No paper accuracy beside this run: random weights or a fixed Lite stop.")
    else:
        extra.append("The paper's accuracy figures are printed only beside runs of the `paper` "
                     "configuration (4096 frames, budget 7040) with a model's own weights.")
    if s.get("expected_questions") is not None:
        done = {m: e["metrics"]["overall"]["n"] for m, e in s["methods"].items()}
        extra.append(f"Questions in the data set (after --limit): {s['expected_questions']}; rows per method: "
                     + ", ".join(f"{m} {n}" for m, n in done.items()) + ".")
    if s["cut_lines_skipped"]:
        extra.append(f"{s['cut_lines_skipped']} lines cut by a kill were skipped (their questions re-run on resume).")
    return "\n".join(lines + [""] + [f"- {x}" for x in extra] + ["", "![accuracy](accuracy.png)", ""])


def speed_table(s: dict) -> list[str]:
    """Seconds per question per method, cold and warm, their shares, and the paper's seconds."""
    fp = s["fingerprint"]
    paper_s = any(e.get("paper_seconds") is not None for e in s["methods"].values())
    head = ["method", "", "n", "s/q", "decode", "vision", "group passes", "answer", "other",
            "group passes run"] + (["paper s/q"] if paper_s else [])
    out = ["", "Speed: seconds per question (wall) and where they went (share of the wall seconds; "
               "decode = waiting for frames, vision = preprocessing + vision tower):", "",
           "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for m, e in s["methods"].items():
        t = e["timing"]
        for kind in ("cold", "warm"):
            x = t[kind]
            sh = x.get("wall_share") or {}
            cells = [NAMES.get(m, m), kind, str(x["n"]), _num(x["seconds"])]
            cells += [f"{100 * sh[k]:.0f}%" if k in sh else "-"
                      for k in ("decode", "vision", "group_pass", "answer", "other")]
            cells.append("-" if x.get("group_passes") is None else
                         f"{x['group_passes']:.1f} / {x['groups'] or 0:.1f}")
            if paper_s:
                cells.append(_num(e.get("paper_seconds"), "{:.1f}"))
            out.append("| " + " | ".join(cells) + " |")
    if paper_s:
        same = fp.get("config_name") == "paper"
        out += ["", "Paper s/q: Table 1 of arXiv 2603.28696, seconds per question of AdaptToken-Lite / "
                    "AdaptToken with Qwen2.5-VL-7B at 4096 frames and budget 7040 on the authors' GPU"
                + ("." if same else f"; this run samples {fp['num_frames']} frames with budget "
                                     f"{fp['budget']}, so the two are not like for like.")]
    return out


def plot(s: dict, path: Path) -> None:
    from PIL import Image, ImageDraw
    ms = list(s["methods"])
    W, H, L, B, T = 120 + 110 * max(1, len(ms)), 360, 60, 60, 40
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    y0, y1 = H - B, T
    d.rectangle([L, y1, W - 20, y0], outline=(0, 0, 0))
    for v in range(0, 101, 20):
        y = y0 + (y1 - y0) * v / 100
        d.line([L, y, W - 20, y], fill=(225, 225, 225))
        d.text((L - 34, y - 6), f"{v}%", fill=(0, 0, 0))
    d.text((L, 10), f"{s['bench']} ({s['profile']}): {MAIN_NAME[s['bench']]} with 95% interval; "
                    f"x = paper", fill=(0, 0, 0))
    for i, m in enumerate(ms):
        e = s["methods"][m]
        mt = e["metrics"]["main"]
        x = L + 30 + 110 * i
        if mt.get("acc") is not None:
            d.rectangle([x, y0 + (y1 - y0) * mt["acc"], x + 50, y0], fill=(230, 120, 20) if m != "native" else (120, 120, 120))
            lo, hi = mt["ci95"]
            d.line([x + 25, y0 + (y1 - y0) * lo, x + 25, y0 + (y1 - y0) * hi], fill=(0, 0, 0), width=2)
        p = (e.get("paper") or {}).get("acc")
        if p is not None:
            y = y0 + (y1 - y0) * p / 100
            d.line([x + 15, y - 6, x + 35, y + 6], fill=(40, 120, 220), width=2)
            d.line([x + 15, y + 6, x + 35, y - 6], fill=(40, 120, 220), width=2)
        d.text((x, y0 + 8), m[:14], fill=(0, 0, 0))
    im.save(path)


def write(out, profile: str | None = None, expected: int | None = None) -> dict:
    """Score OUT's rows and write report.md, report.json, accuracy.png (suffixed with the profile
    when re-scored under another one)."""
    out = Path(out)
    s = summarize(out, profile, expected)
    suffix = "" if s["profile"] == s["run_profile"] else f".{s['profile']}"
    (out / f"report{suffix}.json").write_text(json.dumps(s, indent=1))
    (out / f"report{suffix}.md").write_text(markdown(s).replace("accuracy.png", f"accuracy{suffix}.png"))
    plot(s, out / f"accuracy{suffix}.png")
    return s
