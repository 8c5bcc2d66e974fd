"""fused_text: the compiled RMSNorm / SiLU-MLP calls of a Qwen2.5-VL text model (nn.Module.compile's
slot, routed per call), and that nothing of transformers is reassigned to get them.

Off CUDA (the default) the modules run transformers' own eager forward: bit-identical logits. One
test compiles for real on the CPU (a 1-layer model, two lengths: one dynamic graph per module type);
the routing tests replace `_compiled` by a recorder so that they compile nothing."""
from __future__ import annotations

import warnings

import pytest
import torch

from adapttoken.models import fused_text as ft
from adapttoken.models.fused_text import FusedText


@pytest.fixture(scope="module")
def model():
    from adapttoken.training.tiny import build_tiny_model
    m, _ = build_tiny_model(seed=3, layers=3, vision_depth=1)
    return m.eval().requires_grad_(False)


def _logits(model, x, pos):
    with torch.inference_mode():
        return model(inputs_embeds=x, position_ids=pos, use_cache=False).logits


def _inputs(model, n=37, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    D = model.config.text_config.hidden_size
    x = torch.randn(1, n, D, generator=g).to(dtype)
    pos = torch.arange(n).expand(3, 1, n)
    return x, pos


@pytest.fixture
def recorder(monkeypatch):
    """`_compiled` replaced by the module's own eager call, recording which modules used it."""
    used = []

    def fake(module):
        def call(*a, **k):
            used.append(module)
            return module._call_impl(*a, **k)
        return call

    monkeypatch.setattr(ft, "_STATE", {"failed": False})
    monkeypatch.setattr(ft, "_compiled", fake)
    return used


def test_install_covers_every_norm_and_mlp_and_uninstall_restores(model):
    lm = model.model.language_model
    f = FusedText(lm).install()
    try:
        assert len(f.norms) == 2 * len(lm.layers) + 1 and len(f.mlps) == len(lm.layers)
        assert all(isinstance(m._compiled_call_impl, ft._Route) for m in f.norms + f.mlps)
        assert all(layer._compiled_call_impl is None and layer.self_attn._compiled_call_impl is None
                   for layer in lm.layers)           # layers / attention stay eager (docstring)
        assert not any(m._compiled_call_impl is not None for m in model.model.visual.modules())
    finally:
        f.uninstall()
    assert all(m._compiled_call_impl is None for m in f.norms + f.mlps)


def test_nothing_of_transformers_is_reassigned(tiny_adapter):
    """No module global of transformers' modeling modules and no method is replaced, and no module
    instance carries a `forward` of its own, with the adapter loaded and compiling on."""
    import sys

    import transformers.models.qwen2.modeling_qwen2 as q2
    import transformers.models.qwen2_5_vl.modeling_qwen2_5_vl as q25

    ad = tiny_adapter
    assert ad.fused_text.installed
    for mod in (q25, q2):
        fn = mod.apply_rotary_pos_emb
        assert fn.__module__ == mod.__name__ and not hasattr(fn, "__wrapped__")
        assert fn.__code__.co_filename == mod.__file__
    for m in ad.model.modules():
        assert "forward" not in m.__dict__ and "__call__" not in m.__dict__, type(m).__name__
        assert type(m).forward.__module__.startswith(("transformers.", "torch.")), type(m).__name__
    # every module global of transformers' modeling modules is still defined by transformers
    for name, mod in list(sys.modules.items()):
        if name.startswith("transformers.models.qwen2") and name.split(".")[-1].startswith("modeling"):
            for attr, val in vars(mod).items():
                owner = getattr(val, "__module__", None)
                assert not (isinstance(owner, str) and owner.startswith("adapttoken")), (name, attr)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_eager_path_is_bitwise_transformers(model, dtype):
    model.to(dtype)
    try:
        x, pos = _inputs(model, dtype=dtype)
        ref = _logits(model, x, pos)
        f = FusedText(model.model.language_model).install()     # enabled=None: CPU runs eager
        try:
            assert torch.equal(_logits(model, x, pos), ref)
            f.enabled = False
            assert torch.equal(_logits(model, x, pos), ref)
            assert f.compiled_calls == 0
        finally:
            f.uninstall()
    finally:
        model.to(torch.float32)


def test_adapter_installs_it(tiny_adapter):
    ad = tiny_adapter
    assert ad.fused_text.installed and ad.fuse_text is None
    ad.fuse_text = False
    assert ad.fused_text.enabled is False
    ad.fuse_text = None


def test_routing_short_inputs_and_hooked_modules_run_eager(model, recorder):
    lm = model.model.language_model
    f = FusedText(lm, enabled=None).install()
    try:
        f.min_elements = 0
        x, pos = _inputs(model)
        ref = _logits(model, x, pos)
        assert recorder == []                              # None on the CPU: eager
        f.enabled = True
        assert torch.equal(_logits(model, x, pos), ref)
        assert len(recorder) == len(f.norms) + len(f.mlps) == f.compiled_calls
        f.enabled = None
        assert not f.use(x)                                 # None: eager off CUDA
        f.enabled = True
        recorder.clear()
        seen = []
        h = lm.layers[1].mlp.down_proj.register_forward_hook(lambda *a: seen.append(1))
        try:
            assert torch.equal(_logits(model, x, pos), ref)
        finally:
            h.remove()
        assert seen == [1]                                  # the hook ran: its module went eager
        assert lm.layers[1].mlp not in recorder and lm.layers[0].mlp in recorder
    finally:
        f.uninstall()


def test_failed_compile_warns_once_and_runs_eager(model, monkeypatch):
    monkeypatch.setattr(ft, "_STATE", {"failed": False})

    def broken(module):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(ft, "_compiled", broken)
    x, pos = _inputs(model)
    ref = _logits(model, x, pos)
    f = FusedText(model.model.language_model, enabled=True).install()
    try:
        with pytest.warns(RuntimeWarning, match="torch.compile failed"):
            out = _logits(model, x, pos)
        assert torch.equal(out, ref) and ft._STATE["failed"]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            assert torch.equal(_logits(model, x, pos), ref)
    finally:
        f.uninstall()


def test_probe_prefix_cache_and_cancel_work_with_compiling_on(tiny_adapter, recorder):
    """The pipeline's group pass (probe on one layer's self_attn, the prefix key/value store,
    cancellation hooks on every layer) with the compiled route taken: same result as eager, and a
    cancel raised from the layers' hooks still stops the pass."""
    from adapttoken.errors import Cancelled
    from adapttoken.kv_cache import PrefixKVCache
    from adapttoken.question import Hooks, Question

    ad = tiny_adapter
    f = ad.fused_text
    D = ad.model.config.text_config.hidden_size
    g = torch.Generator().manual_seed(1)
    S, rows, cols = 4, 2, 3
    embeds = 0.02 * torch.randn(S * rows * cols, D, generator=g)
    s, r, c = torch.meshgrid(torch.arange(S), torch.arange(rows), torch.arange(cols), indexing="ij")
    coords = torch.stack([2 * s.reshape(-1), r.reshape(-1), c.reshape(-1)])
    extent = int(coords.max())
    prompt = ad.build_prompt(Question("What is shown?", ("a dog", "a cat")))
    layer = ad.default_layer
    old = f.min_elements
    try:
        ad.fuse_text = False
        ref = ad.forward(prompt, embeds, coords, extent, probe_layer=layer,
                         prefix_cache=(PrefixKVCache(), 0))
        assert recorder == []
        ad.fuse_text, f.min_elements = True, 0
        calls = []
        hooks = Hooks(cancelled=lambda: calls.append(1) and False)
        out = ad.forward(prompt, embeds, coords, extent, probe_layer=layer, hooks=hooks,
                         prefix_cache=(PrefixKVCache(), 0))
        assert recorder, "the compiled route was not taken"
        assert len(calls) == 2 * ad.num_layers              # prefix pass + suffix pass
        assert torch.equal(out.logits, ref.logits) and torch.equal(out.scores, ref.scores)
        with pytest.raises(Cancelled):
            ad.forward(prompt, embeds, coords, extent, probe_layer=layer,
                       hooks=Hooks(cancelled=lambda: True), prefix_cache=(PrefixKVCache(), 1))
    finally:
        ad.fuse_text, f.min_elements = None, old


def test_compiled_modules_match_eager_on_the_cpu():
    """Real torch.compile (inductor, CPU): one decoder layer, two lengths (dynamic: no recompile)."""
    from adapttoken.training.tiny import build_tiny_model
    model, _ = build_tiny_model(seed=5, layers=1, vision_depth=1)
    model = model.eval().requires_grad_(False)
    f = FusedText(model.model.language_model, enabled=True).install()
    try:
        for n in (37, 64):
            x, pos = _inputs(model, n=n, seed=n)
            f.enabled = False
            ref = _logits(model, x, pos)
            f.enabled = True
            before = f.compiled_calls
            out = _logits(model, x, pos)
            assert not ft._STATE["failed"], "torch.compile failed on the CPU"
            assert f.compiled_calls - before == len(f.norms) + len(f.mlps)
            assert (out - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    finally:
        f.uninstall()
