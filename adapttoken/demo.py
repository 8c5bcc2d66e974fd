"""`python -m adapttoken demo`: a long synthetic video, AdaptToken and Lite with the bundled model.

Generates a seeded video (one coloured needle shown for 4-8 frames among grey distractors, 8 fps,
112x112), asks its multiple-choice "what" question with AdaptToken-Lite and then AdaptToken, prints
the answers, every group's entropy and budget, the groups Lite skipped and the seconds, and writes
the Selection Preview images. Runs offline on a CPU with only what the repository ships.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

DEMO_BUDGET = 256          # visual tokens kept (16 per slice: 16 slices' worth)
DEMO_GROUP_SIZE = 64       # slices per group pass (1024 tokens)
DEMO_FORM = "mc"           # "mc": 4 options, entropy over the letters; "open": the answer words
DEMO_ATTRIBUTE = "colour"  # what the question asks: the bundled model has learned colour (see its card)


def _stop_story(res, cfg, question, tokenizer) -> str:
    """Why Lite stopped where it did (entropy.StopRule with cfg's threshold and confirm), from the
    groups' reported entropies and favoured answers (GroupReport.top)."""
    run = [g for g in res.groups if g.entropy_norm is not None]
    last = run[-1]
    agree = [g.group for g in run if g.entropy_norm < cfg.stop_threshold and g.top == last.top]
    if not res.skipped_groups:
        if last.entropy_norm >= cfg.stop_threshold or len(agree) < cfg.stop_confirm:
            return (f"Lite read every group: no {cfg.stop_confirm} groups under H/H_max "
                    f"{cfg.stop_threshold} agreed on the answer")
        return ("Lite read every group: where confident groups agreed, the answer over the tokens "
                "chosen so far favoured another answer (the answer check)")
    name = question.letters[last.top] if question.options else tokenizer.decode([last.top]).strip()
    check = (", and the answer over the tokens chosen so far favours it too"
             if cfg.stop_check_answer else "")
    return (f"Lite stopped after group {last.group}: groups {', '.join(map(str, agree))} were under "
            f"H/H_max {cfg.stop_threshold} and favour {name!r}{check} "
            f"(confirm={cfg.stop_confirm}: that many confident groups must agree)")


def demo_config(frames: int):
    """The settings the tiny model suits: every frame sampled at its own 112x112 size."""
    from .pipeline import AdaptTokenConfig
    return AdaptTokenConfig(num_frames=frames, max_pixels=112 * 112, min_pixels=112 * 112,
                            group_size=min(DEMO_GROUP_SIZE, max(1, frames // 2)), budget=DEMO_BUDGET,
                            max_new_tokens=4)


def _groups_table(sel, needle) -> list[str]:
    lines = []
    for g in sel.groups:
        shown = any(needle.frame_start <= f < needle.frame_end for f in g.frame_indices)
        mark = "  <- needle in view" if shown else ""
        if g.entropy is None:
            lines.append(f"  group {g.group:3d}: skipped{mark}")
        else:
            lines.append(f"  group {g.group:3d}: entropy {g.entropy:.3f} nats ({g.entropy_norm:.2f} of max)"
                         f"  budget {g.budget:4d}  kept {g.kept:4d}{mark}")
    return lines


def run_demo(args) -> int:
    import torch
    from PIL import Image

    from .decode import open_video
    from .defaults import default_model_dir
    from .models.loading import load_model
    from .pipeline import answer, select
    from .preview import render_preview
    from .question import Question
    from .training import synthetic as syn

    frames = int(getattr(args, "frames", 2048) or 2048)
    form = getattr(args, "form", None) or DEMO_FORM
    seed = int(getattr(args, "seed", 0) or 0)
    out = Path(getattr(args, "out", None) or "adapttoken_demo")
    model_dir = getattr(args, "model", None) or default_model_dir()
    out.mkdir(parents=True, exist_ok=True)
    if frames < 4:
        from .errors import InputError
        raise InputError(f"--frames {frames}: use at least 4 frames")

    t0 = time.perf_counter()
    video = out / f"demo_{DEMO_ATTRIBUTE}_{frames}f_seed{seed}.mp4"
    meta = Path(str(video) + ".json")
    sample = syn.Sample.from_dict(json.loads(meta.read_text())) if video.exists() and meta.exists() else None
    if sample is None or len(sample.questions) < 2:
        sample = syn.make_sample(video, frames, seed, kind="what", form="both", attribute=DEMO_ATTRIBUTE)
        meta.write_text(json.dumps(sample.to_dict()))
    gen_s = time.perf_counter() - t0
    q, needle = sample.questions[0 if form == "mc" else 1], sample.needles[0]
    print(f"video: {video} ({frames} frames, {frames / sample.fps:.0f} s at {sample.fps:g} fps, "
          f"112x112; made in {gen_s:.1f} s)")
    print(f"needle: a {needle.colour} {needle.shape} on frames {needle.frame_start}-{needle.frame_end - 1} "
          f"({needle.frame_start / sample.fps:.1f} s)")
    print(f"question: {q.text}")
    for L, o in zip(syn.LETTERS, q.options):
        print(f"  {L}. {o}")
    print(f"correct answer: {q.answer}" + (f" ({q.answer_text})" if q.options else ""))

    t0 = time.perf_counter()
    model = load_model(model_dir, device="cpu" if not torch.cuda.is_available() else "auto")
    print(f"model: {model_dir} (loaded in {time.perf_counter() - t0:.1f} s)")
    cfg = demo_config(frames)
    question = Question(q.text, tuple(q.options))
    v = open_video(video, num_frames=cfg.num_frames, max_pixels=cfg.max_pixels,
                   min_pixels=cfg.min_pixels, frames_per_slice=model.adapter.frames_per_slice)
    feats = model.features_for(v)
    n_groups = -(-feats.num_slices // cfg.group_size)
    print(f"{v.num_frames} frames -> {feats.num_slices} slices x {feats.tokens_per_slice} tokens = "
          f"{feats.num_tokens} visual tokens; {n_groups} groups of {cfg.group_size} slices; budget "
          f"{cfg.budget} tokens")

    results = {}
    for method in ("lite", "adapttoken"):
        feats.reset_stats()
        t0 = time.perf_counter()
        sel = select(model, v, question, cfg, method)
        res = answer(sel, cfg.max_new_tokens)
        wall = time.perf_counter() - t0
        got = res.answer.strip()
        ok = got[:1] == q.answer if q.options else got.lower().rstrip(".") == q.answer
        verdict = "correct" if ok else "wrong"
        name = "AdaptToken-Lite" if method == "lite" else "AdaptToken"
        print(f"\n{name}: answer {res.answer!r} ({verdict})   {wall:.1f} s"
              + ("   (re-uses the vision features Lite computed)" if method == "adapttoken" else ""))
        if res.option_probs:
            print("  option probabilities: " + "  ".join(f"{k} {p:.3f}" for k, p in res.option_probs.items()))
        print(f"  group passes: {res.group_passes} of {len(res.groups)}; kept {len(res.kept_tokens)} "
              f"tokens ({res.redundant_dropped} dropped as redundant)")
        for line in _groups_table(sel, needle):
            print(line)
        if method == "lite":
            print("  " + _stop_story(res, cfg, question, model.adapter.tokenizer))
        if res.skipped_groups:
            wasted = res.extra.get("features", {}).get("ride_along_wasted_frames", 0)
            first, last = res.skipped_groups[0], res.skipped_groups[-1]
            print(f"  Lite skipped group{'s' if last > first else ''} "
                  f"{first}{f'-{last}' if last > first else ''} "
                  f"({len(res.skipped_groups)} of {len(res.groups)}): never encoded or run"
                  + (f"; {wasted} of their frames were decoded on the way (next to the groups read) "
                     "and dropped" if wasted else ", none of their frames decoded"))
        print("  seconds: " + "  ".join(f"{k} {s:.2f}" for k, s in res.seconds.items()))
        png = out / f"preview_{method}.png"
        Image.fromarray(render_preview(sel)).save(png)
        (out / f"result_{method}.json").write_text(res.to_json(indent=1))
        results[method] = (res, png, wall)
    print("\nfiles:")
    print(f"  video          {video}")
    for method, (_, png, _) in results.items():
        print(f"  preview ({method}) {png}")
        print(f"  result ({method})  {out / f'result_{method}.json'}")
    return 0
