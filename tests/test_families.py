"""Qwen3-VL, InternVL and LLaVA-OneVision adapters vs transformers' own computations, on tiny
random-weight models of the real architectures: the same checks as test_model.py for Qwen2.5-VL."""
from __future__ import annotations

import json

import pytest
import torch
from transformers.video_utils import VideoMetadata

import adapttoken as at
from adapttoken.models._common import reference_layer, video_processor_kwargs
from adapttoken.models.loading import _families
from adapttoken.question import Question
from adapttoken.models.probe import AttentionProbe
from adapttoken.training.tiny_families import FAMILIES, build_tiny_family

Q = Question("What happens in the video?", ("a dog runs", "a cat sleeps", "a car drives"))
SLICES = 4


def _adapter(family, **kw):
    model, proc = build_tiny_family(family, **kw)
    return _families()[family](model, proc)


@pytest.fixture(scope="module", params=FAMILIES)
def ad(request):
    return _adapter(request.param, seed=0, layers=4)


def _sharpen(model):
    """Sharp attention, so RoPE/GQA/mask mistakes in the probe would show."""
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            a = layer.self_attn
            if hasattr(a, "q_norm"):                  # Qwen3: q/k are RMS-normalised per head
                a.q_norm.weight.mul_(5)
                a.k_norm.weight.mul_(5)
            else:
                a.q_proj.weight.mul_(25)
                a.k_proj.weight.mul_(25)
                a.q_proj.bias.normal_(0, 1)
                a.k_proj.bias.normal_(0, 1)


def _frames(ad, seed=0):
    """uint8 frames of SLICES slices at the family's encoder size (Qwen3-VL: 64 x 96 -> 2 x 3)."""
    h, w = (64, 96) if ad.family == "qwen3_vl" else ad.resized_size(0, 0)
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (SLICES * ad.frames_per_slice, h, w, 3), dtype=torch.uint8,
                         generator=g)


def _times(ad):
    """Seconds of each slice; for Qwen3-VL they match the processor's timestamps below."""
    return torch.arange(SLICES, dtype=torch.float64) * (2.0 if ad.family == "qwen3_vl" else 0.5)


def _native_inputs(ad, frames, question):
    proc = ad.processor
    text = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "video"},
                                      {"type": "text", "text": question.prompt_text()}]}],
        add_generation_prompt=True, tokenize=False)
    kw = dict(do_sample_frames=False)
    if ad.family == "qwen3_vl":
        # frame indices 0,0,2,2,4,4... at 1 fps: the processor writes <0.0>, <2.0>... seconds
        md = VideoMetadata(total_num_frames=100, fps=1.0,
                           frames_indices=[2 * s for s in range(SLICES) for _ in range(2)])
        kw.update(video_metadata=[md], do_resize=False, **video_processor_kwargs(proc.video_processor))
    return proc(text=[text], videos=[frames], return_tensors="pt", videos_kwargs=kw)


def _full_inputs(ad, frames, question):
    resized = tuple(frames.shape[1:3])
    feats = ad.encode(frames, resized)
    rows, cols = ad.token_grid(resized)
    tpos = ad.time_positions(_times(ad))
    s, r, c = torch.meshgrid(torch.arange(SLICES), torch.arange(rows), torch.arange(cols),
                             indexing="ij")
    coords = torch.stack([tpos[s.flatten()], r.flatten(), c.flatten()])
    extent = max(int(tpos.max()), rows - 1, cols - 1)        # what SliceFeatures.extent_of gives
    return feats.reshape(-1, feats.shape[-1]), coords, extent, ad.build_prompt(question)


def _logits(ad, seq, mask=None):
    with torch.inference_mode(), ad._context(seq):
        return ad.model(inputs_embeds=seq.embeds, position_ids=seq.position_ids, attention_mask=mask,
                        use_cache=False, logits_to_keep=1).logits[0, -1].float()


# -- keep-all == transformers' native forward --------------------------------------------------

def test_keep_all_equals_native_forward(ad):
    frames = _frames(ad, seed=1)
    inp = _native_inputs(ad, frames, Q)
    with torch.inference_mode():
        ref = ad.model(**inp, logits_to_keep=1).logits[0, -1]
    emb, coords, extent, prompt = _full_inputs(ad, frames, Q)
    if ad.family == "qwen3_vl":
        ad.outer_wrapper = True                  # the layout transformers 5.x's processor builds
    try:
        seq = ad._sequence(prompt, emb, coords, extent)
        out = ad.forward(prompt, emb, coords, extent)
    finally:
        ad.outer_wrapper = False
    assert seq.input_ids == inp["input_ids"][0].tolist()          # same tokens, same wrappers
    diff = (out.logits - ref).abs().max().item()
    print(f"{ad.family}: keep-all vs native max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_qwen3_default_layout_and_positions():
    """Default layout (Qwen's original processor): no outer vision pair; positions = what
    transformers' own get_rope_index gives for that token sequence; deepstack changes the logits."""
    ad = _adapter("qwen3_vl", seed=2, layers=2)
    frames = _frames(ad, seed=2)
    emb, coords, extent, prompt = _full_inputs(ad, frames, Q)
    inp = _native_inputs(ad, frames, Q)
    seq = ad._sequence(prompt, emb, coords, extent)
    native = inp["input_ids"][0].tolist()
    vs, ve = ad.vision_start_id, ad.vision_end_id
    first_vs = native.index(vs)
    last_ve = len(native) - 1 - native[::-1].index(ve)
    assert seq.input_ids == native[:first_vs] + native[first_vs + 1:last_ve] + native[last_ve + 1:]
    ids = torch.tensor([seq.input_ids])
    mm = (ids == ad.video_token_id).int() * 2
    grid = inp["video_grid_thw"]
    hf_pos, _ = ad.model.model.get_rope_index(ids, mm_token_type_ids=mm, video_grid_thw=grid)
    assert torch.equal(seq.position_ids.cpu(), hf_pos)
    # deepstack is injected: dropping it changes the answer logits
    with_ds = _logits(ad, seq)
    seq.deepstack = []
    assert (with_ds - _logits(ad, seq)).abs().max() > 1e-3


# -- pruned == full forward with the dropped keys masked ---------------------------------------

def test_pruned_forward_equals_masked_full_forward(ad):
    frames = _frames(ad, seed=3)
    emb, coords, extent, prompt = _full_inputs(ad, frames, Q)
    n, tps = emb.shape[0], emb.shape[0] // SLICES
    g = torch.Generator().manual_seed(0)
    # ~40% of the tokens, at least one per slice, so every slice keeps its wrapper
    keep = torch.cat([s * tps + torch.randperm(tps, generator=g)[:max(1, tps * 2 // 5)].sort().values
                      for s in range(SLICES)])
    out = ad.forward(prompt, emb[keep], coords[:, keep], extent)
    full = ad._sequence(prompt, emb, coords, extent)
    L = full.embeds.shape[1]
    dropped = torch.zeros(L, dtype=torch.bool)
    dropped[full.visual_rows] = True
    dropped[full.visual_rows[keep]] = False
    allowed = torch.tril(torch.ones(L, L, dtype=torch.bool))
    allowed[:, dropped] = False
    allowed[dropped, dropped] = True
    mask = torch.zeros(1, 1, L, L).masked_fill(~allowed, torch.finfo(torch.float32).min)
    if full.position_ids.dim() == 2:             # 1D families: the kept rows are renumbered 0..L'-1
        full.position_ids = ((~dropped).long().cumsum(0) - 1).clamp(min=0)[None]
    ref = _logits(ad, full, mask)
    diff = (out.logits - ref).abs().max().item()
    print(f"{ad.family}: pruned vs masked full max |diff| = {diff:.2e}")
    assert diff < 1e-5


def test_slices_without_kept_tokens_drop_their_wrapper(ad):
    frames = _frames(ad, seed=4)
    emb, coords, extent, prompt = _full_inputs(ad, frames, Q)
    tps = emb.shape[0] // SLICES
    keep = torch.cat([torch.arange(0, 2), 2 * tps + torch.arange(tps)])     # slices 0 and 2 only
    seq = ad._sequence(prompt, emb[keep], coords[:, keep], extent)
    text = ad.tokenizer.decode(seq.input_ids)
    assert len(seq.visual_rows) == len(keep)
    if ad.family == "qwen3_vl":
        assert "<0.0 seconds>" in text and "<4.0 seconds>" in text and "<2.0 seconds>" not in text
        assert seq.input_ids.count(ad.vision_start_id) == 2
        # the second kept block starts right after the first block's text: positions are compact
        assert int(seq.position_ids[0, 0].max()) < int(_full_pos_max(ad, emb, coords, extent, prompt))
    elif ad.family == "internvl":
        assert "Frame1: <img>" in text and "\nFrame3: <img>" in text and "Frame2" not in text
        ad.frame_labels = "kept"
        try:
            text = ad.tokenizer.decode(ad._sequence(prompt, emb[keep], coords[:, keep], extent).input_ids)
        finally:
            ad.frame_labels = "original"
        assert "Frame1: <img>" in text and "\nFrame2: <img>" in text and "Frame3" not in text
    else:
        assert seq.input_ids.count(ad.video_token_id) == len(keep) + 1           # + the newline
    if seq.position_ids.dim() == 2:
        assert torch.equal(seq.position_ids[0].cpu(), torch.arange(len(seq.input_ids)))


def _full_pos_max(ad, emb, coords, extent, prompt):
    return ad._sequence(prompt, emb, coords, extent).position_ids[0, 0].max()


# -- attention probe == eager attention --------------------------------------------------------

@pytest.mark.parametrize("family", FAMILIES)
def test_probe_equals_eager_attention(family):
    ad = _adapter(family, seed=1, layers=6)
    _sharpen(ad.model)
    frames = _frames(ad, seed=5)
    q = Question("What is shown in the video?", ("a dog", "a cat", "a car", "a man"))
    emb, coords, extent, prompt = _full_inputs(ad, frames, q)
    seq = ad._sequence(prompt, emb, coords, extent)
    layer = 3
    q_idx = torch.arange(seq.query_start, seq.embeds.shape[1])
    ad.model.set_attn_implementation("eager")
    try:
        with torch.inference_mode(), ad._context(seq), \
                AttentionProbe(ad.text_model.layers[layer].self_attn) as pr:
            att = ad.model(inputs_embeds=seq.embeds, position_ids=seq.position_ids,
                           output_attentions=True).attentions[layer]
        probe = pr.attention(q_idx)
    finally:
        ad.model.set_attn_implementation("sdpa")
    ref = att[:, :, q_idx].float()
    assert ref.max() > 0.5                                        # peaky: mistakes would show
    diff = (probe - ref).abs().max().item()
    print(f"{family}: probe vs eager max |diff| = {diff:.2e}")
    assert diff < 1e-5
    out = ad.forward(prompt, emb, coords, extent, probe_layer=layer, aggregation="max")
    eager_scores = ref[0][..., seq.visual_rows].amax(dim=(0, 1))
    assert out.scores.shape == (emb.shape[0],)
    assert (out.scores - eager_scores).abs().max() < 1e-3


# -- generate on pruned tokens == a manual greedy loop -----------------------------------------

def test_generate_on_pruned_tokens_matches_manual_greedy(ad):
    frames = _frames(ad, seed=6)
    emb, coords, extent, prompt = _full_inputs(ad, frames, Question("Describe the video."))
    keep = torch.arange(0, emb.shape[0], 3)
    gen = ad.generate(prompt, emb[keep], coords[:, keep], extent, max_new_tokens=6)
    seq = ad._sequence(prompt, emb[keep], coords[:, keep], extent)
    x, pos = seq.embeds, seq.position_ids
    eos = set(ad.eos_token_ids())
    toks = []
    with torch.inference_mode():
        for _ in range(6):
            kw = {}
            if seq.deepstack:                     # Qwen3-VL: the text model's own arguments
                mask = torch.zeros(1, x.shape[1], dtype=torch.bool)
                mask[0, seq.visual_rows] = True
                kw = dict(visual_pos_masks=mask, deepstack_visual_embeds=seq.deepstack)
            h = ad.text_model(inputs_embeds=x, position_ids=pos, use_cache=False, **kw)
            nxt = int(ad.model.lm_head(h.last_hidden_state[:, -1]).argmax())
            toks.append(nxt)
            if nxt in eos:
                break
            x = torch.cat([x, ad.model.get_input_embeddings()(torch.tensor([[nxt]]))], 1)
            pos = torch.cat([pos, pos[..., -1:] + 1], -1)
    assert gen.token_ids == toks
    assert len(gen.step_logits) == len(toks)


# -- vision features -----------------------------------------------------------------------------

def test_per_chunk_vision_features_equal_whole_video(ad):
    frames = _frames(ad, seed=7)
    resized = tuple(frames.shape[1:3])
    whole = ad.encode(frames, resized)
    f = ad.frames_per_slice
    parts = torch.cat([ad.encode(frames[i:i + 2 * f], resized) for i in range(0, len(frames), 2 * f)])
    rows, cols = ad.token_grid(resized)
    hidden = ad.config.text_config.hidden_size
    levels = getattr(ad, "deepstack_levels", 0)
    assert whole.shape == (SLICES, rows * cols, hidden * (1 + levels))
    assert (whole - parts).abs().max() < 1e-5


def test_option_letters_and_prompt(ad):
    p = ad.build_prompt(Q)
    tok = ad.tokenizer
    assert "C. a car drives" in tok.decode(p.suffix_ids)
    assert tok.decode(p.suffix_ids).rstrip().endswith("assistant")
    for letter, ids in zip("ABC", p.option_token_ids):
        assert ids and all(tok.decode([i]).strip() == letter for i in ids)


def test_default_reference_layers():
    from adapttoken.models.internvl import InternVLAdapter
    from adapttoken.models.llava_onevision import LlavaOnevisionAdapter
    from adapttoken.models.qwen3_vl import Qwen3VLAdapter
    assert reference_layer(32, InternVLAdapter.reference_layer_fraction) == 15   # InternVL2.5-8B, measured
    assert reference_layer(28, InternVLAdapter.reference_layer_fraction) == 13   # InternVL3-8B, scaled
    assert reference_layer(36, Qwen3VLAdapter.reference_layer_fraction) == 25    # Qwen3-VL-8B, guess
    assert reference_layer(28, LlavaOnevisionAdapter.reference_layer_fraction) == 20
    assert reference_layer(4, 0.7) == 3


# -- loading: the family comes from config.json ------------------------------------------------

def test_loader_detects_family(ad, tmp_path):
    from adapttoken.training.tiny import save_model_folder
    folder = save_model_folder(tmp_path / f"tiny-{ad.family}", ad.model, ad.processor)
    assert json.loads((folder / "config.json").read_text())["model_type"] == ad.family
    assert at.detect_family(folder) == ad.family
    m = at.load_model(folder, device="cpu", dtype="fp32")
    assert type(m.adapter) is type(ad) and m.adapter.family == ad.family
    frames = _frames(ad, seed=8)
    emb, coords, extent, prompt = _full_inputs(ad, frames, Q)
    a = ad.forward(prompt, emb, coords, extent).logits
    p2 = m.adapter.build_prompt(Q)
    assert torch.equal(p2.prefix_ids, prompt.prefix_ids) and torch.equal(p2.suffix_ids, prompt.suffix_ids)
    b = m.adapter.forward(p2, m.adapter.encode(frames, tuple(frames.shape[1:3])).flatten(0, 1),
                          coords, extent).logits
    assert (a - b).abs().max() < 1e-5


def test_unsupported_family_lists_the_supported_ones(tmp_path):
    for model_type, extra in (("llama", ""), ("internvl_chat", "-hf")):
        d = tmp_path / model_type
        d.mkdir()
        (d / "config.json").write_text(json.dumps({"model_type": model_type}))
        with pytest.raises(at.ModelLoadError) as e:
            at.load_model(d)
        msg = str(e.value)
        assert "supported families: internvl, llava_onevision, qwen2_5_vl, qwen3_vl" in msg
        assert model_type in msg and extra in msg


# -- the whole method on a real video file -----------------------------------------------------

@pytest.fixture(scope="module")
def video_file(tmp_path_factory):
    pytest.importorskip("av")
    from videos import write_video
    return write_video(tmp_path_factory.mktemp("v") / "clip.mp4", 48, width=64, height=48, fps=8)


def test_whole_pipeline_runs(ad, video_file):
    model = at.Model(ad, name=ad.family)
    cfg = at.AdaptTokenConfig(num_frames=16, group_size=2, budget=20, max_pixels=64 * 64,
                              min_pixels=64 * 64, max_new_tokens=4)
    res = at.ask(model, video_file, Q, config=cfg, fresh_features=True)
    slices = 16 // ad.frames_per_slice
    assert res.num_slices == slices and len(res.groups) == slices // 2
    assert sum(g.budget for g in res.groups) == 20
    assert 0 < len(res.kept_tokens) <= 20
    assert abs(sum(res.option_probs.values()) - 1) < 1e-4
    times = [k["timestamp"] for k in res.kept_tokens]
    assert times == sorted(times)
    lite = at.ask(model, video_file, Q, config=cfg, method="lite")
    assert lite.group_passes >= 1 and lite.encoded_slices == 0            # features re-used


def test_lite_from_a_cold_cache_encodes_only_the_groups_it_runs(ad, video_file):
    """Lite on fresh features: a stop after group 0 means the other groups' slices are never encoded
    (the check in test_whole_pipeline_runs follows a full pass, so "0 encoded" there cannot fail)."""
    model = at.Model(ad, name=ad.family)
    cfg = at.AdaptTokenConfig(num_frames=16, group_size=2, budget=20, max_pixels=64 * 64,
                              min_pixels=64 * 64, max_new_tokens=4)
    full = at.ask(model, video_file, Q, config=cfg, fresh_features=True)
    n_groups = len(full.groups)
    assert n_groups >= 3 and full.encoded_slices == full.num_slices
    cfg.stop_threshold = full.groups[0].entropy_norm + 1e-6     # group 0 is under it: stop there
    cfg.stop_confirm = 1                                        # (the first confident group)
    cfg.stop_check_answer = False                               # the group rule alone
    calls = []
    hook = ad.text_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        lite = at.ask(model, video_file, Q, config=cfg, method="lite", fresh_features=True)
    finally:
        hook.remove()
    assert lite.group_passes == 1 and lite.skipped_groups == list(range(1, n_groups))
    per_group = full.num_slices // n_groups
    assert lite.encoded_slices == per_group                      # group 0's slices, nothing else
    feats = model.features_for(at.open_video(video_file, 16, max_pixels=64 * 64, min_pixels=64 * 64))
    computed = set(torch.nonzero(torch.as_tensor(feats._have)).flatten().tolist())
    assert computed == set(range(0, full.num_slices, n_groups))  # strided: group 0 = 0, G, 2G...
    assert 1 <= len(calls) - 1 <= cfg.max_new_tokens             # one group pass, then the answer
    assert lite.groups[0].entropy == pytest.approx(full.groups[0].entropy, abs=1e-5)


def test_redundancy_compares_the_main_embedding_only():
    """Qwen3-VL caches deepstack levels after the main embedding: redundancy looks at main_dim."""
    from types import SimpleNamespace

    from adapttoken.budget import remove_redundancy

    class Feats:
        tokens_per_slice, num_slices = 1, 3
        adapter = SimpleNamespace(main_dim=2)
        asked: list = []

        def tokens(self, gids, hooks=None, columns=None):
            # slices 0 and 1: same main embedding, different extra levels; only `columns` copied
            e = torch.tensor([[1.0, 0.0, 5.0, 0.0], [1.0, 0.0, 0.0, 5.0], [0.0, 1.0, 0.0, 0.0]])
            Feats.asked.append(columns)
            return e[gids][:, :columns], None

    kept, dropped = remove_redundancy([torch.tensor([0, 1, 2])], [2], Feats(), 0.9)
    assert dropped == 1 and kept[0].tolist() == [0, 2]
    assert set(Feats.asked) == {2}                 # the deepstack levels were not even gathered
    Feats.adapter = SimpleNamespace(main_dim=None)          # whole vector: not similar
    kept, dropped = remove_redundancy([torch.tensor([0, 1, 2])], [2], Feats(), 0.9)
    assert dropped == 0 and kept[0].tolist() == [0, 1]


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_norm_mlp_on_every_family(family):
    """Each family's adapter installs the compiled RMSNorm / SiLU-MLP calls (fused_text.py) over its
    own language model (Qwen3-VL's q/k norms included); compiled on the CPU (fuse_text=True), a
    group pass with the probe gives eager's logits and scores; fuse_text=False routes back."""
    a = _adapter(family, seed=1, layers=2)
    f = a.fused_text
    assert f is not None and f.installed and a.fuse_text is None
    layers = a.text_model.layers
    assert len(f.mlps) == len(layers) and len(f.norms) >= 2 * len(layers) + 1
    prompt = a.build_prompt(Q)
    frames = _frames(a)
    feats = a.encode(frames, tuple(frames.shape[1:3]))
    n, t, d = feats.shape
    embeds = feats.reshape(n * t, d)
    rows, cols = a.token_grid(tuple(frames.shape[1:3]))
    s, r, c = torch.meshgrid(torch.arange(n), torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([s.reshape(-1), r.reshape(-1), c.reshape(-1)])
    extent = max(n - 1, rows - 1, cols - 1)
    a.fuse_text = False
    ref = a.forward(prompt, embeds, coords, extent, probe_layer=a.default_layer)
    a.fuse_text, old = True, f.min_elements
    f.min_elements = 0
    try:
        before = f.compiled_calls
        out = a.forward(prompt, embeds, coords, extent, probe_layer=a.default_layer)
        assert f.compiled_calls - before >= len(f.mlps)
    finally:
        a.fuse_text, f.min_elements = None, old
    tol = 1e-5 * max(1.0, ref.logits.abs().max().item())
    assert (out.logits - ref.logits).abs().max().item() <= tol
    torch.testing.assert_close(out.scores, ref.scores, rtol=1e-5, atol=1e-6)
