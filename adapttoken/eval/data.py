"""Readers: each benchmark's on-disk layouts -> a list of `Item` (one multiple-choice question).

Layouts (field names and paths: docs/EVAL.md, with their sources):

* videomme: `videomme/test-*.parquet` (or any `*.parquet` under DIR) with `videoID, question_id,
  duration, domain, sub_category, task_type, question, options (["A. ..", ...]), answer`; videos
  `data/<videoID>.mp4`, falling back to `.MP4` then `.mkv`; subtitles `subtitle/<videoID>.srt`.
* mlvu: the original `json/<n>_<task>.json` (answer = candidate text, `question_type`) with videos
  under `video/<n>_<task>/`, or the lmms-eval parquet (`video_name, question, answer` letter,
  `task_type`) with one flat video folder. Only the 7 multiple-choice tasks (M-Avg).
* longvideobench: `lvb_val.json` (`candidates`, int `correct_choice`) or
  `validation-*.parquet` (`option0..option4`, "N/A" when 4 options); videos `videos/<video_path>`,
  subtitles `subtitles/<subtitle_path>`.
* lvbench: `video_info.meta.jsonl` (one line per video, nested `qa`) or a flat jsonl (one line per
  question: `key, uid, question, answer, question_type`); options are inside `question` as
  "(A) ..." lines; videos `<key>.mp4` in DIR or a `videos/`, `all_videos/`, `data/` folder.
* jsonl: a user's own file: `{"video", "question", "options", "answer"}` per line (answer: a
  letter, an option's text or its index; optional `id`, `duration`, `category`); videos relative
  to the file's folder.
"""
from __future__ import annotations

import json
import re
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..errors import InputError

LETTERS = string.ascii_uppercase
VIDEO_EXTS = (".mp4", ".MP4", ".mkv", ".webm", ".mov", ".avi")
MLVU_TASKS = ("plotQA", "needle", "ego", "count", "order", "anomaly_reco", "topic_reasoning")
# the original json's question_type -> lmms-eval's task_type (findNeedle is needle there)
_MLVU_ALIAS = {"findNeedle": "needle", "needle": "needle", "plotQA": "plotQA", "ego": "ego",
               "count": "count", "order": "order", "anomaly_reco": "anomaly_reco",
               "topic_reasoning": "topic_reasoning"}


@dataclass
class Item:
    """One question. `video` is the resolved file ("" when none was found: preflight lists it)."""
    bench: str
    qid: str
    video_id: str
    video: str
    question: str                    # the question text without options
    options: list[str]               # option texts without their letter
    answer: str                      # the correct letter
    fields: dict = field(default_factory=dict)   # duration, categories (what the metric needs)
    question_raw: str = ""           # the question as stored (options embedded for MLVU/LVBench)
    options_raw: list[str] = field(default_factory=list)   # as stored ("A. ..." for VideoMME)
    subtitles: str = ""              # subtitle file ("" when none)
    subtitle_offset: float = 0.0     # seconds to subtract from subtitle times (LongVideoBench)
    duration_s: float | None = None  # for sharding (longest first)

    @property
    def letters(self) -> list[str]:
        return list(LETTERS[: len(self.options)])

    def to_dict(self) -> dict:
        return asdict(self)


# --- files -------------------------------------------------------------------------------------

def read_parquet(path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:                      # pragma: no cover - depends on the install
        raise InputError(f"reading {path} needs pyarrow: pip install 'adapttoken[eval]'") from e
    return pq.read_table(str(path)).to_pylist()


def read_jsonl(path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}, line {i + 1}: not JSON ({e})") from e
    return rows


def _first(root: Path, patterns) -> Path | None:
    for pat in patterns:
        hits = sorted(root.glob(pat))
        if hits:
            return hits[0]
    return None


def find_video(dirs, stem: str, exts=VIDEO_EXTS) -> str:
    """The first existing `<dir>/<stem><ext>` (or `<dir>/<stem>` when stem has an extension)."""
    for d in dirs:
        d = Path(d)
        if Path(stem).suffix and (d / stem).is_file():
            return str(d / stem)
        for ext in exts:
            p = d / f"{stem}{ext}"
            if p.is_file():
                return str(p)
    return ""


def _strip_letter(opt: str) -> str:
    """'A. text' / '(A) text' / 'A) text' -> 'text'."""
    m = re.match(r"^\s*\(?([A-Z])[.)]\s*(.*)$", opt, re.S)
    return m.group(2).strip() if m else opt.strip()


def split_embedded_options(q: str) -> tuple[str, list[str]]:
    """'What ...?\\n(A) x\\n(B) y' -> ('What ...?', ['x', 'y']); MLVU's 'Question: ..\\nOptions:' too."""
    lines = q.split("\n")
    opts, head = [], []
    for line in lines:
        m = re.match(r"^\s*\(([A-Z])\)\s*(.*)$", line)
        if m and m.group(1) == LETTERS[len(opts)]:
            opts.append(m.group(2).strip())
        elif not opts:
            head.append(line)
        elif opts:                                   # a wrapped option line
            opts[-1] = (opts[-1] + " " + line.strip()).strip()
    text = "\n".join(head).strip()
    text = re.sub(r"^Question:\s*", "", text)
    text = re.sub(r"\n?Options:\s*$", "", text).strip()
    return text, opts


# --- VideoMME ----------------------------------------------------------------------------------

def read_videomme(root: Path) -> list[Item]:
    pq = _first(root, ["videomme/test-*.parquet", "test-*.parquet", "**/test-*.parquet", "**/*.parquet"])
    if pq is None:
        raise InputError(f"VideoMME: no parquet under {root} (expected videomme/test-00000-of-00001.parquet)")
    vdirs = [root / "data", root / "videomme" / "data", root / "videos", root]
    sdirs = [root / "subtitle", root / "videomme" / "subtitle", root / "subtitles"]
    items = []
    for r in read_parquet(pq):
        vid = str(r["videoID"])
        opts_raw = [str(o) for o in r["options"]]
        sub = find_video(sdirs, vid, (".srt",))
        items.append(Item("videomme", str(r["question_id"]), vid, find_video(vdirs, vid, (".mp4", ".MP4", ".mkv")),
                          str(r["question"]), [_strip_letter(o) for o in opts_raw], str(r["answer"]).strip(),
                          {"duration": str(r.get("duration", "")), "domain": r.get("domain"),
                           "sub_category": r.get("sub_category"), "task_type": r.get("task_type")},
                          str(r["question"]), opts_raw, sub,
                          duration_s={"short": 120.0, "medium": 900.0, "long": 2400.0}.get(str(r.get("duration")))))
    return items


# --- MLVU --------------------------------------------------------------------------------------

def read_mlvu(root: Path) -> list[Item]:
    jdir = next((d for d in (root / "json", root / "MLVU" / "json") if d.is_dir()), None)
    if jdir is not None:
        return _mlvu_json(jdir)
    pq = _first(root, ["mlvu/test-*.parquet", "test-*.parquet", "**/*.parquet"])
    if pq is None:
        raise InputError(f"MLVU: neither json/<n>_<task>.json nor a parquet under {root}")
    vdirs = [root / "mlvu", root / "video", root / "videos", root]
    items = []
    for i, r in enumerate(read_parquet(pq)):
        task = _MLVU_ALIAS.get(str(r.get("task_type") or r.get("question_type")))
        if task is None:
            continue                                  # generation tasks: not in M-Avg
        q_raw = str(r["question"])
        if r.get("candidates"):
            q_text, opts = re.sub(r"^Question:\s*", "", q_raw.split("\nOptions:")[0]).strip(), [str(c) for c in r["candidates"]]
            if "(A)" not in q_raw:
                q_raw = _mlvu_template(q_text, opts)
        else:
            q_text, opts = split_embedded_options(q_raw)
        ans = str(r["answer"]).strip()
        if ans not in LETTERS[: len(opts)] and ans in opts:
            ans = LETTERS[opts.index(ans)]
        name = str(r.get("video_name") or r.get("video"))
        qid = str(r.get("question_id") or f"{task}_{i}")
        items.append(Item("mlvu", qid, name, find_video(vdirs, name), q_text, opts, ans,
                          {"task": task}, q_raw, [], duration_s=_float(r.get("duration"))))
    return items


def _mlvu_template(q: str, opts) -> str:
    """MLVU's own qa_template: 'Question: ..\\nOptions:\\n(A) ..' (choice_bench.py)."""
    return f"Question: {q}\nOptions:\n" + "\n".join(f"({LETTERS[i]}) {o}" for i, o in enumerate(opts))


def _mlvu_json(jdir: Path) -> list[Item]:
    root = jdir.parent
    items = []
    for jf in sorted(jdir.glob("*.json")):
        recs = json.loads(jf.read_text(encoding="utf-8"))
        for i, r in enumerate(recs):
            task = _MLVU_ALIAS.get(str(r.get("question_type")))
            if task is None:
                continue
            opts = [str(c) for c in r["candidates"]]
            ans_text = str(r["answer"])
            if ans_text not in opts:
                raise InputError(f"{jf}, record {i}: answer {ans_text!r} is not one of its candidates")
            name = str(r["video"])
            vdirs = [root / "video" / jf.stem, root / "video" / task, root / "video", root]
            items.append(Item("mlvu", f"{jf.stem}/{i}", name, find_video(vdirs, name),
                              str(r["question"]), opts, LETTERS[opts.index(ans_text)], {"task": task},
                              _mlvu_template(str(r["question"]), opts), [],
                              duration_s=_float(r.get("duration"))))
    return items


# --- LongVideoBench ----------------------------------------------------------------------------

def read_longvideobench(root: Path) -> list[Item]:
    js = _first(root, ["lvb_val.json", "**/lvb_val.json"])
    if js is not None:
        recs = json.loads(js.read_text(encoding="utf-8"))
        for r in recs:
            r["_opts"] = [str(c) for c in r["candidates"]]
    else:
        pq = _first(root, ["validation-*.parquet", "**/validation-*.parquet"])
        if pq is None:
            raise InputError(f"LongVideoBench: neither lvb_val.json nor validation-*.parquet under {root}")
        recs = read_parquet(pq)
        for r in recs:
            r["_opts"] = [str(r[f"option{k}"]) for k in range(5)
                          if r.get(f"option{k}") not in (None, "N/A", "")]
    vdirs = [root / "videos", root]
    sdirs = [root / "subtitles", root]
    items = []
    for r in recs:
        opts = r["_opts"]
        path = str(r.get("video_path") or f"{r['video_id']}.mp4")
        sub = str(r.get("subtitle_path") or "")
        items.append(Item("longvideobench", str(r["id"]), str(r["video_id"]), find_video(vdirs, path),
                          str(r["question"]), opts, LETTERS[int(r["correct_choice"])],
                          {"duration_group": int(r["duration_group"]) if r.get("duration_group") is not None else None,
                           "question_category": r.get("question_category"),
                           "topic_category": r.get("topic_category")},
                          str(r["question"]), opts,
                          find_video(sdirs, sub) if sub else "",
                          float(r.get("starting_timestamp_for_subtitles") or 0.0),
                          duration_s=_float(r.get("duration"))))
    return items


# --- LVBench -----------------------------------------------------------------------------------

def read_lvbench(root: Path) -> list[Item]:
    meta = _first(root, ["video_info.meta.jsonl", "**/video_info.meta.jsonl"])
    flat = None if meta is not None else _first(root, ["test.jsonl", "*.jsonl", "**/*.jsonl"])
    if meta is None and flat is None:
        raise InputError(f"LVBench: neither video_info.meta.jsonl nor a flat .jsonl under {root}")
    rows = []
    if meta is not None:
        for v in read_jsonl(meta):
            for qa in v["qa"]:
                rows.append({**{k: v.get(k) for k in ("key", "type", "video_info")}, **qa})
    else:
        rows = read_jsonl(flat)
    vdirs = [root, root / "videos", root / "all_videos", root / "data", root / "lvbench" / "data"]
    items = []
    for r in rows:
        q_raw = str(r["question"])
        q, opts = split_embedded_options(q_raw)
        qt = r.get("question_type") or []
        qt = [qt] if isinstance(qt, str) else list(qt)
        info = r.get("video_info") or {}
        dur = info.get("duration_minutes")
        items.append(Item("lvbench", str(r["uid"]), str(r["key"]), find_video(vdirs, str(r["key"])),
                          q, opts, str(r["answer"]).strip().strip("()"),
                          {"question_type": qt, "video_type": r.get("type")}, q_raw, [],
                          duration_s=None if dur is None else float(dur) * 60))
    return items


# --- a user's own JSONL ------------------------------------------------------------------------

def read_generic(path: Path) -> list[Item]:
    if path.is_dir():
        hits = sorted(path.glob("*.jsonl"))
        if len(hits) != 1:
            raise InputError(f"jsonl: {path} holds {len(hits)} .jsonl files; pass the file itself")
        path = hits[0]
    items = []
    for i, r in enumerate(read_jsonl(path)):
        for k in ("video", "question", "options", "answer"):
            if k not in r:
                raise InputError(f"{path}, line {i + 1}: field {k!r} is missing "
                                 f"(need video, question, options, answer)")
        opts = [str(o) for o in r["options"]]
        a = r["answer"]
        if isinstance(a, int) and not isinstance(a, bool):
            a = LETTERS[a]
        elif str(a).strip() in opts and str(a).strip() not in LETTERS[: len(opts)]:
            a = LETTERS[opts.index(str(a).strip())]
        a = str(a).strip()
        if a not in LETTERS[: len(opts)]:
            raise InputError(f"{path}, line {i + 1}: answer {r['answer']!r} is neither a letter, "
                             f"an option nor an index of its {len(opts)} options")
        v = Path(str(r["video"]))
        v = v if v.is_absolute() else path.parent / v
        fields = {"category": r.get("category")} if r.get("category") is not None else {}
        items.append(Item("jsonl", str(r.get("id", i)), v.stem, str(v) if v.is_file() else "",
                          str(r["question"]), opts, a, fields, str(r["question"]), opts,
                          duration_s=_float(r.get("duration"))))
        if not items[-1].video:
            items[-1].fields["missing_path"] = str(v)
    return items


def _float(x):
    try:
        return None if x is None else float(x)
    except (TypeError, ValueError):
        return None


READERS = {"videomme": read_videomme, "mlvu": read_mlvu, "longvideobench": read_longvideobench,
           "lvbench": read_lvbench, "jsonl": read_generic}


def load_items(bench: str, data) -> list[Item]:
    """All questions of `bench` under `data` (a folder; a file for jsonl), in the file's order."""
    if bench not in READERS:
        raise InputError(f"benchmark {bench!r} is not known: use one of {', '.join(READERS)}")
    root = Path(data)
    if not root.exists():
        raise InputError(f"--data {data}: no such folder")
    items = READERS[bench](root)
    seen = set()
    for it in items:
        if it.qid in seen:
            raise InputError(f"{bench}: question id {it.qid!r} appears twice in {data}")
        seen.add(it.qid)
        if len(it.options) < 2:
            raise InputError(f"{bench}: question {it.qid!r} has {len(it.options)} options")
        if it.answer not in it.letters:
            raise InputError(f"{bench}: question {it.qid!r}: answer {it.answer!r} is not one of {it.letters}")
    if not items:
        raise InputError(f"{bench}: no questions found under {data}")
    return items
