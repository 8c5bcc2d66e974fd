"""bench gpu --arch: the counted vision FLOPs of Qwen3-VL and InternVL equal what the towers do (every
matmul and attention call counted on a tiny model of each family), and the benchmark runs end to end
on the tiny models (CPU smoke test of what the device runs at full size)."""
from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from adapttoken.bench.archs import ARCHS, arch_config, build_arch_model, vision_flops_per_slice
from adapttoken.bench.gpu import default_out
from adapttoken.bench.gpu_measure import _vision_modules


def _measured_vision_flops(model, frames, resized, monkeypatch) -> float:
    """2 * in * out * rows for every Linear / patch-embedding conv of the vision modules, plus
    4 * Lq * Lk * head_dim * heads for every sdpa call, over one encode of `frames`."""
    total = [0.0]
    handles = []
    m = model.adapter.model
    for mod in _vision_modules(m):
        for sub in mod.modules():
            if isinstance(sub, torch.nn.Linear):
                handles.append(sub.register_forward_hook(
                    lambda s, i, o: total.__setitem__(0, total[0] + 2.0 * s.in_features
                                                      * s.out_features * o[..., 0].numel())))
            elif isinstance(sub, (torch.nn.Conv2d, torch.nn.Conv3d)):
                handles.append(sub.register_forward_hook(
                    lambda s, i, o: total.__setitem__(0, total[0] + 2.0 * s.weight[0].numel()
                                                      * o.numel())))
    real = F.scaled_dot_product_attention

    def counting(q, k, v, *a, **kw):
        total[0] += 4.0 * q.shape[-2] * k.shape[-2] * q.shape[-1] * q[..., 0, 0].numel()
        return real(q, k, v, *a, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting)
    try:
        with torch.no_grad():
            model.adapter.encode(frames, resized)
    finally:
        for h in handles:
            h.remove()
        monkeypatch.setattr(F, "scaled_dot_product_attention", real)
    return total[0]


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_counted_vision_flops_match_the_tower(arch, monkeypatch):
    pixels = 64 * 96
    model, _ = build_arch_model(arch, "cpu", torch.float32, pixels=pixels, tiny=True)
    ad = model.adapter
    resized = ad.resized_size(64, 96, pixels, pixels)
    slices = 2
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (slices * ad.frames_per_slice, *resized, 3), dtype=torch.uint8,
                           generator=g)
    measured = _measured_vision_flops(model, frames, resized, monkeypatch)
    counted = slices * vision_flops_per_slice(ad.model.config, resized)
    assert counted == pytest.approx(measured, rel=1e-9)


def test_full_size_counts():
    """Orders of magnitude at the benchmark's sizes (numbers for docs/FAMILIES.md)."""
    q3 = vision_flops_per_slice(arch_config("qwen3-vl-8b"), (288, 544))
    ivl = vision_flops_per_slice(arch_config("internvl3-8b"), (448, 448))
    assert 0.55e12 < q3 < 0.65e12          # 2 * 612 patches * 411 M block params + attention + 4 mergers
    assert 0.68e12 < ivl < 0.78e12         # 2 * 1025 tokens * 302 M layer params + attention


def test_default_out_folders():
    assert default_out("qwen2.5-vl-7b") == "docs/bench_gpu"
    assert default_out("qwen3-vl-8b") == "docs/bench_gpu_qwen3_vl_8b"
    assert default_out("internvl3-8b") == "docs/bench_gpu_internvl3_8b"


@pytest.mark.parametrize("arch", ["qwen3-vl-8b", "internvl3-8b"])
def test_bench_gpu_arch_tiny_smoke(arch, tmp_path):
    from adapttoken.bench.gpu import main
    out = tmp_path / "bench"
    rc = main(["--arch", arch, "--tiny", "--frames", "32", "--size", "64x96", "--group-size", "8",
               "--budget", "32", "--out", str(out), "--video-frames", "32",
               "--video-dir", str(tmp_path)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["arch"] == arch and not res.get("errors")
    by = {c["method"]: c for c in res["cases"]}
    assert set(by) == {"uniform", "adapttoken", "second_question", "lite"}
    fps = res["meta"]["frames_per_slice"]
    assert by["adapttoken"]["groups"] == 32 // fps // 8
    for c in res["cases"]:
        assert c["flops"]["total"] > 0 and c["flops"]["vision"] >= 0 and c["wall"] > 0
    assert by["adapttoken"]["flops"]["vision"] > 0
    md = (out / "README.md").read_text()
    assert md.startswith("# `bench gpu`: " + {"qwen3-vl-8b": "Qwen3-VL-8B",
                                             "internvl3-8b": "InternVL3-8B"}[arch])
    # the report names the tower that ran: Qwen3-VL's batched one, InternVL's transformers' own
    assert res["meta"]["fast_vision"] is (arch == "qwen3-vl-8b")
    assert ("qwen3_vision_fast" in md) is (arch == "qwen3-vl-8b")
    assert ("transformers' own tower" in md) is (arch == "internvl3-8b")
