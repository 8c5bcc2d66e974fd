"""Train the bundled demo model: a tiny Qwen2.5-VL on synthetic long videos (synthetic.py).

Why one file of ~1,100 lines: a script read top to bottom as the model card tells it (data, model,
losses, loop, checks), run once to make the bundled weights; the library imports none of it
(a test reuses its vision check).

    python -m adapttoken.training.train_tiny --out adapttoken/assets/adapttoken-tiny-synth --device cuda \\
        --steps 3000 --batch 32 --workers 14

What it builds: the real architecture (`Qwen2_5_VLForConditionalGeneration`) at a small size
(`MODEL_CONFIG`), our own byte-level BPE tokenizer trained on `synthetic.VOCAB_TEXTS`, and a
processor whose pixel range is exactly one 112x112 frame (4x4 = 16 LLM tokens per 2-frame slice).

How it trains: end to end (vision tower included), teacher forcing on the answer tokens
(answer + <|im_end|>), every input built exactly as at inference: the prompt from
`Qwen25VLAdapter.build_prompt`, the visual tokens from the vision tower on processor-equal pixel
values, 3D positions from `positions.build_position_ids` with t = floor(slice_time * 2) and the text
resuming after the video's extent (Qwen's rule). Each example is one of the two situations the
method puts the model in:

* group pass: 8..64 slices of one group (strided or contiguous split of a long virtual video,
  256..12,000 frames at 8 fps), all 16 tokens per slice, text after the group's own extent;
* final pass: a pruned subset of tokens from 2..256 slices of the whole video at their full-video
  positions, text after the whole video's extent.

Half the examples show the needle (a coloured shape among grey distractors) in some slice of the
ones given; the target is then the answer. Without it, the target is a uniform distribution over
the option letters (multiple choice) or over the candidate answers' first tokens (open questions):
the model learns to be uncertain -- high response entropy -- when the evidence is not in view,
which is exactly the signal AdaptToken's budget split and Lite's early stop read.

Task families (stage 6 of the bundled model, `make_task_example`, `TASK_MIX`): the examples are
drawn from the benchmark's five tasks (`synthetic.TASKS`: colour, shape, count, order, large), with
one rule for the target: answer what the tokens in view show, and where they cannot settle the
question spread the target over the answers they leave open (see the section's comment); the
benchmark's own seeds are never used.

Auxiliary probe loss [ours]: AdaptToken ranks a group's tokens by the attention of the question
tokens at one layer (max over heads and query tokens; layer round(0.7 * depth) = 3 here). Nothing
in the answer loss forces that particular layer to look at the evidence, so on examples with the
needle we add lambda * -log(sum_needle s / sum_all s), s = the probe's score of each visual token,
computed with the library's own probe math (`models.probe.probe_attention`) and gradients.

Feature heads [ours] (`--feat`, stage 7): training-only linear heads on the vision tower's merged
output (the visual tokens the language model receives) predict, per token, the colour and the shape
of the needle that covers it (or none), a class-balanced cross-entropy. They teach the tower to put
what the needle is into every token it covers; the heads are dropped after training (the saved
model is the plain architecture) and inference never sees them.

Frames: rendered from `synthetic.Scene` (only the sampled frames of the virtual video); a cheap
emulation of the video codec (4:2:0 chroma subsampling, a little noise) runs on the device for most
examples, so training sees roughly what decoding a file gives (checked: mean error to a real
libx264 round trip 1.4 levels, against 1.8 without the emulation).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..defaults import BUNDLED_MODEL
from ..groups import split_slices
from ..positions import build_position_ids
from . import synthetic as syn

FRAME = 112                    # px: the synthetic videos' frame side
FPS = syn.DEFAULT_FPS          # 8 fps
TOKEN_PX = 28                  # Qwen2.5-VL: one LLM token per 28x28 px (14 px patches, 2x2 merge)
GRID = FRAME // TOKEN_PX       # 4 x 4 tokens per slice
TPS = GRID * GRID              # 16 tokens per slice
MAX_VIDEO_FRAMES = 12_000      # 25 minutes at 8 fps: a bit longer than the benchmark's longest

MODEL_CONFIG = dict(hidden=128, layers=4, heads=4, kv_heads=2, intermediate=384, vision_hidden=64,
                    vision_depth=4, vision_heads=4, fullatt_block_indexes=(1, 3))
VOCAB_SIZE = 600               # BPE saturates at ~430 tokens on VOCAB_TEXTS


# ----------------------------------------------------------------------------------------------
# the model folder
# ----------------------------------------------------------------------------------------------

def build_untrained(seed: int = 0):
    """(model, processor): random-weight tiny Qwen2.5-VL with our tokenizer, built offline."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    from .tiny import build_processor, build_tokenizer, tiny_config
    tok = build_tokenizer(syn.VOCAB_TEXTS, VOCAB_SIZE)
    proc = build_processor(tok, FRAME * FRAME, FRAME * FRAME)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(tiny_config(tok, **MODEL_CONFIG))
    return model, proc


# ----------------------------------------------------------------------------------------------
# examples
# ----------------------------------------------------------------------------------------------

@dataclass
class Example:
    frames: np.ndarray          # uint8 [2 * n_slices, H, W, 3], the slices' frames in order
    t_pos: np.ndarray           # [n_slices] temporal position ids of those slices
    keep: np.ndarray            # [n] sorted flat token ids into n_slices * 16 (the visual tokens fed)
    needle: np.ndarray          # bool [n]: token covered by the needle
    extent: int                 # where the text resumes after the video (Qwen's rule)
    question: syn.Question
    present: bool               # the needle is in view
    situation: str              # "group" or "final"
    num_frames: int = 0         # of the virtual video
    soft: tuple = ()            # ((answer, prob), ...): a soft target (partial evidence), else ()
    tok_cls: np.ndarray | None = None   # int [n_slices * 16, 2]: colour, shape class of every token's
                                        # needle (1 + index; 0 none, -100 a sliver: ignored)
    look: np.ndarray | None = None      # bool [n]: the tokens the answer reads its value from (the
                                        # answer pointer's target, see ANSWER_POINTERS); None: `needle`
    n_shown: int = -1                   # count / large: events with a token in view (-1: other tasks)


FEAT_MIN_PX = 24                # a token shows a needle's attributes if it holds >= this many of its px


def _token_classes(n_tokens: int, covers) -> np.ndarray:
    """covers: (token ids, their needle pixel counts, needle) per shown needle -> [n_tokens, 2]
    feature-head labels (colour, shape): 1 + the class index, 0 where no needle, -100 for slivers."""
    cls = np.zeros((n_tokens, 2), np.int64)
    names = list(syn.COLOURS)
    for toks, px, nd in covers:
        toks, px = np.asarray(toks), np.asarray(px)
        lab = np.where(px[:, None] >= FEAT_MIN_PX,
                       np.array([1 + names.index(nd.colour), 1 + syn.SHAPES.index(nd.shape)]), -100)
        cls[toks] = np.where(cls[toks] > 0, cls[toks], lab)
    return cls


def _cell_cover(needle: syn.Needle) -> dict[int, int]:
    """Token cell (r * GRID + c) -> number of needle pixels in it."""
    y0, _, x0, _ = needle.box
    ys, xs = np.nonzero(needle.mask())
    cells = ((y0 + ys) // TOKEN_PX) * GRID + (x0 + xs) // TOKEN_PX
    ids, counts = np.unique(cells, return_counts=True)
    return dict(zip(ids.tolist(), counts.tolist()))


def _overlaps(frames: np.ndarray, needle: syn.Needle) -> np.ndarray:
    return (frames >= needle.frame_start) & (frames < needle.frame_end)


class _SceneCache:
    """Re-uses one virtual video's background for a few examples in a row (building a Scene costs
    more than rendering the few frames a short example needs); needles are set per example."""

    def __init__(self, reuse: float = 0.75):
        self.reuse, self.scene = reuse, None


def _render_slices(scene, needles, slice_frames, slices) -> np.ndarray:
    """The frames of the given slices with `needles` drawn (the scene's needles reset after)."""
    scene.needles = list(needles)
    try:
        return scene.render_at(slice_frames[slices].reshape(-1))
    finally:
        scene.needles = []


def make_example(rng: np.random.Generator, situation: str | None = None,
                 present: bool | None = None, form: str | None = None, short: bool = False,
                 cache: _SceneCache | None = None, mc_share: float = 0.8,
                 short_slices: int = 8, attribute: str | None = None) -> Example:
    """One training (or held-out) example; see the module doc for the two situations.
    short=True: a group of 8 slices or a final pass over at most 8 slices (cheap examples)."""
    situation = situation or ("group" if rng.random() < 0.55 else "final")
    present = bool(rng.random() < 0.5) if present is None else present
    form = form or ("mc" if rng.random() < mc_share else "open")
    attr = syn.ATTRIBUTES[int(rng.integers(0, 3))]
    attr = attribute or attr
    if cache is not None and cache.scene is not None and rng.random() < cache.reuse:
        scene = cache.scene
        n_video = scene.num_frames
    else:
        n_video = int(np.exp(rng.uniform(np.log(256), np.log(MAX_VIDEO_FRAMES)))) // 2 * 2
        flash = syn.DEFAULT_FLASH_RATE * float(rng.choice([1.0, 1.0, 3.0]))
        scene = syn.Scene(n_video, int(rng.integers(0, 2**31 - 1)), (FRAME, FRAME), (), flash_rate=flash)
        if cache is not None:
            cache.scene = scene
    stride = int(rng.choice([1, 1, 1, 1, 1, 2, 4])) if n_video >= 2048 else 1
    n_sampled = n_video // stride // 2 * 2
    S = n_sampled // 2
    slice_frames = np.stack([2 * np.arange(S) * stride, (2 * np.arange(S) + 1) * stride], 1)
    t_all = np.floor(2 * np.arange(S) * stride / FPS * 2 + 1e-9).astype(np.int64)

    if situation == "group":
        K = 8 if short else int(rng.choice([8, 16, 24, 32, 48, 64, 64, 64]))
        K = min(K, S)
        layout = "strided" if rng.random() < 0.85 else "contiguous"
        groups = split_slices(S, K, layout)
        slices = np.sort(groups[int(rng.integers(0, len(groups)))])
        target = int(rng.choice(slices))
    else:
        hi = min(S, short_slices if short else 128)
        M = int(np.exp(rng.uniform(np.log(1), np.log(hi)))) if hi > 1 else 1
        slices = np.sort(rng.choice(S, size=min(M, S), replace=False))
        target = int(rng.integers(0, S))

    # the needle is placed so that it overlaps one sampled frame of the target slice
    f = int(slice_frames[target, int(rng.integers(0, 2))])
    start = int(np.clip(f - rng.integers(0, 4), 0, n_video - 9))
    needles, (q,) = syn.plan(n_video, int(rng.integers(0, 2**31 - 1)), "what", form,
                             needle_frames=[start], attribute=attr)
    needle = needles[0]
    hit = _overlaps(slice_frames, needle).any(1)            # [S] slices that show the needle
    if situation == "final":
        if present:
            cand = np.nonzero(hit)[0]
            add = rng.choice(cand, size=int(rng.integers(1, len(cand) + 1)), replace=False)
            slices = np.union1d(slices, add)
        else:
            slices = slices[~hit[slices]]
            if len(slices) == 0:
                slices = np.array([int(np.nonzero(~hit)[0][0])])
    shown = bool(hit[slices].any())
    if situation == "group" and not present:
        shown = False                                       # rendered without the needle
    frames = _render_slices(scene, [needle] if shown else [], slice_frames, slices)
    n = len(slices)

    cover = _cell_cover(needle)
    needle_tok = np.zeros(n * TPS, bool)
    covers = []
    if shown:
        for j, s in enumerate(slices):
            if hit[s]:
                cells = np.array(sorted(cover))
                needle_tok[j * TPS + cells] = True
                covers.append((j * TPS + cells, [cover[c] for c in cells.tolist()], needle))
    if situation == "group":
        keep = np.arange(n * TPS)
        extent = max(int(t_all[slices].max()), GRID - 1)
    else:
        if rng.random() < 0.25:
            keep_mask = np.ones(n * TPS, bool)
        else:
            keep_mask = rng.random(n * TPS) < rng.uniform(0.03, 0.6)
        if shown:
            nd = np.nonzero(needle_tok)[0]
            if rng.random() < 0.2:                      # part of the needle's cells only
                nd = rng.choice(nd, size=int(rng.integers(1, len(nd) + 1)), replace=False)
            keep_mask[nd] = True
        if keep_mask.sum() > 1100:                      # cap, never dropping needle cells
            idx = np.nonzero(keep_mask & ~needle_tok)[0]
            keep_mask[rng.choice(idx, size=int(keep_mask.sum()) - 1100, replace=False)] = False
        if not keep_mask.any():
            keep_mask[int(rng.integers(0, n * TPS))] = True
        keep = np.nonzero(keep_mask)[0]
        extent = max(int(t_all.max()), GRID - 1)
    return Example(frames, t_all[slices], keep, needle_tok[keep], extent, q, shown, situation,
                   n_video, tok_cls=_token_classes(n * TPS, covers))


# ----------------------------------------------------------------------------------------------
# the benchmark's task families (synthetic.TASKS) as training examples
# ----------------------------------------------------------------------------------------------
#
# One rule for every task [ours]: answer what the visual tokens in view show; where they cannot
# settle the question, spread the target over the answers they leave open. So
# * colour / shape / large: the answer when the evidence is in view (large: the tiles in view,
#   3 or more), else uniform over the options;
# * order: both events in view -> the colour of the first; one of them -> half on each of the two
#   named colours (one event cannot be ordered); none -> uniform;
# * count: c events in view -> 0.6 on c and 0.4 spread over the larger options (the rest of the
#   video may hold more: a view never proves the count is complete), none -> uniform. The greedy
#   answer is the count in view, and a group that shows some events stays clearly less uncertain
#   than one that shows none (H / H_max about 0.8 against 1), yet never under Lite's stop
#   threshold: Lite reads on, as the answer needs several groups.
# The training data are random scenes and events drawn from the training seed; the benchmark's
# videos use their own seeds (bench.synthetic.sample_seed) and are never trained on.

TASK_MIX = {"colour": 0.1, "shape": 0.25, "count": 0.25, "order": 0.2, "large": 0.2}

# The answer pointer (option-pointer loss (2): layer 1 head 0, answer position -> tokens) and the
# option-word pointer (4). "evidence" (stages 3-7): both look at every evidence token in view.
# "task" [ours, stage 8: tried, not shipped; see docs/bench_synthetic_tasks/]: they look where the
# answer's value lies. colour / shape: the needle;
# order: the first event only (pointing at both taught the model to read the mean of the two
# colours: with both events among 16 kept tokens it split ~0.37 / 0.38 between the named colours
# on the benchmark); count / large: nowhere (attention pushed to sum to 1 over the events reads
# their mean, which is the same for 1 event or 5: the loss itself hid the count); the option word
# that names the first event looks at it (order, both events in view).
# "count" [ours, tried]: "task", and on count / large the same head splits the answer position's
# attention between the events in view and the first token (a sink) as c : 1 for c events: its
# output then mixes the two values in the proportion c / (c + 1), which grows with c (a mean over
# the events alone cannot), so the count can be read from it.
ANSWER_POINTERS = ("evidence", "task", "count")
COUNT_IN_VIEW_P = 0.6


def _virtual_video(rng, cache):
    if cache is not None and cache.scene is not None and rng.random() < cache.reuse:
        scene = cache.scene
    else:
        n_video = int(np.exp(rng.uniform(np.log(256), np.log(MAX_VIDEO_FRAMES)))) // 2 * 2
        flash = syn.DEFAULT_FLASH_RATE * float(rng.choice([1.0, 1.0, 3.0]))
        scene = syn.Scene(n_video, int(rng.integers(0, 2**31 - 1)), (FRAME, FRAME), (), flash_rate=flash)
        if cache is not None:
            cache.scene = scene
    n_video = scene.num_frames
    stride = int(rng.choice([1, 1, 1, 1, 1, 2, 4])) if n_video >= 2048 else 1
    S = n_video // stride // 2
    slice_frames = np.stack([2 * np.arange(S) * stride, (2 * np.arange(S) + 1) * stride], 1)
    t_all = np.floor(2 * np.arange(S) * stride / FPS * 2 + 1e-9).astype(np.int64)
    return scene, n_video, stride, S, slice_frames, t_all


SPARSE_SLICES = (8, 64)         # the "sparse" final pass: slices spread over the whole video


def _view(rng, S, situation, short, short_slices):
    if situation == "sparse":
        M = int(rng.integers(SPARSE_SLICES[0], SPARSE_SLICES[1] + 1))
        return np.sort(rng.choice(S, size=min(M, S), replace=False))
    if situation == "group":
        K = 8 if short else int(rng.choice([8, 16, 24, 32, 48, 64, 64, 64]))
        K = min(K, S)
        layout = "strided" if rng.random() < 0.85 else "contiguous"
        groups = split_slices(S, K, layout)
        return np.sort(groups[int(rng.integers(0, len(groups)))])
    hi = min(S, short_slices if short else 128)
    M = int(np.exp(rng.uniform(np.log(1), np.log(hi)))) if hi > 1 else 1
    return np.sort(rng.choice(S, size=min(M, S), replace=False))


def _pick(rng, pool: np.ndarray, n: int) -> list[int]:
    return [int(x) for x in rng.choice(pool, size=n, replace=False)] if n else []


def _soft_over(options_or_words, probs: dict) -> tuple:
    return tuple((w, p) for w, p in probs.items() if p > 0 and w in options_or_words)


def make_task_example(rng: np.random.Generator, task: str, situation: str | None = None,
                      present: bool | None = None, form: str | None = None, short: bool = False,
                      cache: _SceneCache | None = None, mc_share: float = 0.8,
                      short_slices: int = 8, sparse_p: float = 0.0,
                      count_p: float = COUNT_IN_VIEW_P) -> Example:
    """One example of a task family (see the rule above); colour and shape are `make_example`'s.

    situation "sparse" [ours, stage 10]: the answer pass in the benchmark's own form, a final pass
    over 8-64 slices spread over the whole video that keeps one background token per slice (at
    random) and every token an event covers: the few kept tokens of AdaptToken's answer pass on
    count and order (budget 16) and large (64), where the model of stage 9 ordered at chance while
    ordering training-sized final passes at 70%. `sparse_p`: the share of final passes drawn in
    this form when the situation is left to chance (0: never; no extra random draw).

    count_p: the target's weight on the count in view when some count events are in view (the rest
    is spread over the larger options); 1.0 [ours, stage 11, tried]: answer what is in view, as an
    MLLM that sees only the group would."""
    import dataclasses
    if task in ("colour", "shape"):
        return make_example(rng, situation, present, form, short, cache, mc_share, short_slices,
                            attribute=task)
    situation = situation or ("group" if rng.random() < 0.55 else "final")
    if situation == "final" and sparse_p > 0 and rng.random() < sparse_p:
        situation = "sparse"
    present = bool(rng.random() < 0.6) if present is None else present
    form = form or ("mc" if rng.random() < mc_share else "open")
    scene, n_video, stride, S, slice_frames, t_all = _virtual_video(rng, cache)
    slices = _view(rng, S, situation, short, short_slices)
    inside = np.zeros(S, bool)
    inside[slices] = True
    out_pool = np.nonzero(~inside)[0]
    d = syn.TASK_DEFAULTS[task]
    colours = list(syn.COLOURS)

    def event(s: int, colour: str, shape: str, cell=None) -> syn.Needle:
        cell = cell if cell is not None else (int(rng.integers(0, GRID)), int(rng.integers(0, GRID)))
        nd = syn.cell_needle(rng, 0, cell, colour, shape, int(rng.integers(d.needle_size[0], d.needle_size[1] + 1)))
        f = int(slice_frames[s, 0])
        return dataclasses.replace(nd, frame_start=f, frame_end=min(f + 2, n_video))

    # plan the events: which lie in view; questions from plan_task's templates, seeded here
    qseed = int(rng.integers(0, 2**31 - 1))
    if task == "count":
        k = int(rng.integers(1, 6))
        c = int(rng.integers(1, min(k, len(slices)) + 1)) if present else 0
        c = min(c, len(slices))
        k = min(k, c + len(out_pool))
        colour = colours[int(rng.integers(0, 4))]
        ss = _pick(rng, slices, c) + _pick(rng, out_pool, k - c)
        needles = [event(s, colour, syn.SHAPES[int(rng.integers(0, 4))]) for s in ss]
        mc, op = syn._question_pair(np.random.default_rng(qseed), "count", syn.FORMS,
                                    syn.TEMPLATES["count"].format(colour=colour), str(max(k, 1)),
                                    syn.NUMBERS[:5])
    elif task == "order":
        pattern = (["both", "one"][int(rng.random() < 0.5)]) if present and len(slices) >= 2 else \
            ("one" if present else "none")
        if pattern == "both":
            ss = sorted(_pick(rng, slices, 2))
        elif pattern == "one" and len(out_pool):
            ss = sorted(_pick(rng, slices, 1) + _pick(rng, out_pool, 1))
        else:
            ss = sorted(_pick(rng, out_pool, min(2, len(out_pool))))
            while len(ss) < 2:                       # a view of the whole video: no room outside
                ss = sorted(_pick(rng, np.arange(S), 2))
        if ss[0] == ss[1]:
            ss[1] = min(S - 1, ss[0] + 1) if ss[0] + 1 < S else ss[0] - 1
            ss = sorted(ss)
        first, second = (colours[i] for i in rng.permutation(4)[:2])
        needles = [event(ss[0], first, syn.SHAPES[int(rng.integers(0, 4))]),
                   event(ss[1], second, syn.SHAPES[int(rng.integers(0, 4))])]
        a, b = (first, second) if rng.integers(0, 2) else (second, first)
        mc, op = syn._question_pair(np.random.default_rng(qseed), "order", syn.FORMS,
                                    syn.TEMPLATES["order"].format(a=a, b=b), first, colours)
    else:
        n = int(rng.integers(d.events[0], d.events[1] + 1))
        s = _pick(rng, slices if present else (out_pool if len(out_pool) else slices), 1)[0]
        colour = colours[int(rng.integers(0, 4))]
        cells = rng.permutation(GRID * GRID)[:n]
        needles = [event(s, colour, "square", (int(x) // GRID, int(x) % GRID)) for x in sorted(cells.tolist())]
        mc, op = syn._question_pair(np.random.default_rng(qseed), "large", syn.FORMS,
                                    syn.TEMPLATES["large"], str(n), syn.NUMBERS[2:6])
    q = mc if form == "mc" else op

    # frames of the view, with the events drawn
    frames = _render_slices(scene, sorted(needles, key=lambda x: (x.frame_start, x.frame_end)),
                            slice_frames, slices)
    nv = len(slices)
    owner = np.full(nv * TPS, -1)                    # token -> needle index shown there
    covers = []
    for j, sl in enumerate(slices):
        for i, nd in enumerate(needles):
            if _overlaps(slice_frames[sl], nd).any():
                cov = _cell_cover(nd)
                for cell in cov:
                    owner[j * TPS + cell] = i
                covers.append(([j * TPS + c for c in cov], list(cov.values()), nd))
    if situation == "group":
        keep = np.arange(nv * TPS)
        extent = max(int(t_all[slices].max()), GRID - 1)
    elif situation == "sparse":
        keep_mask = np.zeros(nv * TPS, bool)
        keep_mask[np.arange(nv) * TPS + rng.integers(0, TPS, size=nv)] = True
        keep_mask[owner >= 0] = True
        keep = np.nonzero(keep_mask)[0]
        extent = max(int(t_all.max()), GRID - 1)
    else:
        keep_mask = np.ones(nv * TPS, bool) if rng.random() < 0.25 else rng.random(nv * TPS) < rng.uniform(0.03, 0.6)
        nd_tok = np.nonzero(owner >= 0)[0]
        if len(nd_tok):
            if rng.random() < 0.2:
                nd_tok = rng.choice(nd_tok, size=int(rng.integers(1, len(nd_tok) + 1)), replace=False)
            keep_mask[nd_tok] = True
        if keep_mask.sum() > 1100:
            idx = np.nonzero(keep_mask & (owner < 0))[0]
            keep_mask[rng.choice(idx, size=int(keep_mask.sum()) - 1100, replace=False)] = False
        if not keep_mask.any():
            keep_mask[int(rng.integers(0, nv * TPS))] = True
        keep = np.nonzero(keep_mask)[0]
        extent = max(int(t_all.max()), GRID - 1)
    shown = sorted({int(i) for i in owner[keep] if i >= 0})   # needles with a token in view
    opts = q.options or (syn.NUMBERS[:5] if task == "count" else syn.NUMBERS[2:6] if task == "large" else colours)
    answer, soft = None, ()
    if task == "count" and shown:
        c = len(shown)
        higher = [o for o in opts if int(o) > c]
        probs = {str(c): count_p if higher else 1.0}
        if count_p < 1.0:
            probs.update({o: (1 - count_p) / len(higher) for o in higher})
        if str(c) not in opts:
            probs = {o: 1 / len(higher) for o in higher} if higher else {}
        if len(probs) == 1:
            answer = next(iter(probs))
        else:
            soft = _soft_over(opts, probs)
    elif task == "order" and shown:
        if len(shown) == 2:
            answer = needles[0].colour
        else:
            soft = _soft_over(opts, {needles[0].colour: 0.5, needles[1].colour: 0.5})
    elif task == "large" and len(shown) >= 3:
        answer = str(len(shown))
    if answer is not None:
        if q.options:
            q = dataclasses.replace(q, answer=syn.LETTERS[q.options.index(answer)], answer_text=answer)
        else:
            q = dataclasses.replace(q, answer=answer, answer_text=answer)
    elif soft and q.options:
        soft = tuple((syn.LETTERS[q.options.index(w)], p) for w, p in soft)
    present = answer is not None
    if not present:
        q = dataclasses.replace(q, answer="", answer_text="")
    kept_owner = owner[keep]
    if task == "order":              # the answer is the first event's colour: read it there alone
        look = kept_owner == (0 if 0 in shown else (shown[0] if shown else -2))
    else:                            # count / large: the answer is how many (see ANSWER_POINTERS)
        look = np.zeros(len(keep), bool)
    return Example(frames, t_all[slices], keep, kept_owner >= 0, extent, q, present, situation,
                   n_video, soft, tok_cls=_token_classes(nv * TPS, covers), look=look,
                   n_shown=len(shown) if task in ("count", "large") else -1)


class _PromptBuilder:
    """The adapter's own build_prompt, usable in data-loader workers (it only needs the processor)."""

    def __init__(self, processor):
        self.processor = processor

    def build_prompt(self, question):
        from ..models.qwen2_5_vl import Qwen25VLAdapter
        return Qwen25VLAdapter.build_prompt(self, question)


class Packer:
    """Examples -> one batch of CPU tensors, laid out exactly as the adapter lays out a pass:
    prefix text, visual tokens (placeholders filled with vision features on the device), suffix
    text, then the answer's input tokens (teacher forcing)."""

    def __init__(self, processor, max_aux: int = 8, answer_pointer: str = "evidence"):
        from ..question import Question
        if answer_pointer not in ANSWER_POINTERS:
            raise ValueError(f"answer_pointer={answer_pointer!r}: use one of {ANSWER_POINTERS}")
        self.answer_pointer = answer_pointer
        self.Question, self.builder = Question, _PromptBuilder(processor)
        self.tok = processor.tokenizer
        self.vocab = len(self.tok)
        self.im_end = self.tok.convert_tokens_to_ids("<|im_end|>")
        self.letter_ids = [self.tok.encode(L, add_special_tokens=False)[0] for L in syn.LETTERS]
        first = lambda w: self.tok.encode(w, add_special_tokens=False)[0]   # noqa: E731
        self.open_first = {"colour": sorted({first(c) for c in syn.COLOURS}),
                           "shape": sorted({first(s) for s in syn.SHAPES}),
                           "both": sorted({first(c) for c in syn.COLOURS}),
                           "order": sorted({first(c) for c in syn.COLOURS}),
                           "count": sorted({first(n) for n in syn.NUMBERS[:5]}),
                           "large": sorted({first(n) for n in syn.NUMBERS[2:6]})}
        self.first = first
        self.max_aux = max_aux
        self._prompts = {}

    def prompt(self, q: syn.Question):
        key = (q.text, q.options)
        if key not in self._prompts:
            self._prompts[key] = self.builder.build_prompt(self.Question(q.text, tuple(q.options)))
        return self._prompts[key]

    def __call__(self, examples: list[Example], rng: np.random.Generator, codec_p: float = 0.75) -> dict:
        rows, slice_off = [], 0
        for ex in examples:
            pr = self.prompt(ex.question)
            n_pre, n_vis, n_suf = len(pr.prefix_ids), len(ex.keep), len(pr.suffix_ids)
            ans = (self.tok.encode(ex.question.answer, add_special_tokens=False) + [self.im_end]
                   if ex.present else [])
            ids = torch.cat([pr.prefix_ids, torch.zeros(n_vis, dtype=torch.long), pr.suffix_ids,
                             torch.tensor(ans[:-1], dtype=torch.long)])
            vis = torch.full((len(ids),), -1, dtype=torch.long)
            vis[n_pre:n_pre + n_vis] = torch.from_numpy(slice_off * TPS + ex.keep)
            keep = torch.from_numpy(ex.keep)
            coords = torch.stack([torch.from_numpy(ex.t_pos)[keep // TPS], (keep % TPS) // GRID, keep % GRID])
            pos = build_position_ids(n_pre, coords, ex.extent, len(ids) - n_pre - n_vis)
            rows.append((ids, vis, pos, n_pre, n_vis, n_suf, ans, ex))
            slice_off += len(ex.t_pos)
        B, L = len(rows), max(len(r[0]) for r in rows)
        ids_b = torch.zeros(B, L, dtype=torch.long)
        vis_b = torch.full((B, L), -1, dtype=torch.long)
        pos_b = torch.zeros(3, B, L, dtype=torch.long)
        mask = torch.zeros(B, L, dtype=torch.long)
        label = torch.full((B, L), -100, dtype=torch.long)
        soft = torch.zeros(B, self.vocab)
        soft_pos = torch.zeros(B, dtype=torch.long)
        present = torch.zeros(B, dtype=torch.bool)
        line = torch.zeros(B, L, dtype=torch.bool)          # correct option's line after its letter
        letter_ptr = torch.full((B, L), -1, dtype=torch.long)   # option-line token -> its letter
        needle_pos = torch.zeros(B, L, dtype=torch.bool)         # the needle's visual tokens
        word_match = torch.full((B, L), -1, dtype=torch.long)   # option word: 1 names the needle, 0 not
        count_rows = torch.zeros(B, dtype=torch.bool)            # the count pointer ("count" rule)
        count_target = torch.zeros(B)                            # its share on the events: c / (c + 1)
        evidence_pos = torch.zeros(B, L, dtype=torch.bool)       # every event token in view
        aux = []
        task_rule = self.answer_pointer in ("task", "count")
        for i, (ids, vis, pos, n_pre, n_vis, n_suf, ans, ex) in enumerate(rows):
            n = len(ids)
            ids_b[i, :n], vis_b[i, :n], pos_b[:, i, :n], mask[i, :n] = ids, vis, pos, 1
            last = n_pre + n_vis + n_suf - 1                 # predicts the first answer token
            soft_pos[i] = last
            look = ex.look if task_rule and ex.look is not None else ex.needle
            if self.answer_pointer == "count" and ex.n_shown >= 0:
                count_rows[i] = True
                count_target[i] = ex.n_shown / (ex.n_shown + 1)
                evidence_pos[i, n_pre:n_pre + n_vis] = torch.from_numpy(ex.needle)
            if ex.present:
                label[i, last:last + len(ans)] = torch.tensor(ans)
                present[i] = True
                needle_pos[i, n_pre:n_pre + n_vis] = torch.from_numpy(look)
                if ex.question.options:
                    a, b = self.option_line(ex.question, ex.question.answer)
                    line[i, n_pre + n_vis + a + 1:n_pre + n_vis + b] = True
                    if look.any() and (ex.question.kind == "what" or (
                            task_rule and ex.question.kind == "order")):
                        names = {ex.question.answer_text.split()[0], ex.question.answer_text.split()[-1]}
                        for letter, option in zip(syn.LETTERS, ex.question.options):
                            a, b = self.option_line(ex.question, letter)
                            words = option.split()
                            if b - a - 3 == len(words):             # 'C', '.', one token per word, newline
                                for k, w in enumerate(words):
                                    word_match[i, n_pre + n_vis + a + 2 + k] = int(w in names)
                if ex.needle.any() and len(aux) < self.max_aux and ex.situation == "group":
                    aux.append((i, n_pre, n_vis, n_pre + n_vis + n_suf, torch.from_numpy(ex.needle)))
            elif ex.soft:                                    # partial evidence: a soft target
                for w, pw in ex.soft:
                    tid = self.letter_ids[syn.LETTERS.index(w)] if ex.question.options else self.first(w)
                    soft[i, tid] += pw
                needle_pos[i, n_pre:n_pre + n_vis] = torch.from_numpy(look)
                if ex.needle.any() and len(aux) < self.max_aux and ex.situation == "group":
                    aux.append((i, n_pre, n_vis, n_pre + n_vis + n_suf, torch.from_numpy(ex.needle)))
            else:
                key = ex.question.attribute or ex.question.kind
                tgt = self.letter_ids if ex.question.options else self.open_first[key]
                soft[i, tgt] = 1.0 / len(tgt)
            if ex.question.options:
                for letter in syn.LETTERS[:len(ex.question.options)]:
                    a, b = self.option_line(ex.question, letter)
                    letter_ptr[i, n_pre + n_vis + a + 1:n_pre + n_vis + b] = n_pre + n_vis + a
        frames = torch.from_numpy(np.concatenate([ex.frames for ex in examples]))
        codec = torch.cat([torch.full((len(ex.frames),), bool(rng.random() < codec_p)) for ex in examples])
        tok_cls = torch.from_numpy(np.concatenate([
            ex.tok_cls if ex.tok_cls is not None else np.full((len(ex.t_pos) * TPS, 2), -100)
            for ex in examples]))
        return {"frames": frames, "codec": codec, "n_slices": int(slice_off), "ids": ids_b, "vis": vis_b,
                "pos": pos_b, "mask": mask, "label": label, "soft": soft, "soft_pos": soft_pos,
                "present": present, "aux": aux, "line": line,
                "letter_ptr": letter_ptr, "needle_pos": needle_pos, "word_match": word_match,
                "count_rows": count_rows, "count_target": count_target, "evidence_pos": evidence_pos,
                "tok_cls": tok_cls}

    def option_line(self, q: syn.Question, letter: str) -> tuple[int, int]:
        """[start, end) of an option's line ('C', '.', words, newline) in the suffix."""
        key = ("line", q.text, q.options, letter)
        if key not in self._prompts:
            toks = self.tok.convert_ids_to_tokens(self.prompt(q).suffix_ids.tolist())
            nl = "\u010a"                                   # byte-level BPE's newline
            for j in range(1, len(toks) - 1):
                if toks[j] == letter and toks[j + 1] == "." and toks[j - 1] == nl:
                    end = toks.index(nl, j)
                    self._prompts[key] = (j, end + 1)
                    break
            else:
                raise ValueError(f"option line of {letter!r} not found in {toks}")
        return self._prompts[key]


class BatchStream(torch.utils.data.IterableDataset):
    """Endless seeded batches (each DataLoader worker its own seed): with probability short_p a
    batch of `short_batch` short examples, else `batch` regular ones."""

    def __init__(self, processor, seed: int, batch: int, short_batch: int, short_p: float,
                 mc_share: float = 0.8, short_slices: int = 8, tasks: dict | None = None,
                 answer_pointer: str = "evidence", sparse_p: float = 0.0,
                 count_p: float = COUNT_IN_VIEW_P):
        self.processor, self.seed, self.mc_share = processor, seed, mc_share
        self.sparse_p, self.count_p = sparse_p, count_p
        self.answer_pointer = answer_pointer
        self.tasks = dict(tasks or TASK_MIX)
        self.short_slices = short_slices
        self.batch, self.short_batch, self.short_p = batch, short_batch, short_p

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid = info.id if info is not None else 0
        rng = np.random.default_rng([self.seed, wid])
        pack, cache = Packer(self.processor, answer_pointer=self.answer_pointer), _SceneCache()
        while True:
            short = bool(rng.random() < self.short_p)
            n = self.short_batch if short else self.batch
            names, w = list(self.tasks), np.asarray(list(self.tasks.values()), float)
            yield pack([make_task_example(rng, names[int(rng.choice(len(names), p=w / w.sum()))], short=short,
                                          cache=cache, mc_share=self.mc_share, short_slices=self.short_slices,
                                          sparse_p=self.sparse_p, count_p=self.count_p)
                        for _ in range(n)], rng)


# ----------------------------------------------------------------------------------------------
# pixels and vision tower, with gradients
# ----------------------------------------------------------------------------------------------

def emulate_codec(x: torch.Tensor, noise: float = 1.0) -> torch.Tensor:
    """float RGB [N, 3, H, W] in 0..255 -> the same after 4:2:0 chroma subsampling + noise."""
    R, G, B = x[:, 0], x[:, 1], x[:, 2]
    Y = 0.299 * R + 0.587 * G + 0.114 * B
    C = torch.stack([-0.168736 * R - 0.331264 * G + 0.5 * B, 0.5 * R - 0.418688 * G - 0.081312 * B], 1)
    C = F.interpolate(F.avg_pool2d(C, 2), scale_factor=2, mode="nearest")
    Cb, Cr = C[:, 0], C[:, 1]
    out = torch.stack([Y + 1.402 * Cr, Y - 0.344136 * Cb - 0.714136 * Cr, Y + 1.772 * Cb], 1)
    if noise > 0:
        out = out + noise * torch.randn_like(out)
    return out.clamp(0, 255).round()


def patchify(frames: torch.Tensor, processor, codec: bool = False) -> torch.Tensor:
    """uint8 frames [2S, H, W, 3] (H, W multiples of 28, no resize needed) -> pixel_values_videos
    [S * (H/14) * (W/14), 1176], equal to the family's video processor output."""
    x = frames.permute(0, 3, 1, 2).float()
    return _normalize_patchify(emulate_codec(x) if codec else x, processor)


def _normalize_patchify(x: torch.Tensor, processor) -> torch.Tensor:
    """float RGB [2S, 3, H, W] in 0..255 -> rescale, normalise, patchify like the video processor."""
    vp = processor.video_processor
    mean = torch.tensor(vp.image_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(vp.image_std, device=x.device).view(1, 3, 1, 1)
    x = (x * vp.rescale_factor - mean) / std
    T, C, H, W = x.shape
    tp, p, m = vp.temporal_patch_size, vp.patch_size, vp.merge_size
    gt, gh, gw = T // tp, H // p, W // p
    x = x.view(gt, tp, C, gh // m, m, p, gw // m, m, p)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return x.reshape(gt * gh * gw, C * tp * p * p)


class VisionTrainForward:
    """The vision tower's forward for whole 112x112 slices, batched over slices, with gradients.

    At 112x112 a slice is 8x8 patches = exactly one 112 px attention window, so windowed and full
    blocks both attend within the slice and transformers' window permutation is the identity; the
    blocks then reduce to one batched sdpa per layer (transformers' sdpa path loops over windows in
    Python). Built from the tower's own modules; checked against get_video_features at start."""

    def __init__(self, model):
        self.model = model
        self.visual = model.model.visual
        vc = model.config.vision_config
        self.side = FRAME // vc.patch_size                 # 8 patches
        if vc.window_size != FRAME:
            raise ValueError("VisionTrainForward assumes window_size == frame side (112 px)")
        self.cos, self.sin = self._rotary()
        self.dim = model.config.vision_config.out_hidden_size
        self.trainable = True

    def _rotary(self):
        got = {}

        def hook(mod, args, kwargs):
            got["pe"] = kwargs["position_embeddings"]
        blk = self.visual.blocks[0]
        h = blk.register_forward_pre_hook(hook, with_kwargs=True)
        dev = next(self.visual.parameters()).device
        n = self.side * self.side
        try:
            with torch.no_grad():
                self.model.model.get_video_features(
                    torch.zeros(n, 3 * 2 * 14 * 14, device=dev),
                    torch.tensor([[1, self.side, self.side]], device=dev))
        finally:
            h.remove()
        cos, sin = got["pe"]
        return cos.float(), sin.float()                    # [64, head_dim]

    def __call__(self, pv: torch.Tensor, n_slices: int) -> torch.Tensor:
        vis = self.visual
        x = vis.patch_embed(pv)                            # [S*64, C]
        P = self.side * self.side
        x = x.view(n_slices, P, -1)
        cos, sin = self.cos[:, None], self.sin[:, None]    # [64, 1, hd]
        for blk in vis.blocks:
            a = blk.attn
            h = blk.norm1(x)
            q, k, v = a.qkv(h).view(n_slices, P, 3, a.num_heads, -1).unbind(2)   # [S, P, nh, hd]
            dt = q.dtype
            q = (q.float() * cos + _rotate_half(q.float()) * sin).to(dt)
            k = (k.float() * cos + _rotate_half(k.float()) * sin).to(dt)
            o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                               scale=a.scaling)
            x = x + a.proj(o.transpose(1, 2).reshape(n_slices, P, -1))
            x = x + blk.mlp(blk.norm2(x))
        return vis.merger(x.reshape(n_slices * P, -1)).view(n_slices, TPS, -1)


def _rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


# ----------------------------------------------------------------------------------------------
# one training step
# ----------------------------------------------------------------------------------------------

class FeatureHeads(torch.nn.Module):
    """Training-only linear heads on the merged visual tokens: the colour (none + 4) and the shape
    (none + 4) of the needle covering each token. Never saved with the model."""

    def __init__(self, dim: int):
        super().__init__()
        self.colour = torch.nn.Linear(dim, 1 + len(syn.COLOURS))
        self.shape = torch.nn.Linear(dim, 1 + len(syn.SHAPES))
        self.pooled_shape = torch.nn.Linear(dim, len(syn.SHAPES))

    def loss(self, feats: torch.Tensor, cls: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Class-balanced CE (half the weight on needle tokens, half on the rest) summed over the two
        heads, and the needle tokens' accuracy (both attributes right)."""
        total, right = feats.new_zeros((), dtype=torch.float32), []
        x = F.layer_norm(feats.float(), feats.shape[-1:])      # the tokens' scale is the LM's
        for k, head in enumerate((self.colour, self.shape)):
            y = cls[:, k]
            logits = head(x)
            ce = F.cross_entropy(logits, y.clamp(min=0), reduction="none")
            for m in (y > 0, y == 0):
                if bool(m.any()):
                    total = total + 0.5 * ce[m].mean()
            right.append((logits.argmax(-1) == y)[y > 0])
        acc = (right[0] & right[1]).float().mean() if right[0].numel() else feats.new_zeros(())
        return total, acc.detach()

    def pooled_loss(self, feats: torch.Tensor, cls: torch.Tensor, tokens_per_slice: int = TPS
                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The shape of each needle from the mean of its tokens (`--shape-pool`) [ours]:
        CE of `pooled_shape` on the layer-normed mean of the tokens of one slice that show one
        shape (label > 0: slivers excluded), and its accuracy. A token holding part of a shape
        cannot always tell the whole shape (the per-token heads above ask it to); the pooled
        tokens can (docs/bench_synthetic_tasks/shape_learn.py). (0, 0) when no needle is shown."""
        lab = cls[:, 1]
        m = lab > 0
        if not bool(m.any()):
            z = feats.new_zeros((), dtype=torch.float32)
            return z, z
        idx = torch.nonzero(m).squeeze(1)
        key = (idx // tokens_per_slice) * (1 + len(syn.SHAPES)) + lab[idx]
        groups, inv = torch.unique(key, return_inverse=True)
        x = feats[idx].float()
        pooled = x.new_zeros(len(groups), x.shape[1]).index_add_(0, inv, x)
        pooled = pooled / torch.bincount(inv, minlength=len(groups)).unsqueeze(1).to(x.dtype)
        target = groups % (1 + len(syn.SHAPES)) - 1
        logits = self.pooled_shape(F.layer_norm(pooled, pooled.shape[-1:]))
        loss = F.cross_entropy(logits, target)
        return loss, (logits.argmax(-1) == target).float().mean().detach()


def forward_batch(model, vision, processor, batch: dict, device, probe_layer: int = 3,
                  aux_weight: float = 0.5, opt_weight: float = 1.0, feat_heads: FeatureHeads | None = None,
                  feat_weight: float = 0.0, pool_weight: float = 0.0):
    """Loss of one packed batch: answer CE (hard targets with the needle in view, the uniform soft
    target without) + aux_weight * probe loss + opt_weight * option pointers + feat_weight *
    feature heads + pool_weight * pooled shape head. Returns (loss, stats as device tensors)."""
    from ..models.probe import probe_attention
    fr = batch["frames"].to(device, non_blocking=True)
    x = fr.permute(0, 3, 1, 2).float()
    codec = batch["codec"].to(device, non_blocking=True)
    if bool(codec.any()):
        x = torch.where(codec[:, None, None, None], emulate_codec(x), x)
    pv = _normalize_patchify(x, processor)
    with torch.set_grad_enabled(torch.is_grad_enabled() and vision.trainable):
        feats = vision(pv.to(next(model.parameters()).dtype), batch["n_slices"]).reshape(-1, vision.dim)
    ids, vis = batch["ids"].to(device, non_blocking=True), batch["vis"].to(device, non_blocking=True)
    E = model.get_input_embeddings()
    emb = E(ids)
    is_vis = vis >= 0
    emb = emb.masked_scatter(is_vis[..., None], feats[vis[is_vis]].to(emb.dtype))
    pos, mask = batch["pos"].to(device, non_blocking=True), batch["mask"].to(device, non_blocking=True)
    layers = model.model.language_model.layers
    attn_mod = layers[probe_layer].self_attn
    line = batch["line"].to(device, non_blocking=True)
    letter_ptr = batch["letter_ptr"].to(device, non_blocking=True)
    opt_rows = line.any(1)
    count_rows = batch["count_rows"].to(device, non_blocking=True) if "count_rows" in batch else None
    use_count = opt_weight > 0 and count_rows is not None and bool(count_rows.any())
    use_opt = opt_weight > 0 and (bool((letter_ptr >= 0).any()) or use_count)
    captured = {}

    def capture(name):
        def hook(mod, args, kwargs):
            captured[name] = (kwargs["hidden_states"] if "hidden_states" in kwargs else args[0],
                              kwargs["position_embeddings"])
        return hook
    handles = []
    if batch["aux"] or use_opt:
        handles.append(attn_mod.register_forward_pre_hook(capture("probe"), with_kwargs=True))
    if use_opt:
        for k in (1, 2):
            handles.append(layers[probe_layer - k].self_attn.register_forward_pre_hook(
                capture(f"prev{k}"), with_kwargs=True))
    try:
        hidden = model.model(inputs_embeds=emb, position_ids=pos, attention_mask=mask,
                             use_cache=False).last_hidden_state
    finally:
        for h in handles:
            h.remove()
    label = batch["label"].to(device, non_blocking=True)
    soft_pos = batch["soft_pos"].to(device, non_blocking=True)
    present = batch["present"].to(device, non_blocking=True)
    B = ids.shape[0]
    sel = label >= 0
    logp_hard = model.lm_head(hidden[sel]).float().log_softmax(-1)             # [n_lab, V]
    tok_nll = -logp_hard.gather(1, label[sel][:, None])[:, 0]
    row = torch.nonzero(sel)[:, 0]
    per_ex = torch.zeros(B, device=device).index_add(0, row, tok_nll)
    cnt = torch.zeros(B, device=device).index_add(0, row, torch.ones_like(tok_nll))
    hard = per_ex / cnt.clamp(min=1)
    logp_first = model.lm_head(hidden[torch.arange(B, device=device), soft_pos]).float().log_softmax(-1)
    soft_ce = -(batch["soft"].to(device, non_blocking=True) * logp_first).sum(-1)
    ce = torch.where(present, hard, soft_ce).mean()
    first_label = label[torch.arange(B, device=device), soft_pos]
    correct = ((logp_first.argmax(-1) == first_label) & present).sum()
    aux_terms = []
    if batch["aux"]:
        hp, (cos, sin) = captured["probe"]
        for i, n_pre, n_vis, Li, nd in batch["aux"]:
            q_idx = torch.arange(n_pre + n_vis + 1, Li, device=device)
            p = probe_attention(attn_mod, hp[i:i + 1, :Li], cos[i:i + 1, :Li],
                                sin[i:i + 1, :Li], q_idx, slice(n_pre, n_pre + n_vis))
            s = p.amax(dim=(1, 2))[0]                        # [n_vis] max over heads and queries
            nd = nd.to(device)
            aux_terms.append(-(torch.log(s[nd].sum() + 1e-9) - torch.log(s.sum() + 1e-9)))
    aux = torch.stack(aux_terms).mean() if aux_terms else ce.new_zeros(())
    opt = ce.new_zeros(())
    if use_opt:
        # (1) layer L-1, head 0: every option-line token after the letter looks at its letter
        hq, (cos, sin) = captured["prev1"]
        bi, ri = torch.nonzero(letter_ptr >= 0, as_tuple=True)
        if len(bi):
            p1 = rows_attention(layers[probe_layer - 1].self_attn, hq, cos, sin, bi, ri, head=0)
            opt = -torch.log(p1[torch.arange(len(bi), device=device), letter_ptr[bi, ri]] + 1e-6).mean()
        if use_count:
            # (5) layer L-2, head 0 ("count" rule): the answer position's attention on the events in
            # view against the first token (a sink) as c : 1, and nowhere else
            hq, (cos, sin) = captured["prev2"]
            bi = torch.nonzero(count_rows)[:, 0]
            p0 = rows_attention(layers[probe_layer - 2].self_attn, hq, cos, sin, bi, soft_pos[bi], head=0)
            ev = (p0 * batch["evidence_pos"].to(device, non_blocking=True)[bi]).sum(-1)
            both = ev + p0[:, 0]
            share, m = ev / both.clamp(min=1e-6), batch["count_target"].to(device, non_blocking=True)[bi]
            opt = opt - (m * torch.log(share + 1e-6) + (1 - m) * torch.log1p(-share + 1e-6)
                         + torch.log(both + 1e-6)).mean()
        needle_pos = batch["needle_pos"].to(device, non_blocking=True)
        seen = needle_pos.any(1)
        if bool(seen.any()):
            # (2) layer L-2, head 0: the answer position looks at the needle's tokens
            hq, (cos, sin) = captured["prev2"]
            bi = torch.nonzero(seen)[:, 0]
            p0 = rows_attention(layers[probe_layer - 2].self_attn, hq, cos, sin, bi, soft_pos[bi], head=0)
            opt = opt - torch.log((p0 * needle_pos[bi]).sum(-1) + 1e-6).mean()
        # (4) layer L-2, head 1: an option word looks at the needle when it names it, else not
        word_match = batch["word_match"].to(device, non_blocking=True)
        if bool((word_match >= 0).any()):
            hq, (cos, sin) = captured["prev2"]
            bi, ri = torch.nonzero(word_match >= 0, as_tuple=True)
            pw = rows_attention(layers[probe_layer - 2].self_attn, hq, cos, sin, bi, ri, head=1)
            m = (pw * needle_pos[bi]).sum(-1).clamp(1e-6, 1 - 1e-6)
            opt = opt - torch.where(word_match[bi, ri] == 1, torch.log(m), torch.log1p(-m)).mean()
        # (3) layer L, head 0: the answer position looks at the correct option's line
        if bool(opt_rows.any()):
            hp, (cos, sin) = captured["probe"]
            bi = torch.nonzero(opt_rows)[:, 0]
            p2 = rows_attention(attn_mod, hp, cos, sin, bi, soft_pos[bi], head=0)   # [n, L]
            opt = opt - torch.log((p2 * line[bi]).sum(-1) + 1e-6).mean()
    feat, feat_acc = ce.new_zeros(()), ce.new_zeros(())
    pool, pool_acc = ce.new_zeros(()), ce.new_zeros(())
    if feat_heads is not None and (feat_weight > 0 or pool_weight > 0):
        tok_cls = batch["tok_cls"].to(device, non_blocking=True)
        if feat_weight > 0:
            feat, feat_acc = feat_heads.loss(feats, tok_cls)
        if pool_weight > 0:
            pool, pool_acc = feat_heads.pooled_loss(feats, tok_cls)
    st = {"ce": ce.detach(), "aux": aux.detach(), "opt": opt.detach(), "feat": feat.detach(),
          "feat_acc": feat_acc, "pool": pool.detach(), "pool_acc": pool_acc, "correct": correct,
          "present": present.sum()}
    return ce + aux_weight * aux + opt_weight * opt + feat_weight * feat + pool_weight * pool, st


def rows_attention(attn, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, bi: torch.Tensor,
                   ri: torch.Tensor, head: int = 0) -> torch.Tensor:
    """Attention probabilities [n, L] of query rows (sequence bi[k], position ri[k]) over all keys
    of their sequence (causal), for one head, recomputed from the layer's input like the probe."""
    hd = attn.head_dim
    n_heads = attn.q_proj.out_features // hd
    kv = head // (n_heads // (attn.k_proj.out_features // hd))           # GQA
    q = attn.q_proj(h[bi, ri]).view(len(bi), n_heads, hd)[:, head]        # [n, hd]
    kw = attn.k_proj.weight.view(-1, hd, h.shape[-1])[kv]
    kb = attn.k_proj.bias.view(-1, hd)[kv] if attn.k_proj.bias is not None else 0
    k = h @ kw.T + kb                                                      # [B, L, hd]
    q = q * cos[bi, ri] + _rotate_half(q) * sin[bi, ri]
    k = k * cos + _rotate_half(k) * sin
    sc = torch.einsum("nd,nld->nl", q.float(), k[bi].float()) * attn.scaling
    causal = torch.arange(h.shape[1], device=h.device)[None, :] > ri[:, None]
    return sc.masked_fill(causal, float("-inf")).softmax(-1)


# ----------------------------------------------------------------------------------------------
# held-out evaluation through the inference code path (adapter.encode + adapter.forward)
# ----------------------------------------------------------------------------------------------


def _forward_example(adapter, ex):
    """One example through the inference path: its frames encoded, the kept tokens at their
    positions, the question's prompt, a forward pass with the probe at the reference layer.
    -> (prompt, ForwardOut, kept token indices)."""
    from ..question import Question
    feats = adapter.encode(torch.from_numpy(ex.frames), (FRAME, FRAME)).reshape(
        -1, adapter.model.config.text_config.hidden_size)
    keep = torch.from_numpy(ex.keep)
    coords = torch.stack([torch.from_numpy(ex.t_pos)[keep // TPS], (keep % TPS) // GRID, keep % GRID])
    q = ex.question
    pr = adapter.build_prompt(Question(q.text, tuple(q.options)))
    out = adapter.forward(pr, feats[keep.to(feats.device)], coords, ex.extent,
                          probe_layer=adapter.default_layer)
    return pr, out, keep


@torch.no_grad()
def evaluate(adapter, n: int = 200, seed: int = 12345, situation: str = "group") -> dict:
    """Accuracy with the needle in view, entropy with and without, and the probe's ranking of the
    needle's tokens, on held-out examples run exactly as the pipeline runs them."""
    from ..entropy import response_entropy
    rng = np.random.default_rng([seed, 7])
    tok = adapter.tokenizer
    rows = []
    for i in range(n):
        ex = make_example(rng, situation=situation, present=bool(i % 2 == 0), form="mc" if i % 4 < 2 else "open")
        q = ex.question
        pr, out, keep = _forward_example(adapter, ex)
        if q.options:
            h, hmax, probs = response_entropy(out.logits, pr.option_token_ids)
            pred = syn.LETTERS[int(np.argmax(probs))]
            correct = pred == q.answer
        else:
            h, hmax, _ = response_entropy(out.logits)
            first = tok.encode(q.answer, add_special_tokens=False)[0] if q.answer else -1
            correct = int(out.logits.argmax()) == first
        r = {"present": ex.present, "mc": bool(q.options), "entropy": h, "entropy_norm": h / hmax,
             "correct": bool(correct), "frames": ex.num_frames, "n_tokens": len(keep)}
        if ex.present and ex.needle.any():
            sc = out.scores.float().cpu()
            order = torch.argsort(sc, descending=True)
            rank = torch.empty_like(order)
            rank[order] = torch.arange(len(order))
            nd = torch.from_numpy(ex.needle)
            r["needle_best_rank"] = int(rank[nd].min())
            k = int(nd.sum())
            r["needle_recall_at_2k"] = float((rank[nd] < 2 * k).float().mean())
        rows.append(r)
    return summarize(rows)


SPARSE_TASKS = ("count", "order", "large")


@torch.no_grad()
def evaluate_tasks(adapter, n: int = 100, seed: int = 54321, tasks=tuple(TASK_MIX),
                   sparse: bool = False) -> dict:
    """Per task and situation (group pass / final pass), held-out examples run through the inference
    path: accuracy of the greedy answer against the target's argmax where the target has one (the
    evidence in view), mean H / H_max with a hard target, with a soft one (partial evidence) and
    without evidence, and the probe's needle share: the share of the evidence tokens among the
    probe's top-k tokens, k = the number of evidence tokens (group passes, all tokens in view).
    Entropies of multiple-choice questions only (H_max = ln 4). sparse=True: also the benchmark-form
    final pass ("sparse", see make_task_example) of count, order and large."""
    from ..entropy import response_entropy
    tok = adapter.tokenizer
    out = {}
    for task in tasks:
        sits = ("group", "final") + (("sparse",) if sparse and task in SPARSE_TASKS else ())
        for sit in sits:
            rng = np.random.default_rng([seed, 11, list(TASK_MIX).index(task), sits.index(sit)])
            acc, h_hard, h_soft, h_abs, share = [], [], [], [], []
            for i in range(n):
                ex = make_task_example(rng, task, situation=sit, present=bool(i % 3 != 2),
                                       form="mc" if i % 2 == 0 else "open")
                q = ex.question
                pr, o, keep = _forward_example(adapter, ex)
                if q.options:
                    h, hmax, probs = response_entropy(o.logits, pr.option_token_ids)
                    pred = syn.LETTERS[int(np.argmax(probs))]
                else:
                    h, hmax, _ = response_entropy(o.logits)
                    pred = int(o.logits.argmax())
                hn = h / hmax
                target = q.answer if ex.present else (max(ex.soft, key=lambda x: x[1])[0] if ex.soft else None)
                if target is not None:
                    if not q.options:
                        target = tok.encode(target, add_special_tokens=False)[0]
                    acc.append(pred == target)
                if q.options:                                # entropy over the letters (MC only)
                    (h_hard if ex.present else h_soft if ex.soft else h_abs).append(hn)
                if sit == "group" and ex.needle.any():
                    sc = o.scores.float().cpu()
                    k = int(ex.needle.sum())
                    top = torch.topk(sc, k).indices
                    share.append(float(torch.from_numpy(ex.needle)[top].float().mean()))
            mean = lambda v: round(float(np.mean(v)), 4) if v else None   # noqa: E731
            out[f"{task}/{sit}"] = {"acc": mean(acc), "n_acc": len(acc), "Hnorm_hard": mean(h_hard),
                                    "Hnorm_partial": mean(h_soft), "Hnorm_absent": mean(h_abs),
                                    "probe_topk_share": mean(share)}
    accs = [v["acc"] for k, v in out.items() if k.endswith("/final") and v["acc"] is not None]
    out["mean_final_acc"] = round(float(np.mean(accs)), 4) if accs else None
    return out


def summarize(rows: list[dict]) -> dict:
    out = {}
    for name, sel in (("mc", lambda r: r["mc"]), ("open", lambda r: not r["mc"])):
        pres = [r for r in rows if sel(r) and r["present"]]
        abs_ = [r for r in rows if sel(r) and not r["present"]]
        if pres:
            out[f"{name}_acc_present"] = round(float(np.mean([r["correct"] for r in pres])), 4)
            out[f"{name}_Hnorm_present_mean"] = round(float(np.mean([r["entropy_norm"] for r in pres])), 4)
            out[f"{name}_Hnorm_present_p90"] = round(float(np.quantile([r["entropy_norm"] for r in pres], 0.9)), 4)
        if abs_:
            out[f"{name}_Hnorm_absent_mean"] = round(float(np.mean([r["entropy_norm"] for r in abs_])), 4)
            out[f"{name}_Hnorm_absent_p10"] = round(float(np.quantile([r["entropy_norm"] for r in abs_], 0.1)), 4)
    ranks = [r["needle_best_rank"] for r in rows if "needle_best_rank" in r]
    if ranks:
        out["needle_best_rank_median"] = float(np.median(ranks))
        out["needle_best_in_top16"] = round(float(np.mean([x < 16 for x in ranks])), 4)
        out["needle_recall_at_2k"] = round(float(np.mean([r["needle_recall_at_2k"] for r in rows
                                                         if "needle_recall_at_2k" in r])), 4)
    out["n"] = len(rows)
    return out


# ----------------------------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------------------------

def check_vision(model, processor, device) -> float:
    """Max abs difference of (patchify + VisionTrainForward) against processor + get_video_features."""
    from .tiny import SPECIAL_TOKENS  # noqa: F401 - keeps the import graph explicit
    rng = np.random.default_rng(0)
    ex = make_example(rng, situation="group", present=True)
    fr = torch.from_numpy(ex.frames[:8])
    vp = processor.video_processor
    from ..models._common import video_processor_kwargs
    batch = vp(videos=[fr], size={"shortest_edge": FRAME * FRAME, "longest_edge": FRAME * FRAME},
               do_sample_frames=False, return_tensors="pt", **video_processor_kwargs(vp))
    pv_ref = batch["pixel_values_videos"].to(device)
    pv = patchify(fr.to(device), processor)
    with torch.no_grad():
        ref = model.model.get_video_features(pv_ref.float(), batch["video_grid_thw"].to(device)).pooler_output
        ref = torch.cat(list(ref)) if isinstance(ref, (tuple, list)) else ref
        got = VisionTrainForward(model)(pv.float(), 4).reshape(ref.shape)
    return max(float((pv - pv_ref).abs().max()), float((got - ref).abs().max()))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m adapttoken.training.train_tiny", description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=str(BUNDLED_MODEL))
    ap.add_argument("--init", default=None, help="start from this model folder (continue training)")
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--minutes", type=float, default=None,
                    help="stop after this much training time (the LR schedule follows the clock)")
    ap.add_argument("--batch", type=int, default=32, help="examples per regular batch")
    ap.add_argument("--short-batch", type=int, default=96, help="examples per batch of short examples")
    ap.add_argument("--short-p", type=float, default=0.4, help="share of batches of short examples")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--warmup", type=int, default=50)
    ap.add_argument("--aux", type=float, default=0.5, help="weight of the probe loss (0: off)")
    ap.add_argument("--feat", type=float, default=0.0,
                    help="weight of the feature heads' loss (colour and shape per visual token; 0: off)")
    ap.add_argument("--shape-pool", type=float, default=0.0,
                    help="weight of the pooled shape head's loss (each needle's shape from the mean of its "
                         "visual tokens, training only; 0: off)")
    ap.add_argument("--opt-aux", type=float, default=1.0,
                    help="weight of the option-pointer loss for multiple choice (0: off)")
    ap.add_argument("--mc-share", type=float, default=0.8, help="share of multiple-choice questions")
    ap.add_argument("--workers", type=int, default=max(1, min(12, (os.cpu_count() or 2) - 2)))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval", type=int, default=200, help="held-out examples per situation (0: skip)")
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--save-every", type=int, default=0, help="also save the model every N steps")
    ap.add_argument("--freeze-vision", action="store_true", help="train the language model only")
    ap.add_argument("--short-slices", type=int, default=8, help="most slices in a short example")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--log", default=None, help="also write the log lines and metrics as JSON here")
    ap.add_argument("--answer-pointer", choices=ANSWER_POINTERS, default="evidence",
                    help="where the answer-position pointers look (ANSWER_POINTERS; 'evidence': the shipped model's stages 3-7, 'task': stage 8, tried)")
    ap.add_argument("--tasks", default=None,
                    help="task mix as name=weight,... (default: TASK_MIX, the five benchmark tasks)")
    ap.add_argument("--sparse-p", type=float, default=0.0,
                    help="share of the final passes of count / order / large drawn in the benchmark's "
                         "answer-pass form (situation 'sparse', stage 10; 0: off, the shipped model's stages)")
    ap.add_argument("--eval-sparse", action="store_true",
                    help="held-out evaluation also on the 'sparse' final pass (count, order, large)")
    ap.add_argument("--count-in-view-p", type=float, default=COUNT_IN_VIEW_P,
                    help="count: the target's weight on the count in view (the rest on larger counts; "
                         "1.0: answer what is in view, stage 11)")
    args = ap.parse_args(argv)
    if not 0.0 < args.count_in_view_p <= 1.0:
        raise SystemExit(f"--count-in-view-p {args.count_in_view_p}: use a weight in (0, 1]")

    from ..models.qwen2_5_vl import Qwen25VLAdapter
    from .tiny import save_model_folder
    tasks = ({k: float(v) for k, v in (x.split("=") for x in args.tasks.split(","))} if args.tasks
             else dict(TASK_MIX))
    dev = torch.device(args.device)
    torch.manual_seed(args.seed)
    if args.init:
        from transformers import AutoProcessor, Qwen2_5_VLForConditionalGeneration
        proc = AutoProcessor.from_pretrained(args.init, local_files_only=True)
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(args.init, dtype=torch.float32,
                                                                   local_files_only=True)
    else:
        model, proc = build_untrained(args.seed)
    model.to(dev)
    adapter = Qwen25VLAdapter(model, proc)
    err = check_vision(model, proc, dev)
    print(f"vision train path vs processor + get_video_features: max abs diff {err:.2e}", flush=True)
    if err > (1e-2 if dev.type == "cuda" else 1e-3):
        raise SystemExit("the training vision path does not match transformers: refusing to train")
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params {n_params:,}  layers {adapter.num_layers}  probe layer {adapter.default_layer}", flush=True)
    vision = VisionTrainForward(model)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.freeze_vision:
        vision.trainable = False
        for prm in model.model.visual.parameters():
            prm.requires_grad_(False)
    bf16 = (dev.type == "cuda") if args.bf16 is None else args.bf16
    feat_heads = FeatureHeads(vision.dim).to(dev) if args.feat > 0 or args.shape_pool > 0 else None
    params = [prm for prm in model.parameters() if prm.requires_grad]
    params += list(feat_heads.parameters()) if feat_heads is not None else []
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    loader = torch.utils.data.DataLoader(
        BatchStream(proc, args.seed, args.batch, args.short_batch, args.short_p, args.mc_share,
                    args.short_slices, tasks, args.answer_pointer, args.sparse_p,
                    args.count_in_view_p), batch_size=None,
        num_workers=args.workers, pin_memory=dev.type == "cuda",
        prefetch_factor=4 if args.workers else None, persistent_workers=bool(args.workers))
    t0 = time.perf_counter()
    log = []
    model.train()
    it = iter(loader)
    step, window = 0, []
    while True:
        el = (time.perf_counter() - t0) / 60
        frac = el / args.minutes if args.minutes else step / max(args.steps, 1)
        if frac >= 1 or step >= args.steps:
            break
        # warmup, hold the peak for 60% of the run, then cosine down to 5%
        decay = 0.0 if frac < 0.6 else (frac - 0.6) / 0.4
        lr = args.lr * min(1.0, (step + 1) / args.warmup) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * decay)))
        for g in opt.param_groups:
            g["lr"] = lr
        batch = next(it)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=bf16):
            loss, st = forward_batch(model, vision, proc, batch, dev, probe_layer=adapter.default_layer,
                                     aux_weight=args.aux, opt_weight=args.opt_aux,
                                     feat_heads=feat_heads, feat_weight=args.feat, pool_weight=args.shape_pool)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        window.append(st)
        step += 1
        if step % args.log_every == 0 or step == 1:
            w = {k: float(sum(x[k] for x in window)) for k in window[0]}
            line = (f"step {step:5d}  {el * 60:6.1f}s  lr {lr:.2e}  ce {w['ce'] / len(window):.4f}  "
                    f"aux {w['aux'] / len(window):.4f}  opt {w['opt'] / len(window):.4f}  "
                    f"feat {w['feat'] / len(window):.4f} ({w['feat_acc'] / len(window):.3f})  "
                    f"pool {w['pool'] / len(window):.4f} ({w['pool_acc'] / len(window):.3f})  acc(first token, in view) "
                    f"{w['correct'] / max(1.0, w['present']):.3f}")
            print(line, flush=True)
            log.append(line)
            window = []
        if args.save_every and step % args.save_every == 0:
            model.eval()
            save_model_folder(Path(args.out), model, proc)
            model.train()
    train_s = time.perf_counter() - t0
    dev_name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
    print(f"trained {step} steps in {train_s:.0f} s on {dev_name}", flush=True)
    model.eval()
    out = Path(args.out)
    save_model_folder(out, model.to(torch.float32).cpu(), proc)
    model.to(dev)
    metrics = {"steps": step, "train_seconds": round(train_s, 1), "batch": args.batch,
               "short_batch": args.short_batch, "short_p": args.short_p, "lr": args.lr,
               "aux": args.aux, "opt_aux": args.opt_aux, "feat": args.feat, "shape_pool": args.shape_pool, "mc_share": args.mc_share, "freeze_vision": args.freeze_vision,
               "short_slices": args.short_slices, "answer_pointer": args.answer_pointer, "sparse_p": args.sparse_p, "count_in_view_p": args.count_in_view_p, "init": args.init, "tasks": tasks, "device": dev_name, "params": n_params,
               "transformers": __import__("transformers").__version__, "torch": torch.__version__}
    if args.eval:
        adapter = Qwen25VLAdapter(model, proc)
        metrics["eval_tasks"] = evaluate_tasks(adapter, args.eval, tasks=tuple(tasks),
                                                sparse=args.eval_sparse or args.sparse_p > 0)
        print(f"eval tasks: {json.dumps(metrics['eval_tasks'])}", flush=True)
    (out / "training.json").write_text(json.dumps(metrics, indent=1) + "\n")
    if args.log:
        Path(args.log).write_text(json.dumps({"log": log, "metrics": metrics}, indent=1))
    print(f"saved {out}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
