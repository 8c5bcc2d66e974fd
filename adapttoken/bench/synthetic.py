"""Synthetic long-video benchmark: accuracy of AdaptToken, Lite and the baselines at the same budget.

    python -m adapttoken bench synthetic --lengths 512 2048 4096 10000 --count 30 --seed 0 \\
        --out docs/bench_synthetic
    python -m adapttoken bench synthetic --task count --lengths 2048 4096 10000 --count 20 \\
        --out docs/bench_synthetic_tasks/count

--task colour|shape|count|order|large runs one task family of `training.synthetic` (TASKS) at its
committed defaults (`synthetic.TASK_DEFAULTS`: budget, group size, needle frames and size, events
per video; --budget / --group-size override them, and the README then says so). Without --task the
single-needle "what" question of --attribute is asked (the original benchmark). At the
--ablation-lengths (default 4096) AdaptToken also runs with softmax relevance
("adapttoken_softmax") and without redundancy removal ("adapttoken_no_redundancy").
Open answers (--form open) are right when the normalised words match exactly (numbers as digits or
words: `synthetic.normalize_answer`).

For each length (frames, all of them sampled, 8 fps) and each of `count` seeds, a video is
generated with one needle (a coloured shape shown for 4-8 frames among grey distractors) and a
multiple-choice "what" question (colour, shape or both; 4 options); every method answers it with
the same model and the same token budget:

* adapttoken: group passes over every group, entropy budget split, redundancy removal;
* lite: groups in order, stop once --stop-confirm groups (default 2) had H / H_max < stop threshold
  and the same favoured answer (entropy.StopRule; 1 = the paper's first confident group), and the
  answer over the tokens chosen so far favours it too (the answer check; --no-stop-check: off);
* uniform: as many evenly spaced slices as the budget holds, no group pass;
* even_split: attention ranking with budget / G tokens per group (FlexSelect-style).

Per video, lite and adapttoken run first on fresh vision features (their seconds are end to end:
decoding, vision tower, group passes, answer); even_split and uniform then reuse the cached
features (their seconds exclude decoding and the vision tower). Group entropies of the adapttoken
run, split by whether the group's frames show the needle, give the entropy figure.

Writes to --out: results.json (every question), README.md (the table and the command),
accuracy.png (accuracy per length and method) and entropy.png (group entropy with and without the
needle in view). Intervals are 95% Wilson score intervals.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..defaults import QUANTIZATION_CHOICES
from ..eval.metrics import wilson

METHODS = ("adapttoken", "lite", "uniform", "even_split")
ORDER = ("lite", "adapttoken", "even_split", "uniform", "adapttoken_softmax",
         "adapttoken_no_redundancy")                        # fresh features first (see doc)
# AdaptToken ablations: method name -> AdaptTokenConfig changes (run with method "adapttoken")
ABLATIONS = {"adapttoken_softmax": {"relevance": "softmax"},
             "adapttoken_no_redundancy": {"redundancy_threshold": None}}
ALL_METHODS = METHODS + tuple(ABLATIONS)


def sample_seed(base: int, length: int, i: int) -> int:
    return base * 1_000_003 + length * 101 + i


def _make(job):
    path, length, seed, attribute = job[:4]
    task = job[4] if len(job) > 4 else None
    group_size = job[5] if len(job) > 5 else None
    from adapttoken.training import synthetic as syn
    meta = Path(str(path) + ".json")
    if Path(path).exists() and meta.exists():
        return json.loads(meta.read_text())
    if task:
        s = syn.make_task_sample(path, task, length, seed, form="both", group_size=group_size)
    else:
        s = syn.make_sample(path, length, seed, kind="what", form="both",
                            attribute=None if attribute == "any" else attribute)
    d = s.to_dict()
    meta.write_text(json.dumps(d))
    return d


def generate(jobs: list, n_proc: int) -> list[dict]:
    if n_proc <= 1 or len(jobs) <= 1:
        return [_make(j) for j in jobs]
    import multiprocessing as mp
    with mp.get_context("spawn").Pool(min(n_proc, len(jobs))) as pool:
        return pool.map(_make, jobs, chunksize=1)


def bench_config(length: int, budget: int, group_size: int, stop: float, confirm: int = 2,
                 check_answer: bool = True):
    from adapttoken.pipeline import AdaptTokenConfig
    return AdaptTokenConfig(num_frames=length, max_pixels=112 * 112, min_pixels=112 * 112,
                            group_size=min(group_size, length // 2), budget=budget,
                            stop_threshold=stop, stop_confirm=confirm,
                            stop_check_answer=check_answer, max_new_tokens=4)


def parse_letter(text: str) -> str:
    t = text.strip().lstrip("(").upper()
    return t[:1] if t[:1] in "ABCD" else ""


def is_correct(q: dict, answer: str) -> bool:
    """Multiple choice: the first letter; open: an exact match of the normalised answer words
    (case and punctuation aside, numbers as digits or words)."""
    from adapttoken.training.synthetic import normalize_answer
    if q["options"]:
        return parse_letter(answer) == q["answer"]
    return normalize_answer(answer) == normalize_answer(q["answer_text"])


def evidence_kept(needles: list[dict], kept_tokens: list[dict]) -> tuple[int, int]:
    """(needles with at least one of their own tokens kept, kept tokens on needles): a token is the
    needle's when its slice shows the needle and its (row, col) cell holds needle pixels."""
    from adapttoken.training.synthetic import Needle
    cells = [set(map(tuple, Needle(**nd).tokens())) for nd in needles]
    hits, toks = 0, 0
    for nd, c in zip(needles, cells):
        n = sum(1 for k in kept_tokens if nd["frame_start"] - 1 <= k["frame_index"] < nd["frame_end"]
                and (k["row"], k["col"]) in c)
        hits += n > 0
        toks += n
    return hits, toks


def _shown(needles: list[dict], frames) -> bool:
    return any(nd["frame_start"] <= f < nd["frame_end"] for nd in needles for f in frames)


def run_one(model, sample: dict, length: int, methods, cfg, form: str = "mc", task: str | None = None
            ) -> list[dict]:
    """Every method on one video; returns one row per method."""
    from dataclasses import replace

    from adapttoken.question import Question
    from adapttoken.pipeline import ask
    q = sample["questions"][0 if form == "mc" else 1]
    question = Question(q["text"], tuple(q["options"]))
    needles = sample["needles"]
    rows = []
    model.clear_cache()
    for m in [m for m in ORDER if m in methods]:
        fresh = m in ("lite", "adapttoken")
        t0 = time.perf_counter()
        if m in ABLATIONS:
            res = ask(model, sample["video_path"], question, config=replace(cfg, **ABLATIONS[m]),
                      method="adapttoken", fresh_features=False)
        else:
            res = ask(model, sample["video_path"], question, config=cfg, method=m, fresh_features=fresh)
        wall = time.perf_counter() - t0
        letter = parse_letter(res.answer) if q["options"] else res.answer.strip()
        groups = []
        for g in res.groups:
            groups.append({"group": g.group, "entropy_norm": g.entropy_norm,
                           "needle": _shown(needles, g.frame_indices), "budget": g.budget})
        kept_needle = sum(1 for k in res.kept_tokens if any(
            nd["frame_start"] - 1 <= k["frame_index"] < nd["frame_end"] for nd in needles))
        ev_hit, ev_tok = evidence_kept(needles, res.kept_tokens)
        rows.append({"length": length, "seed": sample["seed"], "method": m, "answer": res.answer,
                     "task": task or "what", "events": len(needles),
                     "letter": letter, "truth": q["answer"], "correct": is_correct(q, res.answer),
                     "form": form,
                     "attribute": q["attribute"], "option_probs": res.option_probs,
                     "group_passes": res.group_passes, "groups": len(res.groups),
                     "skipped": len(res.skipped_groups), "seconds": round(wall, 4),
                     "fresh_features": fresh, "kept": len(res.kept_tokens),
                     "kept_in_needle_slices": kept_needle,
                     "evidence_kept": ev_hit, "evidence_tokens_kept": ev_tok,
                     "group_entropy": groups if m == "adapttoken" else None})
    return rows


def _worker(args):
    model_dir, device, dtype, items, methods, budget, group_size, stop, threads, form = args[:10]
    task = args[10] if len(args) > 10 else None
    ablation_lengths = args[11] if len(args) > 11 else ()
    quantization = args[12] if len(args) > 12 else None
    confirm = args[13] if len(args) > 13 else 2
    check_answer = args[14] if len(args) > 14 else True
    import torch
    torch.set_num_threads(threads)
    from adapttoken.models.loading import load_model
    model = load_model(model_dir, dtype=dtype, device=device, quantization=quantization)
    out = []
    for sample, length in items:
        ms = [m for m in methods if m not in ABLATIONS or length in ablation_lengths]
        rows = run_one(model, sample, length, ms, bench_config(length, budget, group_size, stop, confirm, check_answer), form,
                       task)
        out.extend(rows)
        print(f"{length} frames, seed {sample['seed']}: " + "  ".join(
            f"{r['method']} {'ok' if r['correct'] else 'WRONG'} {r['seconds']:.1f}s" for r in rows), flush=True)
    return out


def summarize(rows: list[dict], lengths, methods) -> dict:
    table = {}
    for L in lengths:
        for m in methods:
            rs = [r for r in rows if r["length"] == L and r["method"] == m]
            if not rs:
                continue
            k, n = sum(r["correct"] for r in rs), len(rs)
            lo, hi = wilson(k, n)
            e = {"correct": k, "n": n, "acc": k / n, "ci95": [round(lo, 4), round(hi, 4)],
                 "seconds_mean": float(np.mean([r["seconds"] for r in rs]))}
            if all("evidence_kept" in r for r in rs):
                e["evidence_recall"] = float(np.mean([r["evidence_kept"] / max(1, r["events"]) for r in rs]))
                e["evidence_complete"] = float(np.mean([r["evidence_kept"] == r["events"] for r in rs]))
            if m == "lite":
                e["pass_share"] = float(np.mean([r["group_passes"] / r["groups"] for r in rs]))
            if m in ("adapttoken", "lite", "even_split"):
                e["groups"] = float(np.mean([r["groups"] for r in rs]))
            table[f"{L}/{m}"] = e
    ent_in = [g["entropy_norm"] for r in rows if r["group_entropy"] for g in r["group_entropy"] if g["needle"]]
    ent_out = [g["entropy_norm"] for r in rows if r["group_entropy"] for g in r["group_entropy"] if not g["needle"]]
    ent = {"in_view": {"n": len(ent_in), "mean": float(np.mean(ent_in)) if ent_in else None,
                       "median": float(np.median(ent_in)) if ent_in else None},
           "not_in_view": {"n": len(ent_out), "mean": float(np.mean(ent_out)) if ent_out else None,
                           "median": float(np.median(ent_out)) if ent_out else None}}
    if ent_in and ent_out:
        a, b = np.asarray(ent_in), np.asarray(ent_out)
        ent["auc"] = float((a[:, None] < b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean())
        ent["in_view_below_stop_0.2"] = float((a < 0.2).mean())
        ent["not_in_view_below_stop_0.2"] = float((b < 0.2).mean())
    return {"table": table, "entropy": ent}


TASK_TEXT = {
    "colour": "one needle (a coloured shape, 4-8 frames, 32-48 px); the question asks its colour",
    "shape": "one needle (a coloured shape, 4-8 frames, 32-48 px); the question asks its shape",
    "count": "1-5 events (a coloured shape inside one token cell, on one 2-frame slice each), each in "
             "a different group; the question asks how many times the colour appeared",
    "order": "two events of two colours (one cell, one slice each), in different groups and at least "
             "a quarter of the video apart; the question asks which colour came first",
    "large": "a pattern of 3-6 coloured tiles (one per token cell) on one slice; the question asks "
             "how many tiles it had (a 1-2 cell crop cannot tell)",
}
NAMES = {"adapttoken": "AdaptToken", "lite": "Lite", "uniform": "Uniform frames",
         "even_split": "Even split", "adapttoken_softmax": "AdaptToken, softmax relevance",
         "adapttoken_no_redundancy": "AdaptToken, no redundancy removal"}


def _cell(e) -> str:
    return ("-" if e is None else
            f"{100 * e['acc']:.1f}% ({e['correct']}/{e['n']}, {100 * e['ci95'][0]:.0f}-{100 * e['ci95'][1]:.0f})")


def markdown(summary: dict, lengths, methods, budget: int, command: str, meta: dict,
             form: str = "mc", attribute: str = "colour", task: str | None = None,
             group_size: int = 64, plots: bool = True) -> str:
    t = summary["table"]
    names = NAMES
    ablations = [m for m in methods if m in ABLATIONS]
    methods = [m for m in methods if m not in ABLATIONS]
    if task:
        head = (f"Task **{task}**: {TASK_TEXT[task]}. " +
                ("Multiple choice (4 options, chance 25%)" if form == "mc" else
                 "Open questions (correct = an exact match of the normalised answer words, numbers as "
                 "digits or words)") +
                f"; budget {budget} tokens and groups of {group_size} slices for every method. "
                "Accuracy: correct / questions (95% Wilson interval).")
    else:
        head = ((f"Single-needle multiple-choice questions (4 options, chance 25%), budget {budget} "
                 if form == "mc" else
                 f"Single-needle open questions (answer: a colour, a shape or both; correct = the exact "
                 f"words), budget {budget} ") +
                "tokens for every method. The question asks for the needle's " +
                {"colour": "colour", "shape": "shape", "both": "colour and shape",
                 "any": "colour, shape or both (drawn per seed)"}[attribute] +
                ". Accuracy: correct / questions (95% Wilson interval).")
    lines = ["# Synthetic long-video benchmark" + (f": {task}" if task else ""), "", head, "",
             "| frames | " + " | ".join(names[m] for m in methods) + " | Lite passes | seconds: " +
             " / ".join(names[m] for m in methods) + " |",
             "| --- | " + " | ".join("---" for _ in methods) + " | --- | --- |"]
    for L in lengths:
        cells = [_cell(t.get(f"{L}/{m}")) for m in methods]
        lite = t.get(f"{L}/lite")
        share = f"{100 * lite['pass_share']:.0f}% of {lite['groups']:.0f}" if lite else "-"
        secs = " / ".join(f"{t[f'{L}/{m}']['seconds_mean']:.2f}" if f"{L}/{m}" in t else "-" for m in methods)
        lines.append(f"| {L} | " + " | ".join(cells) + f" | {share} | {secs} |")
    if any("evidence_recall" in e for e in t.values()):
        cols = methods + ablations
        lines += ["", "Evidence the selection kept (what the allocation adds, whatever the model then "
                  "answers): share of the needles (events, tiles) with at least one of their own tokens "
                  "kept / share of videos with every needle kept:", "",
                  "| frames | " + " | ".join(names[m] for m in cols) + " |",
                  "| --- | " + " | ".join("---" for _ in cols) + " |"]
        for L in lengths:
            lines.append(f"| {L} | " + " | ".join(
                "-" if "evidence_recall" not in t.get(f"{L}/{m}", {}) else
                f"{100 * t[f'{L}/{m}']['evidence_recall']:.0f}% / {100 * t[f'{L}/{m}']['evidence_complete']:.0f}%"
                for m in cols) + " |")
    abl_lengths = [L for L in lengths if any(f"{L}/{m}" in t for m in ablations)]
    if abl_lengths:
        cols = ["adapttoken"] + ablations
        lines += ["", "Ablation of AdaptToken (same videos, budget and groups; default: linear relevance "
                  "and redundancy removal at cosine 0.9):", "",
                  "| frames | " + " | ".join(names[m] for m in cols) + " |",
                  "| --- | " + " | ".join("---" for _ in cols) + " |"]
        for L in abl_lengths:
            lines.append(f"| {L} | " + " | ".join(_cell(t.get(f"{L}/{m}")) for m in cols) + " |")
    e = summary["entropy"]
    lines += ["", ("Group entropy (H / H_max of the option letters)" if form == "mc" else
                   "Group entropy of the first answer token (H / ln V)") +
              " in AdaptToken's group passes:", "",
              f"- needle in view: {e['in_view']['n']} groups, mean {e['in_view']['mean'] or 0:.3f}, "
              f"median {e['in_view']['median'] or 0:.3f}",
              f"- needle not in view: {e['not_in_view']['n']} groups, mean {e['not_in_view']['mean'] or 0:.3f}, "
              f"median {e['not_in_view']['median'] or 0:.3f}"]
    if "auc" in e:
        lines += [f"- P(H in view < H not in view) = {e['auc']:.3f}; share below Lite's stop threshold "
                  f"0.2: {100 * e['in_view_below_stop_0.2']:.1f}% in view, "
                  f"{100 * e['not_in_view_below_stop_0.2']:.1f}% not in view"]
    lines += ["", "Seconds per question: Lite and AdaptToken end to end on fresh features "
              "(decode, vision tower, group passes, answer); even split and uniform reuse the cached "
              "features. Lite passes: mean share of group passes Lite ran (of the mean number of groups).",
              *(["", "![accuracy](accuracy.png)", "", "![entropy](entropy.png)"] if plots else []), "",
              "Reproduce:", "", "```", command, "```", "",
              "Machine: " + ", ".join(f"{k} {v}" for k, v in meta.items()), ""]
    return "\n".join(lines)


# --- plots (PIL only) ------------------------------------------------------------------------------

COLORS = {"adapttoken": (230, 120, 20), "lite": (40, 120, 220), "uniform": (120, 120, 120),
          "even_split": (40, 160, 80)}


def plot_accuracy(summary: dict, lengths, methods, path: Path) -> None:
    from PIL import Image, ImageDraw
    W, H, L, R, T, B = 720, 420, 60, 170, 30, 50
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    x0, x1, y0, y1 = L, W - R, H - B, T
    d.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    for v in range(0, 101, 20):
        y = y0 + (y1 - y0) * v / 100
        d.line([x0, y, x1, y], fill=(225, 225, 225))
        d.text((x0 - 32, y - 6), f"{v}%", fill=(0, 0, 0))
    yc = y0 + (y1 - y0) * 0.25
    d.line([x0, yc, x1, yc], fill=(200, 80, 80))
    d.text((x0 + 4, yc - 12), "chance", fill=(200, 80, 80))
    xs = {Lh: x0 + (x1 - x0) * (i + 0.5) / len(lengths) for i, Lh in enumerate(lengths)}
    for Lh, x in xs.items():
        d.text((x - 14, y0 + 8), str(Lh), fill=(0, 0, 0))
    d.text(((x0 + x1) // 2 - 40, H - 20), "frames per video", fill=(0, 0, 0))
    d.text((x0, 8), "accuracy, single-needle MC (same token budget)", fill=(0, 0, 0))
    for j, m in enumerate(methods):
        pts = []
        for Lh in lengths:
            e = summary["table"].get(f"{Lh}/{m}")
            if e is None:
                continue
            x = xs[Lh] + (j - 1.5) * 4
            y = y0 + (y1 - y0) * e["acc"]
            ylo, yhi = y0 + (y1 - y0) * e["ci95"][0], y0 + (y1 - y0) * e["ci95"][1]
            d.line([x, ylo, x, yhi], fill=COLORS[m])
            pts.append((x, y))
        if len(pts) > 1:
            d.line(pts, fill=COLORS[m], width=2)
        for x, y in pts:
            d.ellipse([x - 3, y - 3, x + 3, y + 3], fill=COLORS[m])
        d.rectangle([x1 + 14, T + 20 * j, x1 + 26, T + 20 * j + 10], fill=COLORS[m])
        d.text((x1 + 32, T + 20 * j - 1), m, fill=(0, 0, 0))
    im.save(path)


def plot_entropy(rows: list[dict], path: Path, bins: int = 20, form: str = "mc") -> None:
    from PIL import Image, ImageDraw
    ent_in = np.asarray([g["entropy_norm"] for r in rows if r["group_entropy"]
                         for g in r["group_entropy"] if g["needle"]])
    ent_out = np.asarray([g["entropy_norm"] for r in rows if r["group_entropy"]
                          for g in r["group_entropy"] if not g["needle"]])
    W, H, L, R, T, B = 720, 420, 60, 30, 50, 50
    im = Image.new("RGB", (W, H), "white")
    d = ImageDraw.Draw(im)
    x0, x1, y0, y1 = L, W - R, H - B, T
    d.rectangle([x0, y1, x1, y0], outline=(0, 0, 0))
    edges = np.linspace(0, 1, bins + 1)
    hin = np.histogram(np.clip(ent_in, 0, 1), edges)[0] / max(1, len(ent_in))
    hout = np.histogram(np.clip(ent_out, 0, 1), edges)[0] / max(1, len(ent_out))
    top = max(hin.max(initial=0), hout.max(initial=0), 1e-9)
    bw = (x1 - x0) / bins
    for i in range(bins):
        for k, (h, col) in enumerate(((hout, (120, 120, 120)), (hin, (230, 120, 20)))):
            xa = x0 + i * bw + 1 + k * bw / 2
            d.rectangle([xa, y0 - (y0 - y1) * h[i] / top, xa + bw / 2 - 2, y0], fill=col)
    for v in (0, 0.2, 0.4, 0.6, 0.8, 1.0):
        x = x0 + (x1 - x0) * v
        d.text((x - 8, y0 + 8), f"{v:.1f}", fill=(0, 0, 0))
    xs = x0 + (x1 - x0) * 0.2
    d.line([xs, y1, xs, y0], fill=(40, 120, 220))
    d.text((xs + 4, y1 + 4), "Lite stop 0.2", fill=(40, 120, 220))
    d.text(((x0 + x1) // 2 - 90, H - 22), "group entropy H / H_max (4 options)" if form == "mc" else
           "group entropy of the first answer token, H / ln V", fill=(0, 0, 0))
    d.text((x0, 8), f"needle in view ({len(ent_in)} groups, orange) vs not in view "
                    f"({len(ent_out)} groups, grey); share of groups per bin", fill=(0, 0, 0))
    im.save(path)


# --- main ------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="python -m adapttoken bench synthetic",
                                 description="Accuracy of AdaptToken, Lite and baselines on seeded "
                                             "synthetic long videos (bundled model by default).")
    ap.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 4096, 10000],
                    help="video lengths in frames (all frames are sampled)")
    ap.add_argument("--count", type=int, default=20, help="videos per length")
    ap.add_argument("--seed", type=int, default=0, help="base seed (video i of length L uses "
                                                         "seed*1000003 + L*101 + i)")
    ap.add_argument("--methods", nargs="+", choices=ALL_METHODS, default=list(ALL_METHODS),
                    help="methods (the adapttoken_* ablations run at --ablation-lengths only)")
    ap.add_argument("--form", choices=["mc", "open"], default="mc",
                    help="multiple choice (4 options) or open questions (the answer words)")
    ap.add_argument("--attribute", choices=["colour", "shape", "both", "any"], default="colour",
                    help="what the question asks about the needle (any: drawn from the seed)")
    ap.add_argument("--task", choices=["colour", "shape", "count", "order", "large"], default=None,
                    help="task family at its committed defaults (synthetic.TASK_DEFAULTS); without it "
                         "the single-needle question of --attribute")
    ap.add_argument("--ablation-lengths", type=int, nargs="*", default=[4096],
                    help="lengths at which AdaptToken also runs with softmax relevance and without "
                         "redundancy removal (none: skip)")
    ap.add_argument("--budget", type=int, default=None,
                    help="visual tokens kept, every method (default: the task's, else 256)")
    ap.add_argument("--group-size", type=int, default=None,
                    help="slices per group (default: the task's, else 64)")
    ap.add_argument("--stop-threshold", type=float, default=0.2, help="Lite's H / H_max stop")
    ap.add_argument("--stop-confirm", type=int, default=2,
                    help="Lite: confident groups that must agree on the answer before it stops "
                         "(1: the paper's first confident group)")
    ap.add_argument("--no-stop-check", dest="stop_check", action="store_false",
                    help="Lite: stop on the confident groups alone, without the answer check")
    ap.add_argument("--model", default=None, help="model folder (default: the bundled tiny model)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--quantization", choices=QUANTIZATION_CHOICES, default="none",
                    help="the model's language-model weights in 4-bit NF4 or 8-bit (bitsandbytes), "
                         "or fp8 (float8 matmuls, language model and vision tower)")
    ap.add_argument("--out", default="docs/bench_synthetic", help="folder for the table and plots")
    ap.add_argument("--videos", default=None, help="folder to keep the generated videos "
                                                   "(default: a temporary folder)")
    ap.add_argument("--jobs", type=int, default=1, help="processes for generating and evaluating")
    ap.add_argument("--no-plots", action="store_true")
    ap.add_argument("--generate-only", action="store_true",
                    help="write the videos to --videos and stop (a later run with the same --videos "
                         "reuses them)")
    return ap


def main(argv=None) -> int:
    args = build_parser().parse_args(list(sys.argv[1:] if argv is None else argv))
    from adapttoken.defaults import default_model_dir
    model_dir = args.model or default_model_dir()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = None
    if args.videos:
        vdir = Path(args.videos)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="adapttoken_bench_")
        vdir = Path(tmp.name)
    vdir.mkdir(parents=True, exist_ok=True)
    lengths = list(dict.fromkeys(args.lengths))
    methods = [m for m in ALL_METHODS if m in args.methods]
    abl = tuple(args.ablation_lengths or ())
    if args.task:
        from adapttoken.training.synthetic import TASK_DEFAULTS
        d = TASK_DEFAULTS[args.task]
        budget = args.budget or d.budget
        group_size = args.group_size or d.group_size
    else:
        budget, group_size = args.budget or 256, args.group_size or 64
    tag = f"task_{args.task}" if args.task else args.attribute
    t0 = time.perf_counter()
    jobs = [(str(vdir / f"synth_{tag}_{L}_{sample_seed(args.seed, L, i)}.mp4"), L,
             sample_seed(args.seed, L, i), args.attribute, args.task, min(group_size, max(1, L // 2)))
            for L in lengths for i in range(args.count)]
    samples = generate(jobs, args.jobs)
    gen_s = time.perf_counter() - t0
    print(f"generated {len(samples)} videos in {gen_s:.1f} s ({vdir})", flush=True)
    if args.generate_only:
        return 0
    items = [(s, j[1]) for s, j in zip(samples, jobs)]
    t1 = time.perf_counter()
    if args.jobs <= 1:
        rows = _worker((model_dir, args.device, args.dtype, items, methods, budget,
                        group_size, args.stop_threshold, max(1, min(2, os.cpu_count() or 1)), args.form,
                        args.task, abl, args.quantization, args.stop_confirm, args.stop_check))
    else:
        import multiprocessing as mp
        n = min(args.jobs, len(items))
        parts = [items[i::n] for i in range(n)]
        threads = max(1, (os.cpu_count() or 2) // n)
        with mp.get_context("spawn").Pool(n) as pool:
            res = pool.map(_worker, [(model_dir, args.device, args.dtype, p, methods, budget,
                                      group_size, args.stop_threshold, threads, args.form, args.task, abl,
                                      args.quantization, args.stop_confirm, args.stop_check)
                                     for p in parts])
        rows = [r for part in res for r in part]
    eval_s = time.perf_counter() - t1
    rows.sort(key=lambda r: (r["length"], r["seed"], ALL_METHODS.index(r["method"])))
    summary = summarize(rows, lengths, methods)
    import torch
    meta = {"python": platform.python_version(), "torch": torch.__version__,
            "device": (torch.cuda.get_device_name(0) if args.device in ("auto", "cuda") and torch.cuda.is_available()
                       else f"cpu x{os.cpu_count()}"), "jobs": args.jobs,
            "generation_s": round(gen_s, 1), "evaluation_s": round(eval_s, 1),
            "stop_threshold": args.stop_threshold, "stop_confirm": args.stop_confirm,
            "stop_check_answer": args.stop_check}
    try:
        import transformers
        meta["transformers"] = transformers.__version__
    except ImportError:
        pass
    cmd = ("python -m adapttoken bench synthetic" + (f" --task {args.task}" if args.task else "") +
           " --lengths " + " ".join(map(str, lengths)) +
           f" --count {args.count} --seed {args.seed} --form {args.form}" +
           ("" if args.task else f" --attribute {args.attribute}") +
           (f" --budget {budget}" if args.budget or not args.task else "") +
           (f" --group-size {group_size}" if args.group_size or not args.task else "") +
           (" --ablation-lengths " + " ".join(map(str, abl)) if abl != (4096,) else "") +
           (f" --stop-confirm {args.stop_confirm}" if args.stop_confirm != 2 else "")
           + ("" if args.stop_check else " --no-stop-check")
           + (" --methods " + " ".join(methods) if set(methods) != set(ALL_METHODS) else "")
           + (f" --model {args.model}" if args.model else "") + f" --out {args.out}"
           + (" --no-plots" if args.no_plots else ""))
    (out / "results.json").write_text(json.dumps({"command": cmd, "meta": meta, "summary": summary,
                                                  "rows": rows}, indent=1) + "\n")
    md = markdown(summary, lengths, methods, budget, cmd, meta, args.form, args.attribute, args.task,
                  group_size, plots=not args.no_plots)
    (out / "README.md").write_text(md)
    if not args.no_plots:
        plot_accuracy(summary, lengths, [m for m in methods if m in METHODS], out / "accuracy.png")
        plot_entropy(rows, out / "entropy.png", form=args.form)
    print(md)
    print(f"wrote {out}/README.md, results.json" + ("" if args.no_plots else ", accuracy.png, entropy.png"))
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
