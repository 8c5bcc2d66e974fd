"""Kept-token sets of AdaptToken and Lite on the synthetic benchmark, saved per video, and a
comparison of two such runs (made before and after a change to the selection).

    python docs/bench_synthetic/compare_selections.py run --lengths 2048 4096 --count 12 \
        --videos VIDEO_DIR --out before.json
    python docs/bench_synthetic/compare_selections.py compare before.json after.json

Same videos, questions and settings as `python -m adapttoken bench synthetic` (its own functions
make them); only the methods that use redundancy removal are run.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def run(args) -> None:
    import torch
    from adapttoken.bench import synthetic as bs
    from adapttoken.cli import default_model_dir
    from adapttoken.models.base import Question, load_model
    from adapttoken.pipeline import ask
    torch.set_num_threads(args.threads)
    vdir = Path(args.videos)
    vdir.mkdir(parents=True, exist_ok=True)
    jobs = [(str(vdir / f"synth_{args.attribute}_{L}_{bs.sample_seed(args.seed, L, i)}.mp4"), L,
             bs.sample_seed(args.seed, L, i), args.attribute)
            for L in args.lengths for i in range(args.count)]
    samples = bs.generate(jobs, 1)
    model = load_model(args.model or default_model_dir(), dtype="auto", device="cpu")
    rows = []
    for s, job in zip(samples, jobs):
        L = job[1]
        cfg = bs.bench_config(L, args.budget, args.group_size, args.stop_threshold)
        q = s["questions"][0]
        question = Question(q["text"], tuple(q["options"]))
        model.clear_cache()
        for m in args.methods:
            t0 = time.perf_counter()
            res = ask(model, s["video_path"], question, config=cfg, method=m, fresh_features=True)
            wall = time.perf_counter() - t0
            tps = res.tokens_per_slice
            cols = max(k["col"] for k in res.kept_tokens) + 1 if res.kept_tokens else 1
            kept = sorted((k["slice"], k["row"], k["col"]) for k in res.kept_tokens)
            rows.append({"length": L, "seed": s["seed"], "method": m, "answer": res.answer,
                         "correct": bs.is_correct(q, res.answer), "budget": res.budget,
                         "tokens_per_slice": tps, "kept": kept,
                         "redundant_dropped": res.redundant_dropped,
                         "allocate_s": res.seconds.get("allocate"), "seconds": round(wall, 3),
                         "group_budget": [g.budget for g in res.groups],
                         "group_kept": [g.kept for g in res.groups]})
            print(f"{L} {s['seed']} {m}: correct={rows[-1]['correct']} kept={len(kept)} "
                  f"dropped={res.redundant_dropped} {wall:.1f}s", flush=True)
    Path(args.out).write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}))


def compare(args) -> None:
    a = {(r["length"], r["seed"], r["method"]): r for r in json.loads(Path(args.before).read_text())["rows"]}
    b = {(r["length"], r["seed"], r["method"]): r for r in json.loads(Path(args.after).read_text())["rows"]}
    keys = sorted(set(a) & set(b))
    print("| length | method | videos | accuracy before | accuracy after | answers changed | "
          "identical kept sets | mean Jaccard | min Jaccard | kept / budget before | "
          "kept / budget after | dropped as redundant before -> after |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for L in sorted({k[0] for k in keys}):
        for m in sorted({k[2] for k in keys}):
            ks = [k for k in keys if k[0] == L and k[2] == m]
            if not ks:
                continue
            jac, same = [], 0
            for k in ks:
                x, y = set(map(tuple, a[k]["kept"])), set(map(tuple, b[k]["kept"]))
                jac.append(len(x & y) / max(1, len(x | y)))
                same += x == y
            acc_a = np.mean([a[k]["correct"] for k in ks])
            acc_b = np.mean([b[k]["correct"] for k in ks])
            changed = sum(a[k]["answer"] != b[k]["answer"] for k in ks)
            ka = np.mean([len(a[k]["kept"]) / a[k]["budget"] for k in ks])
            kb = np.mean([len(b[k]["kept"]) / b[k]["budget"] for k in ks])
            da = np.mean([a[k]["redundant_dropped"] for k in ks])
            db = np.mean([b[k]["redundant_dropped"] for k in ks])
            print(f"| {L} | {m} | {len(ks)} | {acc_a:.3f} | {acc_b:.3f} | {changed} | {same} | "
                  f"{np.mean(jac):.3f} | {np.min(jac):.3f} | {ka:.3f} | {kb:.3f} | {da:.1f} -> {db:.1f} |")


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--lengths", type=int, nargs="+", default=[2048, 4096])
    r.add_argument("--count", type=int, default=12)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--attribute", default="colour")
    r.add_argument("--budget", type=int, default=256)
    r.add_argument("--group-size", type=int, default=64)
    r.add_argument("--stop-threshold", type=float, default=0.2)
    r.add_argument("--methods", nargs="+", default=["adapttoken", "lite"])
    r.add_argument("--model", default=None)
    r.add_argument("--threads", type=int, default=2)
    r.add_argument("--videos", required=True)
    r.add_argument("--out", required=True)
    c = sub.add_parser("compare")
    c.add_argument("before")
    c.add_argument("after")
    args = ap.parse_args()
    run(args) if args.cmd == "run" else compare(args)


if __name__ == "__main__":
    main()
