"""The benchmark's task families (training/synthetic.py: TASKS): seeded, and built so that each
task needs what it claims (evidence in several groups, needles far apart, a pattern no 1-2 cell
crop can count), and open answers scored by normalised exact match."""
from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from adapttoken.bench.synthetic import is_correct
from adapttoken.groups import split_slices
from adapttoken.training import synthetic as S

LENGTHS = (2048, 4096, 10000)


def _group_of(nd: S.Needle, frames: int, group_size: int) -> set[int]:
    """Strided groups whose slices show the needle (every frame sampled, 2 frames per slice)."""
    groups = split_slices(-(-frames // 2), group_size)
    owner = {int(s): g for g, sl in enumerate(groups) for s in sl}
    return {owner[f // 2] for f in range(nd.frame_start, nd.frame_end)}


def test_defaults_are_committed_for_every_task():
    assert set(S.TASK_DEFAULTS) == set(S.TASKS)
    for t, d in S.TASK_DEFAULTS.items():
        assert d.budget > 0 and d.group_size > 0 and d.events[0] <= d.events[1]
    # the tight budgets: at 4096 frames (32 groups) an even split gives under 1 (count, order)
    # and 2 (large) tokens per group
    assert S.num_groups(4096, 64) == 32
    assert S.TASK_DEFAULTS["large"].budget == 64


@pytest.mark.parametrize("task", S.TASKS)
def test_task_plans_are_seeded(task):
    a = S.plan_task(task, 4096, 11)
    assert a == S.plan_task(task, 4096, 11)
    assert a != S.plan_task(task, 4096, 12)
    needles, (mc, op) = a
    assert mc.form == "mc" and op.form == "open" and len(mc.options) == 4
    assert mc.options[S.LETTERS.index(mc.answer)] == mc.answer_text == op.answer


def test_colour_and_shape_are_the_single_needle_questions():
    for task in ("colour", "shape"):
        assert S.plan_task(task, 4096, 5) == S.plan(4096, 5, "what", "both", attribute=task)


@pytest.mark.parametrize("frames", LENGTHS)
def test_count_events_number_k_and_lie_in_distinct_groups(frames):
    seen = set()
    for seed in range(40):
        needles, (mc, op) = S.plan_task("count", frames, seed)
        k = len(needles)
        seen.add(k)
        assert op.answer == str(k) and mc.answer_text == str(k)
        assert len({n.colour for n in needles}) == 1 and needles[0].colour in mc.text
        groups = [_group_of(n, frames, 64) for n in needles]
        assert all(len(g) == 1 for g in groups)            # one slice, one group each
        assert len(set().union(*groups)) == k              # k different groups
        for n in needles:                                  # short: one slice, inside one cell
            assert n.frame_end - n.frame_start == 2 and n.frame_start % 2 == 0
            assert len(n.tokens()) == 1
    assert seen == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("frames", LENGTHS)
def test_order_needles_far_apart_in_different_groups(frames):
    for seed in range(40):
        (a, b), (mc, op) = S.plan_task("order", frames, seed)
        assert a.frame_start < b.frame_start and a.colour != b.colour
        assert b.frame_start - a.frame_start >= frames // 4 - 2
        assert _group_of(a, frames, 64) != _group_of(b, frames, 64)
        assert op.answer == a.colour and a.colour in mc.text and b.colour in mc.text


def test_large_pattern_needs_more_than_two_cells():
    for seed in range(60):
        needles, (mc, op) = S.plan_task("large", 4096, seed)
        n = len(needles)
        assert 3 <= n <= 6 and op.answer == str(n)
        assert len({(x.frame_start, x.frame_end) for x in needles}) == 1      # one moment
        cells = [tuple(x.tokens()) for x in needles]
        assert all(len(c) == 1 for c in cells) and len(set(cells)) == n        # one tile per cell
        # by construction: any crop of 1-2 cells sees at most 2 tiles, and every option is >= 3,
        # so the tiles such a crop sees are the same for every answer: it cannot decide
        tiles = {c[0] for c in cells}
        grid = [(r, c) for r in range(4) for c in range(4)]
        most = max(len(tiles & set(crop)) for crop in itertools.combinations(grid, 2))
        assert most == 2 < min(int(o) for o in mc.options)


def test_large_pattern_is_drawn(tmp_path):
    needles, _ = S.plan_task("large", 256, 3)
    fr = S.make_frames(256, 3, S.DEFAULT_SIZE, needles)
    f = needles[0].frame_start
    sat = S.saturation(fr[f])
    for nd in needles:
        y0, y1, x0, x1 = nd.box
        assert sat[y0:y1, x0:x1].min() > 100
    assert S.saturation(fr[f - 1]).max() < 60 if f > 0 else True


def test_task_sample_written_and_described(tmp_path):
    s = S.make_task_sample(tmp_path / "c.mp4", "count", 512, 2, group_size=16)
    d = json.loads(json.dumps(s.to_dict()))
    assert S.Sample.from_dict(d).needles == s.needles
    dec = S.read_video(s.video_path)
    assert len(dec) == 512
    for nd in s.needles:
        y0, y1, x0, x1 = nd.box
        region = dec[nd.frame_start, y0:y1, x0:x1][nd.mask()]
        assert S.nearest_colour(region.mean(0)) == nd.colour


def test_too_many_events_for_the_groups_is_an_error():
    with pytest.raises(ValueError, match="groups"):
        S.plan_task("count", 256, 0, events=5)            # 128 slices / 64 = 2 groups


def test_open_answers_normalised():
    assert S.normalize_answer(" Three.") == "3"
    assert S.normalize_answer("3") == "3"
    assert S.normalize_answer("Red!") == "red"
    q = {"options": [], "answer": "3", "answer_text": "3"}
    assert is_correct(q, "three") and is_correct(q, " 3.") and is_correct(q, "Three")
    assert not is_correct(q, "4") and not is_correct(q, "thirty") and not is_correct(q, "3 4")
    q = {"options": [], "answer": "red", "answer_text": "red"}
    assert is_correct(q, "Red.") and not is_correct(q, "red circle")
    q = {"options": ["1", "2", "3", "4"], "answer": "C", "answer_text": "3"}
    assert is_correct(q, "C") and is_correct(q, "(C) 3") and not is_correct(q, "3")


def test_vocab_covers_task_prompts():
    vocab = set(" ".join(S.VOCAB_TEXTS).replace("\n", " ").split())
    for task in S.TASKS:
        for q in S.plan_task(task, 4096, 1)[1]:
            assert set(q.prompt_text().replace("\n", " ").split()) <= vocab


def test_bench_task_grid_with_ablations(tmp_path):
    pytest.importorskip("av")
    from adapttoken.bench.synthetic import ALL_METHODS, main
    out = tmp_path / "bench"
    assert main(["--task", "order", "--lengths", "256", "--count", "1", "--group-size", "16",
                 "--ablation-lengths", "256", "--out", str(out), "--no-plots",
                 "--videos", str(tmp_path / "v")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert {r["method"] for r in res["rows"]} == set(ALL_METHODS)
    assert all(r["task"] == "order" and r["events"] == 2 for r in res["rows"])
    md = (out / "README.md").read_text()
    assert "Task **order**" in md and "budget 16 tokens" in md and "softmax relevance" in md
    assert "--task order" in md and "--group-size 16" in md
    assert res["meta"]["stop_check_answer"] is True and "--no-stop-check" not in res["command"]


def test_bench_lite_without_the_answer_check(tmp_path):
    """--no-stop-check reaches Lite's config (recorded in the meta and the command); with every
    group confident and confirm=1 the group rule alone stops Lite after the first group."""
    pytest.importorskip("av")
    from adapttoken.bench.synthetic import main
    out = tmp_path / "bench"
    assert main(["--task", "colour", "--lengths", "256", "--count", "1", "--group-size", "16",
                 "--methods", "lite", "--ablation-lengths", "--stop-threshold", "1.0",
                 "--stop-confirm", "1", "--no-stop-check", "--out", str(out), "--no-plots",
                 "--videos", str(tmp_path / "v")]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["stop_check_answer"] is False and "--no-stop-check" in res["command"]
    (row,) = res["rows"]
    assert row["method"] == "lite" and row["group_passes"] == 1


def test_training_targets_follow_the_view():
    """train_tiny's task examples: the target is what the tokens in view settle (count: most mass on
    the count in view, never certain while larger options remain; order: half on each named colour
    with one event in view; large: the tiles in view when 3 or more), uniform without evidence."""
    from adapttoken.training import train_tiny as T
    rng = np.random.default_rng(3)
    seen = set()
    for i in range(90):
        task = ("count", "order", "large")[i % 3]
        ex = T.make_task_example(rng, task, situation=("group", "final")[i % 2], short=True,
                                 form=("mc", "open")[(i // 2) % 2])
        q = ex.question
        assert len(ex.frames) == 2 * len(ex.t_pos) and ex.needle.shape == ex.keep.shape
        if ex.present:
            assert not ex.soft and ex.needle.any()
            if task == "large":
                assert int(q.answer_text) == int(ex.needle.sum()) >= 3
            if task == "order":
                assert q.answer_text in q.text
            seen.add((task, "hard"))
        elif ex.soft:
            words = dict(ex.soft)
            assert abs(sum(words.values()) - 1) < 1e-9 and ex.needle.any()
            if task == "order":
                assert sorted(words.values()) == [0.5, 0.5]
            if task == "count":
                val = {w: int(q.options[T.syn.LETTERS.index(w)] if q.options else w) for w in words}
                c = int(ex.needle.sum())                     # one cell per event
                opts = [int(o) for o in (q.options or T.syn.NUMBERS[:5])]
                assert all(v >= c for v in val.values())
                if c in opts:                                # most mass on the count in view
                    best = max(words, key=words.get)
                    assert val[best] == c and words[best] == T.COUNT_IN_VIEW_P
            seen.add((task, "soft"))
        else:
            assert q.answer == "" and not ex.soft
            seen.add((task, "none"))
    assert {("count", "soft"), ("order", "soft"), ("order", "hard"), ("large", "hard"),
            ("count", "none")} <= seen


def test_count_in_view_p_one_answers_what_is_in_view():
    """count_p=1.0 (train_tiny --count-in-view-p 1, stage 11): with some count events in view the
    target is the count in view itself, a hard target; where that count is not among the options
    the rule of the soft target (spread over the larger options) still holds."""
    from adapttoken.training import train_tiny as T
    rng = np.random.default_rng(5)
    hard = soft = 0
    for i in range(120):
        ex = T.make_task_example(rng, "count", situation="group", present=True, short=True,
                                 form=("mc", "open")[i % 2], count_p=1.0)
        q = ex.question
        c = ex.n_shown                                   # count events with a token in view
        opts = [int(o) for o in (q.options or T.syn.NUMBERS[:5])]
        if c and c in opts:
            assert ex.present and not ex.soft and int(q.answer_text) == c
            hard += 1
        elif c:                                          # the answer lies among the larger ones
            higher = sorted(o for o in opts if o > c)
            if len(higher) == 1:
                assert ex.present and int(q.answer_text) == higher[0]
            else:
                words = dict(ex.soft)
                assert not ex.present and sorted(int(q.options[T.syn.LETTERS.index(w)] if q.options else w)
                                                 for w in words) == higher
            soft += 1
    assert hard > 50 and soft > 0


def test_sparse_final_pass_is_the_benchmarks_answer_pass():
    """train_tiny's "sparse" situation (stage 10): a final pass over 8-64 slices of the whole video
    that keeps every event token in view and one other token per slice, at the whole video's
    extent; sparse_p draws it only for final passes, and sparse_p=0 draws exactly as before."""
    from adapttoken.training import train_tiny as T
    rng = np.random.default_rng(5)
    with_events = 0
    for i in range(30):
        task = ("count", "order", "large")[i % 3]
        ex = T.make_task_example(rng, task, situation="sparse")
        n = len(ex.t_pos)
        assert ex.situation == "sparse" and T.SPARSE_SLICES[0] <= n <= T.SPARSE_SLICES[1]
        slices = ex.keep // T.TPS
        assert set(slices.tolist()) == set(range(n))             # every slice shows a token
        background = slices[~ex.needle]
        assert np.bincount(background, minlength=n).max() <= 1   # one other token per slice
        with_event = len(set(slices[ex.needle].tolist()))         # a random pick may land on an event
        assert n - with_event <= len(background) <= n
        assert ex.extent >= int(ex.t_pos.max())
        with_events += bool(ex.needle.any())
    assert with_events >= 10
    a = [T.make_task_example(np.random.default_rng(k), "count").situation for k in range(12)]
    b = [T.make_task_example(np.random.default_rng(k), "count", sparse_p=0.0).situation for k in range(12)]
    assert a == b and "sparse" not in a
    mixed = {T.make_task_example(np.random.default_rng(k), "order", sparse_p=1.0).situation
             for k in range(20)}
    assert mixed == {"group", "sparse"}


def test_feature_head_labels_name_the_covering_needle():
    """train_tiny's feature-head labels: every token a needle covers with >= FEAT_MIN_PX pixels is
    labelled with that needle's colour and shape, uncovered tokens 0, slivers ignored."""
    from adapttoken.training import train_tiny as T
    colours = list(T.syn.COLOURS)
    rng = np.random.default_rng(5)
    for attr in ("colour", "shape"):
        for _ in range(6):
            ex = T.make_example(rng, situation="group", present=True, attribute=attr)
            cls = ex.tok_cls
            assert cls.shape == (len(ex.t_pos) * T.TPS, 2)
            lab = cls[:, 0] > 0
            assert lab.any() and not (lab & ~ex.needle).any()       # only the needle's own cells
            assert ((cls[:, 0] > 0) == (cls[:, 1] > 0)).all()
            k = 0 if attr == "colour" else 1
            names = colours if attr == "colour" else list(T.syn.SHAPES)
            assert set(cls[lab, k].tolist()) == {1 + names.index(ex.question.answer_text)}
            assert set(cls[~ex.needle, 0].tolist()) == {0}
            # no needle rendered: nothing labelled
            ex = T.make_example(rng, situation="group", present=False, attribute=attr)
            assert (ex.tok_cls == 0).all()
    for _ in range(8):                                  # large: one 24 px tile per cell, all squares
        ex = T.make_task_example(rng, "large", situation="group", present=True)
        if ex.present:
            lab = ex.tok_cls[:, 0] > 0
            assert int(lab.sum()) == int(ex.question.answer_text)
            assert set(ex.tok_cls[lab, 1].tolist()) == {1 + T.syn.SHAPES.index("square")}


def test_feature_heads_loss_is_class_balanced_and_ignores_slivers():
    import torch
    import torch.nn.functional as F
    from adapttoken.training.train_tiny import FeatureHeads
    torch.manual_seed(0)
    heads = FeatureHeads(8)
    feats = torch.randn(10, 8)
    cls = torch.tensor([[0, 0]] * 6 + [[2, 3], [2, 3], [-100, -100], [1, 4]])
    loss, acc = heads.loss(feats, cls)
    x = F.layer_norm(feats, (8,))
    want = 0.0
    for k, head in enumerate((heads.colour, heads.shape)):
        y = cls[:, k]
        ce = F.cross_entropy(head(x), y.clamp(min=0), reduction="none")
        want = want + 0.5 * ce[y > 0].mean() + 0.5 * ce[y == 0].mean()
    assert torch.allclose(loss, want)
    assert 0.0 <= float(acc) <= 1.0


def test_pooled_shape_head_reads_each_needle_from_the_mean_of_its_tokens():
    """--shape-pool: one example per (slice, shape) shown, from the mean of those tokens (slivers
    and background left out), recomputed here by hand; gradients reach the tokens; no needle: 0."""
    import torch
    import torch.nn.functional as F
    from adapttoken.training.train_tiny import FeatureHeads
    torch.manual_seed(0)
    heads = FeatureHeads(8)
    feats = torch.randn(48, 8, requires_grad=True)            # 3 slices of 16 tokens
    cls = torch.zeros(48, 2, dtype=torch.long)
    cls[[1, 2, 5], 1] = 3                                     # slice 0: a triangle on 3 tokens
    cls[6, 1] = -100                                          # ... and a sliver of it
    cls[[20, 21], 1] = 1                                      # slice 1: a circle
    cls[[22, 23], 1] = 4                                      # ... and a cross
    cls[[33, 47], 1] = 3                                      # slice 2: a triangle
    loss, acc = heads.pooled_loss(feats, cls)
    groups = [([1, 2, 5], 2), ([20, 21], 0), ([22, 23], 3), ([33, 47], 2)]
    x = torch.stack([feats[i].mean(0) for i, _ in groups])
    want = F.cross_entropy(heads.pooled_shape(F.layer_norm(x, (8,))), torch.tensor([y for _, y in groups]))
    assert torch.allclose(loss, want)
    assert 0.0 <= float(acc) <= 1.0
    loss.backward()
    assert feats.grad[[1, 20, 33]].abs().sum() > 0 and feats.grad[[0, 6, 40]].abs().sum() == 0
    none, none_acc = heads.pooled_loss(feats.detach(), torch.zeros(48, 2, dtype=torch.long))
    assert float(none) == 0.0 and float(none_acc) == 0.0

def test_evidence_kept_counts_the_needles_own_tokens():
    from adapttoken.bench.synthetic import evidence_kept
    nd = {"frame_start": 10, "frame_end": 12, "colour": "red", "shape": "square", "x": 42, "y": 14,
          "size": 20}                                       # box rows 4-23, cols 32-51: cell (0, 1)
    other = {**nd, "frame_start": 40, "frame_end": 42, "x": 98, "y": 98}   # cell (3, 3)
    kept = [{"frame_index": 10, "row": 0, "col": 1}, {"frame_index": 10, "row": 1, "col": 1},
            {"frame_index": 12, "row": 0, "col": 1}, {"frame_index": 40, "row": 0, "col": 1}]
    assert evidence_kept([nd], kept) == (1, 1)
    assert evidence_kept([nd, other], kept) == (1, 1)
    assert evidence_kept([nd, other], kept + [{"frame_index": 40, "row": 3, "col": 3}]) == (2, 2)
    assert evidence_kept([other], kept) == (0, 0)


def test_answer_pointer_looks_where_the_answer_lies():
    """stage 8's answer pointer ("task"): order looks at the first event's tokens only (not the
    second's), count and large nowhere (pointing at every event reads their mean, blind to how
    many); the option word naming the first event is the one that looks at it. "evidence" keeps
    the old rule (every evidence token)."""
    from adapttoken.training import train_tiny as T
    rng = np.random.default_rng(11)
    orders = []
    for i in range(60):
        task = ("count", "order", "large")[i % 3]
        ex = T.make_task_example(rng, task, situation="final", present=True, short=True, form="mc")
        assert ex.look is not None and ex.look.shape == ex.needle.shape
        assert not (ex.look & ~ex.needle).any()             # only ever evidence tokens
        if task in ("count", "large"):
            assert not ex.look.any()
        elif ex.present:                                    # both events in view
            assert ex.look.any() and (ex.needle & ~ex.look).any()
            t_look = ex.t_pos[ex.keep[ex.look] // T.TPS]
            t_other = ex.t_pos[ex.keep[ex.needle & ~ex.look] // T.TPS]
            assert t_look.max() <= t_other.min()             # the first event, in time
            orders.append(ex)
    assert orders
    from transformers import AutoProcessor

    from adapttoken.defaults import BUNDLED_MODEL
    proc = AutoProcessor.from_pretrained(BUNDLED_MODEL, local_files_only=True)
    ex = orders[0]
    for rule, want in (("task", ex.look), ("evidence", ex.needle)):
        b = T.Packer(proc, answer_pointer=rule)([ex], rng)
        n_pre = int(torch.nonzero(b["vis"][0] >= 0)[0, 0])
        got = b["needle_pos"][0, n_pre:n_pre + len(ex.keep)].numpy()
        assert np.array_equal(got, want)
        named = [int(b["ids"][0, j]) for j in torch.nonzero(b["word_match"][0] == 1)[:, 0]]
        if rule == "task":                                  # the option word naming the first event
            assert proc.tokenizer.decode(named).strip() == ex.question.answer_text
        else:                                               # "what" questions only, as before
            assert not named
    # "count": count / large rows get the sink pointer's share c / (c + 1) over every event in view
    cnt = [T.make_task_example(rng, t, situation="final", present=True, short=True, form="mc")
           for t in ("count", "large")]
    b = T.Packer(proc, answer_pointer="count")([ex] + cnt, rng)
    assert b["count_rows"].tolist() == [False, True, True]
    for i, e in enumerate(cnt, 1):
        assert e.n_shown >= 1 and abs(float(b["count_target"][i]) - e.n_shown / (e.n_shown + 1)) < 1e-6
        n_pre = int(torch.nonzero(b["vis"][i] >= 0)[0, 0])
        assert np.array_equal(b["evidence_pos"][i, n_pre:n_pre + len(e.keep)].numpy(), e.needle)
    with pytest.raises(ValueError, match="answer_pointer"):
        T.Packer(proc, answer_pointer="nowhere")
