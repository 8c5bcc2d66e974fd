"""Numerical checks of the Qwen2.5-VL adapter against transformers' own computations."""
from __future__ import annotations

import torch
from transformers.video_utils import VideoMetadata

from adapttoken.question import Question
from adapttoken.positions import build_position_ids, video_extent
from adapttoken.models.probe import AttentionProbe


def _frames(t=8, h=56, w=84, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (t, h, w, 3), dtype=torch.uint8, generator=g)


def _native_inputs(adapter, frames, fps, text):
    proc = adapter.processor
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": text}]}],
        add_generation_prompt=True, tokenize=False)
    t = frames.shape[0]
    md = VideoMetadata(total_num_frames=t, fps=fps, frames_indices=list(range(t)))
    h, w = frames.shape[1:3]
    return proc(text=[prompt], videos=[frames], return_tensors="pt",
                videos_kwargs=dict(video_metadata=[md], do_sample_frames=False,
                                   size={"shortest_edge": h * w, "longest_edge": h * w},
                                   **adapter._vp_kwargs))


def _full_inputs(adapter, frames, fps, question):
    """Our explicit inputs for every token of `frames` sampled at `fps`."""
    resized = tuple(frames.shape[1:3])
    feats = adapter.encode(frames, resized)                  # [S, rows*cols, D]
    rows, cols = adapter.token_grid(resized)
    S = feats.shape[0]
    times = torch.arange(S, dtype=torch.float64) * 2 / fps
    tpos = adapter.time_positions(times)
    s, r, c = torch.meshgrid(torch.arange(S), torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([tpos[s.flatten()], r.flatten(), c.flatten()])
    extent = video_extent(tpos, (rows, cols))
    prompt = adapter.build_prompt(question)
    return feats.reshape(-1, feats.shape[-1]), coords, extent, prompt


def test_full_sequence_equals_native_forward(tiny_adapter):
    """Keeping every token with our explicit positions reproduces transformers' native forward.

    6 frames of 112x168 at fps 2: three 1-second slices (temporal ids 0, 2, 4) on a 4x6 token grid,
    chosen so that every transformers version builds the same ids as Qwen's rule: (1) whole seconds
    per slice, because transformers 5.17's get_rope_index truncates the seconds per slice before
    multiplying (`tokens_per_second * int(second_per_grid_t)`: at 0.25 s every slice gets t = 0;
    seen on the H100 run of 5.17 and locally), where Qwen's rule, which we follow and 5.23 has
    again, is floor(t * seconds * tokens_per_second); (2) t_max <= max(rows, cols) - 1, because
    transformers >= 5.3 resumes the text at max(rows, cols) instead of the largest id + 1
    (positions.py)."""
    ad = tiny_adapter
    frames, fps = _frames(6, 112, 168), 2.0
    q = Question("What happens?", ("a dog runs", "a cat sleeps"))
    inp = _native_inputs(ad, frames, fps, q.prompt_text())
    with torch.inference_mode():
        ref = ad.model(**inp, logits_to_keep=1).logits[0, -1]
    emb, coords, extent, prompt = _full_inputs(ad, frames, fps, q)
    # same token sequence as the processor produced
    ids = torch.cat([prompt.prefix_ids, torch.full((emb.shape[0],), ad.video_token_id),
                     prompt.suffix_ids])
    assert torch.equal(ids, inp["input_ids"][0])
    out = ad.forward(prompt, emb, coords, extent)
    assert (out.logits - ref).abs().max() < 1e-4


def test_positions_follow_qwens_rule_and_pruning_is_a_gather():
    # 3 slices of a 2x3 grid at 1 fps: t = floor(s * 2 s * 2 tokens/s) = 0, 4, 8
    tpos = torch.tensor([0, 4, 8])
    s, r, c = torch.meshgrid(torch.arange(3), torch.arange(2), torch.arange(3), indexing="ij")
    coords = torch.stack([tpos[s.flatten()], r.flatten(), c.flatten()])
    ext = video_extent(tpos, (2, 3))
    assert ext == 8
    pos = build_position_ids(5, coords, ext, 4)
    assert pos[:, :5].tolist() == [list(range(5))] * 3
    assert pos[:, 5].tolist() == [5, 5, 5]                    # slice 0, row 0, col 0
    assert pos[:, 5 + 13].tolist() == [13, 5, 6]             # slice 2, row 0, col 1 -> (5+8, 5+0, 5+1)
    assert pos[:, 5 + 10].tolist() == [9, 6, 6]              # slice 1, row 1, col 1
    # text after the video starts at max(t_max, H'-1, W'-1) + 1 = 5 + 8 + 1 (Qwen's rule);
    # transformers >= 5.3 would give 5 + max(2, 3) = 8 instead
    assert pos[:, -4].tolist() == [14, 14, 14]
    # pruning: the kept tokens' ids are exactly their full-video ids
    keep = torch.tensor([0, 3, 7, 11, 17])
    pruned = build_position_ids(5, coords[:, keep], ext, 4)
    full_idx = torch.cat([torch.arange(5), 5 + keep, torch.arange(5 + 18, 5 + 18 + 4)])
    assert torch.equal(pruned, pos[:, full_idx])


def test_pruned_forward_equals_masked_full_forward(tiny_adapter):
    ad = tiny_adapter
    frames, fps = _frames(8, 56, 84, seed=3), 2.0
    q = Question("Which colour?", ("red", "blue", "green"))
    emb, coords, extent, prompt = _full_inputs(ad, frames, fps, q)
    n = emb.shape[0]
    keep = torch.randperm(n, generator=torch.Generator().manual_seed(0))[: n * 2 // 5].sort().values
    out = ad.forward(prompt, emb[keep], coords[:, keep], extent)
    # reference: full sequence, same positions, 4D mask hiding the dropped visual keys
    x, pos = ad._inputs(prompt, emb, coords, extent)
    L, P = x.shape[1], len(prompt.prefix_ids)
    dropped = torch.zeros(L, dtype=torch.bool)
    dropped[P:P + n] = True
    dropped[P + keep] = False
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))
    allowed[:, dropped] = False
    allowed[dropped, dropped] = True
    mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    with torch.inference_mode():
        ref = ad.model(inputs_embeds=x, position_ids=pos, attention_mask=mask,
                       logits_to_keep=1).logits[0, -1]
    assert (out.logits - ref).abs().max() < 1e-5


def test_probe_equals_eager_attention(peaky):
    """The recomputed attention equals eager attention of the same forward (within 1e-5)."""
    ad = peaky
    frames, fps = _frames(8, 56, 84, seed=5), 4.0
    q = Question("What is shown in the video?", ("a dog", "a cat", "a car", "a man"))
    emb, coords, extent, prompt = _full_inputs(ad, frames, fps, q)
    x, pos = ad._inputs(prompt, emb, coords, extent)
    P, n = len(prompt.prefix_ids), emb.shape[0]
    q_idx = torch.arange(P + n + 1, x.shape[1])
    layer = 3
    ad.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), AttentionProbe(ad.text_model.layers[layer].self_attn) as pr:
            att = ad.model(inputs_embeds=x, position_ids=pos, output_attentions=True).attentions[layer]
        probe = pr.attention(q_idx)
    finally:
        ad.model.set_attn_implementation("sdpa")
    ref = att[:, :, q_idx].float()
    assert ref.max() > 0.5                                        # peaky: mistakes would show
    assert (probe - ref).abs().max() < 1e-5
    # the scores our sdpa forward returns agree with eager attention's max over heads/queries
    out = ad.forward(prompt, emb, coords, extent, probe_layer=layer, aggregation="max")
    eager_scores = ref[0, :, :, P:P + n].amax(dim=(0, 1))
    assert (out.scores - eager_scores).abs().max() < 1e-3
    out_mean = ad.forward(prompt, emb, coords, extent, probe_layer=layer, aggregation="mean")
    assert (out_mean.scores - ref[0, :, :, P:P + n].mean(dim=(0, 1))).abs().max() < 1e-4


def test_per_chunk_vision_features_equal_whole_video(tiny_adapter):
    ad = tiny_adapter
    frames = _frames(12, 56, 84, seed=7)
    whole = ad.encode(frames, (56, 84))
    parts = torch.cat([ad.encode(frames[i:i + 4], (56, 84)) for i in range(0, 12, 4)])
    assert whole.shape == (6, 2 * 3, ad.config.text_config.hidden_size)
    assert (whole - parts).abs().max() < 1e-5
    # and equal to transformers' get_video_features on the processor's output
    vp = ad.processor.video_processor
    b = vp(videos=[frames], size={"shortest_edge": 56 * 84, "longest_edge": 56 * 84},
           do_sample_frames=False, return_tensors="pt", **ad._vp_kwargs)
    with torch.inference_mode():
        ref = ad.model.model.get_video_features(b["pixel_values_videos"], b["video_grid_thw"]).pooler_output
    ref = torch.cat(list(ref)) if isinstance(ref, (list, tuple)) else ref
    assert (whole.reshape(-1, whole.shape[-1]) - ref).abs().max() < 1e-5


def test_generate_on_pruned_tokens_matches_manual_greedy(tiny_adapter):
    ad = tiny_adapter
    frames, fps = _frames(8, 56, 84, seed=9), 2.0
    q = Question("Describe the video.")
    emb, coords, extent, prompt = _full_inputs(ad, frames, fps, q)
    keep = torch.arange(0, emb.shape[0], 3)
    gen = ad.generate(prompt, emb[keep], coords[:, keep], extent, max_new_tokens=6)
    # manual greedy loop with explicit positions last + 1, last + 2, ...
    x, pos = ad._inputs(prompt, emb[keep], coords[:, keep], extent)
    toks, last = [], int(pos[0, 0, -1])
    with torch.inference_mode():
        for i in range(6):
            o = ad.model(inputs_embeds=x, position_ids=pos, use_cache=False, logits_to_keep=1)
            nxt = int(o.logits[0, -1].argmax())
            toks.append(nxt)
            if nxt == ad.tokenizer.convert_tokens_to_ids("<|im_end|>"):
                break
            x = torch.cat([x, ad.model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
            pos = torch.cat([pos, torch.full((3, 1, 1), last + 1 + i)], 2)
    assert gen.token_ids == toks
    assert len(gen.step_logits) == len(toks)


def test_option_letters_and_prompt(tiny_adapter):
    q = Question("What colour was the shape?", ("red", "green", "blue", "yellow"))
    p = tiny_adapter.build_prompt(q)
    tok = tiny_adapter.tokenizer
    assert tok.decode(p.prefix_ids).endswith("<|vision_start|>")
    assert tok.decode(p.suffix_ids).startswith("<|vision_end|>")
    assert "D. yellow" in tok.decode(p.suffix_ids)
    assert tok.decode(p.suffix_ids).endswith("<|im_start|>assistant\n")
    assert len(p.option_token_ids) == 4
    for letter, ids in zip("ABCD", p.option_token_ids):
        assert ids and all(tok.decode([i]).strip() == letter for i in ids)


def _qwen_original_rope_index(input_ids, video_grid_thw, second_per_grid_ts, video_token_id,
                              vision_start_id, merge=2, tokens_per_second=2):
    """Qwen2.5-VL's original get_rope_index (Qwen's release code, transformers <= 5.2), written
    out independently for one sequence with video blocks: text tokens count on from the largest
    id used so far + 1; a video token gets (st + floor(tp * second_per_grid * tokens_per_second),
    st + row, st + col)."""
    ids = input_ids.tolist()
    out, pos, v = [], 0, 0
    i = 0
    while i < len(ids):
        if ids[i] == video_token_id and i > 0 and ids[i - 1] == vision_start_id:
            t, h, w = (int(x) for x in video_grid_thw[v])
            hm, wm = h // merge, w // merge
            st = pos
            for tp in range(t):
                tt = int(tp * float(second_per_grid_ts[v]) * tokens_per_second)
                for r in range(hm):
                    for c in range(wm):
                        out.append((st + tt, st + r, st + c))
            n = t * hm * wm
            pos = max(max(p) for p in out[-n:]) + 1
            i += n
            v += 1
        else:
            out.append((pos, pos, pos))
            pos += 1
            i += 1
    return torch.tensor(out, dtype=torch.long).T            # [3, L]


def test_text_after_the_video_follows_qwens_original_rule_when_time_exceeds_the_grid(tiny_adapter):
    """The case transformers >= 5.3 gets wrong (its text resumes at max(rows, cols)) and 5.17 too
    (seconds truncated per slice): 6 frames at 0.5 fps = 3 slices of 4 s, temporal ids 0, 8, 16 on a
    4x6 grid, so t_max = 16 > 5. Our ids must equal an independent writing of Qwen's original rule,
    and our forward must equal the model's own forward given those ids."""
    ad = tiny_adapter
    frames, fps = _frames(6, 112, 168), 0.5
    q = Question("What happens?", ("a dog runs", "a cat sleeps"))
    inp = _native_inputs(ad, frames, fps, q.prompt_text())
    assert float(inp["second_per_grid_ts"][0]) == 4.0
    ref_pos = _qwen_original_rope_index(
        inp["input_ids"][0], inp["video_grid_thw"], inp["second_per_grid_ts"], ad.video_token_id,
        ad.tokenizer.convert_tokens_to_ids("<|vision_start|>"),
        tokens_per_second=ad.tokens_per_second)
    emb, coords, extent, prompt = _full_inputs(ad, frames, fps, q)
    assert int(coords[0].max()) == 16 and extent == 16       # time ids exceed the 4x6 grid
    _, pos = ad._inputs(prompt, emb, coords, extent)
    assert torch.equal(pos[:, 0].cpu(), ref_pos)
    n_text_after = len(prompt.suffix_ids)
    first_after = ref_pos[:, -n_text_after]
    assert first_after.tolist() == [len(prompt.prefix_ids) + 17] * 3
    with torch.inference_mode():
        ref = ad.model(**inp, position_ids=ref_pos[:, None], logits_to_keep=1).logits[0, -1]
    out = ad.forward(prompt, emb, coords, extent)
    assert (out.logits - ref).abs().max() < 1e-4


def _letters_tokenizer(vocab_chars: str):
    """A real fast tokenizer (tokenizers' BPE, no byte fallback) that knows only `vocab_chars`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    vocab = {"[UNK]": 0, **{c: i + 1 for i, c in enumerate(vocab_chars)}}
    bpe = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=bpe, unk_token="[UNK]")


def test_option_letter_without_a_single_token_is_a_clear_error():
    import pytest

    from adapttoken.errors import InputError
    from adapttoken.models._common import option_token_ids
    tok = _letters_tokenizer("ABDabcd")                     # no 'C': it encodes to [UNK]
    assert len(tok.encode("C", add_special_tokens=False)) == 1   # a single token, but the wrong one
    assert option_token_ids(tok, "ABD") == [[1], [2], [3]]
    with pytest.raises(InputError, match=r"option letter 'C' is not a single token.*fewer options"):
        option_token_ids(tok, "ABCD")


def test_the_adapter_refuses_a_letter_its_tokenizer_cannot_score(tiny_adapter, monkeypatch):
    """Through build_prompt of the real adapter: no NaN entropy downstream, an InputError here."""
    import pytest

    from adapttoken.errors import InputError
    monkeypatch.setattr(tiny_adapter.processor, "tokenizer", _letters_tokenizer("AB"), raising=False)
    with pytest.raises(InputError, match="option letter 'C'"):
        tiny_adapter.build_prompt(Question("Which?", ("x", "y", "z")))
