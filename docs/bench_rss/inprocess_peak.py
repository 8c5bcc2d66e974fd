"""Peak RSS of one question in this process, with the group-prefix key/value cache at its
default CPU budget ("on") or none kept ("off": prefix_cpu_bytes=0), and what the caches hold.

    PYTHONPATH=. python docs/bench_rss/inprocess_peak.py CLIP FRAMES pyav on|off
"""
import sys, json, resource, time, os
import adapttoken as at
from adapttoken.pipeline import prepare, select, answer, AdaptTokenConfig
from adapttoken.question import Question
clip, frames, backend, pc = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4] == "on"
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def rss():
    for l in open("/proc/self/status"):
        if l.startswith("VmRSS"): return int(l.split()[1]) * 1024
model = at.load_model(at.__path__[0] + "/assets/adapttoken-tiny-synth", device="cpu")
cfg = AdaptTokenConfig(num_frames=frames, video_backend=backend)
out = {"frames": frames, "backend": backend, "prefix_cache": pc, "after_load": peak()}
video = prepare(model, clip, cfg)
f = model.features_for(video)
if not pc:
    f.prefix_kv.cpu_bytes = 0          # as AdaptTokenConfig(prefix_cpu_bytes=0)
sel = select(model, video, Question("What moves across the picture?"), cfg, "adapttoken")
out["peak_after_select"] = peak(); out["rss_after_select"] = rss()
res = answer(sel, cfg.max_new_tokens)
out["peak_after_answer"] = peak(); out["rss_after_answer"] = rss()
out["held"] = model.held_bytes()
out["features_blocks"] = sum(b.numel()*b.element_size() for b in f._blocks if b is not None)
if f.prefix_kv is not None:
    kv = f.prefix_kv
    out["prefix_kv"] = {"bytes": kv.bytes, "stored": kv.stored, "refused": kv.refused, "held": kv.held_bytes()}
out["tokens_per_slice"] = f.tokens_per_slice; out["num_slices"] = f.num_slices
out["answer"] = res.answer; out["kept"] = len(res.kept_tokens); out["group_passes"] = res.group_passes
import hashlib; out["kept_hash"] = hashlib.sha1(json.dumps(res.kept_tokens, sort_keys=True, default=str).encode()).hexdigest()[:12]
out["seconds"] = res.seconds
print(json.dumps(out))
