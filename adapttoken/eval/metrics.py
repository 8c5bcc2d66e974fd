"""Each benchmark's metric, as the benchmark defines it (docs/EVAL.md cites each).

Input: the rows of one method (dicts with `correct`, `fields`, `error`). Every question counts: an
error row (missing or unreadable video, a failed run) and a parse failure are wrong answers; their
numbers are reported beside the accuracy.

* videomme: overall accuracy; by `duration` (short / medium / long); also by domain, task type.
* mlvu: M-Avg = the unweighted mean of the 7 task accuracies (not the micro average, which is
  reported too, labelled as such).
* longvideobench: overall accuracy; by `duration_group` (15 / 60 / 600 / 3600); by category.
* lvbench: overall accuracy; by `question_type`, a question with several types counting in each.
* jsonl: overall accuracy; by `category` when given.
"""
from __future__ import annotations

import math
from collections import defaultdict

MAIN = {"videomme": "overall", "mlvu": "m_avg", "longvideobench": "overall", "lvbench": "overall",
        "jsonl": "overall"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% (z = 1.96) Wilson score interval of k successes in n trials, as fractions."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


def acc_entry(k: int, n: int) -> dict:
    lo, hi = wilson(k, n)
    return {"acc": (k / n) if n else None, "correct": k, "n": n, "ci95": [round(lo, 6), round(hi, 6)]}


def _by(rows, key) -> dict:
    """Accuracy per value of fields[key]; a list value counts the row under each of its values."""
    groups = defaultdict(lambda: [0, 0])
    for r in rows:
        v = (r.get("fields") or {}).get(key)
        for x in (v if isinstance(v, list) else [v]):
            if x is None or x == "":
                continue
            groups[str(x)][0] += bool(r["correct"])
            groups[str(x)][1] += 1
    return {k: acc_entry(*v) for k, v in sorted(groups.items())}


def macro(per_task: dict) -> dict:
    """Unweighted mean of the per-task accuracies, with a normal interval from the per-task
    binomial variances (sum p(1-p)/n / T^2): the tasks are fixed strata, not a sample."""
    accs = [(e["acc"], e["n"]) for e in per_task.values() if e["n"]]
    if not accs:
        return {"acc": None, "n": 0, "tasks": 0, "ci95": [0.0, 0.0]}
    m = sum(a for a, _ in accs) / len(accs)
    var = sum(a * (1 - a) / n for a, n in accs) / len(accs) ** 2
    h = 1.96 * math.sqrt(var)
    return {"acc": m, "n": sum(n for _, n in accs), "tasks": len(accs),
            "ci95": [round(max(0.0, m - h), 6), round(min(1.0, m + h), 6)]}


def compute(bench: str, rows: list[dict]) -> dict:
    """The metric block of one method: `main` (the headline number), overall, breakdowns, counts."""
    k = sum(bool(r["correct"]) for r in rows)
    out = {"overall": acc_entry(k, len(rows)),
           "errors": sum(1 for r in rows if r.get("error")),
           "parse_failures": sum(1 for r in rows if not r.get("error") and not r.get("letter"))}
    if bench == "videomme":
        out["by_duration"] = {d: e for d, e in _by(rows, "duration").items()}
        out["by_domain"] = _by(rows, "domain")
        out["by_task_type"] = _by(rows, "task_type")
    elif bench == "mlvu":
        out["by_task"] = _by(rows, "task")
        out["m_avg"] = macro(out["by_task"])
        out["micro_avg"] = out["overall"]
    elif bench == "longvideobench":
        out["by_duration_group"] = _by(rows, "duration_group")
        out["by_question_category"] = _by(rows, "question_category")
    elif bench == "lvbench":
        out["by_question_type"] = _by(rows, "question_type")
    else:
        cat = _by(rows, "category")
        if cat:
            out["by_category"] = cat
    out["main"] = out[MAIN[bench]]
    return out
