"""Print the summary tables of docs/bench_synthetic_tasks/ from the per-task results.json files.

    python docs/bench_synthetic_tasks/summary.py
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE.parents[1]))          # this checkout's adapttoken, not an installed one
from adapttoken.training.synthetic import TASK_DEFAULTS  # noqa: E402

TASKS = ("colour", "shape", "count", "order", "large")
METHODS = ("adapttoken", "lite", "even_split", "uniform")
NAMES = {"adapttoken": "AdaptToken", "lite": "Lite", "even_split": "Even split", "uniform": "Uniform frames",
         "adapttoken_softmax": "softmax relevance", "adapttoken_no_redundancy": "no redundancy removal"}


def cell(e) -> str:
    if e is None:
        return "-"
    return f"{100 * e['acc']:.0f}% ({e['correct']}/{e['n']}, {100 * e['ci95'][0]:.0f}-{100 * e['ci95'][1]:.0f})"


def load(task: str, length: int):
    p = HERE / f"{task}_{length}" / "results.json"
    return json.loads(p.read_text()) if p.is_file() else None


def main() -> None:
    for length in (2048, 4096, 10000):
        rows = [(t, load(t, length)) for t in TASKS]
        rows = [(t, r) for t, r in rows if r]
        if not rows:
            continue
        print(f"\n{length} frames (20 videos per task, multiple choice):\n")
        print("| task | budget | " + " | ".join(NAMES[m] for m in METHODS) + " | Lite passes |")
        print("| --- | --- | " + " | ".join("---" for _ in METHODS) + " | --- |")
        for t, r in rows:
            tab = r["summary"]["table"]
            lite = tab.get(f"{length}/lite")
            share = f"{100 * lite['pass_share']:.0f}% of {lite['groups']:.0f}" if lite else "-"
            print(f"| {t} | {TASK_DEFAULTS[t].budget} | " + " | ".join(cell(tab.get(f"{length}/{m}")) for m in METHODS)
                  + f" | {share} |")
        ev = [(t, r) for t, r in rows if "evidence_recall" in r["summary"]["table"].get(f"{length}/adapttoken", {})]
        if ev:
            print(f"\nEvidence kept by the selection at {length} frames (needles with a token of their own kept "
                  "/ videos with every needle kept):\n")
            print("| task | " + " | ".join(NAMES[m] for m in METHODS) + " |")
            print("| --- | " + " | ".join("---" for _ in METHODS) + " |")
            for t, r in ev:
                tab = r["summary"]["table"]
                print(f"| {t} | " + " | ".join(
                    f"{100 * tab[f'{length}/{m}']['evidence_recall']:.0f}% / "
                    f"{100 * tab[f'{length}/{m}']['evidence_complete']:.0f}%" if f"{length}/{m}" in tab else "-"
                    for m in METHODS) + " |")
        abl = [(t, r) for t, r in rows if f"{length}/adapttoken_softmax" in r["summary"]["table"]]
        if abl:
            cols = ("adapttoken", "adapttoken_softmax", "adapttoken_no_redundancy")
            print(f"\nAblation at {length} frames:\n")
            print("| task | " + " | ".join(NAMES[m] for m in cols) + " |")
            print("| --- | " + " | ".join("---" for _ in cols) + " |")
            for t, r in abl:
                tab = r["summary"]["table"]
                print(f"| {t} | " + " | ".join(cell(tab.get(f"{length}/{m}")) for m in cols) + " |")


if __name__ == "__main__":
    main()
