"""Tiny benchmark data sets in each benchmark's exact on-disk layout (docs/EVAL.md), with videos
from the synthetic generator (32 frames, 112x112, the bundled model's size) and known answers.

Every video gets two questions: its colour question, and the same with the options rotated by
one (so the correct letter differs)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

LETTERS = "ABCDE"
# settings the bundled tiny model suits (adapttoken/demo.py's demo_config, smaller)
TINY_ARGS = ["--frames", "32", "--budget", "64", "--max-pixels", "12544", "--min-pixels", "12544",
             "--group-size", "4", "--native-frames", "16", "--native-max-pixels", "12544",
             "--native-min-pixels", "12544", "--device", "cpu", "--quiet"]


def make_videos(folder: Path, n: int, frames: int = 32, seed0: int = 100) -> list[dict]:
    """n synthetic videos with their two questions each: [{path, qs: [(text, options, letter)]}]."""
    from adapttoken.training import synthetic as syn
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"v{i}.mp4"
        meta = Path(str(p) + ".json")
        if p.exists() and meta.exists():
            d = json.loads(meta.read_text())
        else:
            s = syn.make_sample(p, frames, seed0 + i, kind="what", form="mc", attribute="colour")
            q = s.questions[0]
            d = {"text": q.text, "options": list(q.options), "answer": q.answer}
            meta.write_text(json.dumps(d))
        opts, a = d["options"], LETTERS.index(d["answer"])
        rot = opts[1:] + opts[:1]
        qs = [(d["text"], opts, d["answer"]), (d["text"], rot, LETTERS[(a - 1) % len(opts)])]
        out.append({"path": p, "qs": qs, "frames": frames})
    return out


def _copy(src: Path, dst: Path) -> None:
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)


def _parquet(path: Path, rows: list[dict]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), str(path))


def write_videomme(root: Path, vids, exts=None, srt: bool = False) -> list[dict]:
    """videomme/test-00000-of-00001.parquet + data/<videoID>.<ext> (+ subtitle/<videoID>.srt)."""
    rows, durs = [], ["short", "medium", "long"]
    for i, v in enumerate(vids):
        vid = f"vm{i:03d}"
        ext = (exts or {}).get(i, ".mp4")
        if ext:
            _copy(v["path"], root / "data" / f"{vid}{ext}")
        for j, (text, opts, ans) in enumerate(v["qs"]):
            rows.append({"video_id": f"{i:03d}", "duration": durs[i % 3], "domain": "Knowledge",
                         "sub_category": "Humanity & History", "url": f"https://example.invalid/{vid}",
                         "videoID": vid, "question_id": f"{i:03d}-{j + 1}", "task_type": "Object Recognition",
                         "question": text, "options": [f"{LETTERS[k]}. {o}" for k, o in enumerate(opts)],
                         "answer": ans})
        if srt:
            (root / "subtitle").mkdir(parents=True, exist_ok=True)
            (root / "subtitle" / f"{vid}.srt").write_text(
                "1\n00:00:00,000 --> 00:00:01,500\n<font color=\"white\" size=\".72c\">hello there</font>\n\n"
                "2\n00:00:01,600 --> 00:00:02,000\n<font color=\"white\" size=\".72c\">second line</font>\n\n"
                "3\n00:01:00,000 --> 00:01:02,000\n<font color=\"white\" size=\".72c\">after the end</font>\n")
    _parquet(root / "videomme" / "test-00000-of-00001.parquet", rows)
    return rows


MLVU_FILES = {"plotQA": "1_plotQA", "findNeedle": "2_needle", "ego": "3_ego", "count": "4_count",
              "order": "5_order", "anomaly_reco": "6_anomaly_reco", "topic_reasoning": "7_topic_reasoning"}


def write_mlvu_json(root: Path, vids, tasks=("plotQA", "findNeedle")) -> None:
    """json/<n>_<task>.json (answer = candidate text) + video/<n>_<task>/<video>; plus a
    generation task (9_summary) that M-Avg leaves out."""
    for k, task in enumerate(tasks):
        stem = MLVU_FILES[task]
        recs = []
        for i, v in enumerate(vids):
            if i % len(tasks) != k:
                continue
            name = f"mlvu_{i}.mp4"
            _copy(v["path"], root / "video" / stem / name)
            for text, opts, ans in v["qs"]:
                recs.append({"video": name, "duration": 4.0, "question": text, "candidates": opts,
                             "answer": opts[LETTERS.index(ans)], "question_type": task})
        (root / "json").mkdir(parents=True, exist_ok=True)
        (root / "json" / f"{stem}.json").write_text(json.dumps(recs))
    (root / "json" / "9_summary.json").write_text(json.dumps(
        [{"video": "mlvu_0.mp4", "duration": 4.0, "question": "Summarise.", "answer": "text",
          "question_type": "summary"}]))


def write_mlvu_parquet(root: Path, vids, tasks=("plotQA", "needle")) -> None:
    """mlvu/test-00000-of-00001.parquet (letter answers, options inside the question, task_type)
    + one flat video folder."""
    rows = []
    for i, v in enumerate(vids):
        name = f"mlvu_{i}.mp4"
        _copy(v["path"], root / "mlvu" / name)
        for j, (text, opts, ans) in enumerate(v["qs"]):
            q = f"Question: {text}\nOptions:\n" + "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(opts))
            rows.append({"video_name": name, "duration": 4.0, "question": q, "answer": ans,
                         "task_type": tasks[i % len(tasks)], "question_id": f"m{i}_{j}"})
    _parquet(root / "mlvu" / "test-00000-of-00001.parquet", rows)


def write_lvb(root: Path, vids, form: str = "json", subtitles: bool = False, five: bool = False) -> None:
    """lvb_val.json (candidates, int correct_choice) or validation-00000-of-00001.parquet
    (option0..4, "N/A"); videos/<video_path>, subtitles/<subtitle_path> in both JSON shapes."""
    recs, groups = [], [15, 60, 600, 3600]
    for i, v in enumerate(vids):
        vp = f"lvb{i}.mp4"
        _copy(v["path"], root / "videos" / vp)
        sp = f"lvb{i}_en.json"
        if subtitles:
            (root / "subtitles").mkdir(parents=True, exist_ok=True)
            shape = ([{"timestamp": [10.0, 11.5], "text": "first"}, {"timestamp": [11.6, "end"], "text": "to the end"}]
                     if i % 2 == 0 else
                     [{"start": "00:00:10.000", "end": "00:00:11.500", "line": "first"},
                      {"start": "00:01:10.000", "end": "00:01:11.000", "line": "much later"}])
            (root / "subtitles" / sp).write_text(json.dumps(shape))
        for j, (text, opts, ans) in enumerate(v["qs"]):
            o = list(opts) + (["extra"] if five and j == 0 else [])
            r = {"video_id": f"lvb{i}", "id": f"lvb{i}_{j}", "video_path": vp, "subtitle_path": sp,
                 "correct_choice": LETTERS.index(ans), "question": text, "duration": 4.0,
                 "duration_group": groups[i % 4], "question_category": "E2O" if j == 0 else "T3O",
                 "topic_category": "NP-News-Programs", "starting_timestamp_for_subtitles": 10.0}
            if form == "json":
                r["candidates"] = o
            else:
                for k in range(5):
                    r[f"option{k}"] = o[k] if k < len(o) else "N/A"
            recs.append(r)
    if form == "json":
        (root / "lvb_val.json").write_text(json.dumps(recs))
    else:
        _parquet(root / "validation-00000-of-00001.parquet", recs)


LVB_TYPES = [["key information retrieval"], ["event understanding", "reasoning"],
             ["entity recognition"], ["temporal grounding", "summarization", "reasoning"]]


def _lvbench_q(text, opts):
    return text + "\n" + "\n".join(f"({LETTERS[k]}) {o}" for k, o in enumerate(opts))


def write_lvbench(root: Path, vids, form: str = "meta", folder: str = "") -> None:
    """video_info.meta.jsonl (nested qa, multi-label question_type) or the flat test.jsonl;
    videos <key>.mp4 (in `folder` under root)."""
    lines = []
    for i, v in enumerate(vids):
        key = f"yt{i:04d}"
        _copy(v["path"], root / folder / f"{key}.mp4")
        qa = [{"uid": f"{i}{j}", "question": _lvbench_q(text, opts), "answer": ans,
               "question_type": LVB_TYPES[(2 * i + j) % 4], "time_reference": "00:01-00:02"}
              for j, (text, opts, ans) in enumerate(v["qs"])]
        base = {"key": key, "type": "cartoon", "video_info": {"duration_minutes": 0.07, "fps": 8.0,
                                                              "resolution": {"width": 112, "height": 112}}}
        if form == "meta":
            lines.append({**base, "qa": qa})
        else:
            lines += [{**base, **q} for q in qa]
    name = "video_info.meta.jsonl" if form == "meta" else "test.jsonl"
    (root / name).write_text("\n".join(json.dumps(x) for x in lines) + "\n")


def write_generic(root: Path, vids) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = []
    for i, v in enumerate(vids):
        _copy(v["path"], root / "clips" / f"c{i}.mp4")
        for j, (text, opts, ans) in enumerate(v["qs"]):
            a = ans if j == 0 else opts[LETTERS.index(ans)]          # letter, then the option text
            lines.append({"id": f"g{i}_{j}", "video": f"clips/c{i}.mp4", "question": text,
                          "options": opts, "answer": a, "category": "colour" if i % 2 else "hue"})
    p = root / "mine.jsonl"
    p.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    return p
