"""lmms-eval model adapter: `--model adapttoken` answers lmms-eval's video tasks with AdaptToken.

    pip install "lmms-eval==0.7.3" && pip install adapttoken     # lmms-eval 0.7.3 pins av<16
    python -m lmms_eval --model adapttoken --tasks videomme --batch_size 1 \\
        --model_args model=/models/Qwen2.5-VL-7B-Instruct,method=adapttoken,frames=4096,budget=7040

Registration: the entry point `adapttoken = "adapttoken.eval.lmms_eval_model:manifest"` in the
group `lmms_eval.models` (pyproject.toml), which lmms-eval 0.7 reads when it starts; without an
installed package, `lmms_eval.models.MODEL_REGISTRY_V2.register_manifest(manifest())` does the
same, and `lmms_eval.evaluator.simple_evaluate(model=AdaptToken(...), ...)` takes an instance.

Model arguments (`--model_args k=v,...`): model (a local model folder; default the bundled tiny
model), method (adapttoken, lite, uniform, even_split; native = uniform frames at native_frames and
native_max_pixels, every token), config (paper: 4096 frames, budget 7040), frames, budget,
max_pixels, min_pixels, group_size, stop_threshold, native_frames, native_max_pixels, device,
dtype, attn, cache_dir, decode_workers, seed, quantization (none, nf4, int8: bitsandbytes; fp8: float8 matmuls).

Each request is one question: the task's own prompt (`doc_to_text`, after the video in one user
turn) goes into every group pass and into the answer; option lines "A. ..." or "(A) ..." in it
make the entropy the one over the option letters (AdaptToken's multiple-choice mode), else over the
vocabulary. The video is the first video path `doc_to_visual` returns. `max_new_tokens`,
`temperature` / `do_sample` and `until` (the answer is cut at the first stop string) come from the
task's generation arguments. Requests are run grouped by video, so the questions of a video share
its decoded frames and vision features. `loglikelihood` and multi-round generation are not
supported (the video multiple-choice tasks use `generate_until`).

Only lmms-eval imports this module (nothing in the library does); lmms_eval itself is imported
when the class is first asked for, so the module also imports without it.
"""
from __future__ import annotations

import re

MODEL_ID = "adapttoken"
CLASS_NAME = "AdaptToken"
VIDEO_EXTS = (".mp4", ".mkv", ".webm", ".avi", ".mov", ".m4v", ".flv", ".mpg", ".mpeg", ".ts")
_OPTION = re.compile(r"^\s*\(?([A-Z])[.)]\s*(\S.*)$")


def manifest():
    """The entry point lmms-eval loads: `--model adapttoken` -> this module's `AdaptToken`."""
    from lmms_eval.models.registry_v2 import ModelManifest
    return ModelManifest(model_id=MODEL_ID, simple_class_path=f"{__name__}.{CLASS_NAME}")


def options_in(prompt: str) -> list[str]:
    """The option texts of consecutive lines "A. ..." / "(A) ..." / "A) ..." from A on (the
    longest such run); [] when fewer than two."""
    best: list[str] = []
    run: list[str] = []
    for line in prompt.splitlines():
        m = _OPTION.match(line)
        if m and ord(m[1]) - 65 == len(run):
            run.append(m[2].strip())
        else:
            run = [m[2].strip()] if m and m[1] == "A" else []
        if len(run) > len(best):
            best = list(run)
    return best if len(best) >= 2 else []


def cut_at(text: str, until) -> str:
    """The answer up to the first stop string (lmms-eval's `until`)."""
    for s in ([until] if isinstance(until, str) else list(until or [])):
        if s and s in text:
            text = text.split(s, 1)[0]
    return text


def _int_or_none(v):
    if v is None or (isinstance(v, str) and v.lower() in ("", "none", "null")):
        return None
    return int(float(v))


def _build_class():
    from lmms_eval.api.model import lmms

    from ..errors import InputError
    from ..pipeline import AdaptTokenConfig, ask
    from .profiles import EvalQuestion
    from .runner import NATIVE_FRAMES, NATIVE_MAX_PIXELS, PAPER_CONFIG

    class AdaptToken(lmms):
        """lmms-eval's simple-model interface over `adapttoken.ask`."""
        is_simple = True

        def __init__(self, model: str | None = None, method: str = "adapttoken", config: str = "default",
                     frames=None, budget=None, max_pixels=308 * 560, min_pixels=None, group_size=64,
                     stop_threshold=0.2, native_frames=NATIVE_FRAMES, native_max_pixels=NATIVE_MAX_PIXELS,
                     device: str = "auto", dtype: str = "auto", attn: str = "sdpa", cache_dir=None,
                     decode_workers=None, seed=0, batch_size=1, quantization: str = "none",
                     **unused) -> None:
            super().__init__()
            methods = ("adapttoken", "lite", "uniform", "even_split", "native")
            if method not in methods:
                raise InputError(f"method={method!r}: use one of {', '.join(methods)}")
            if config not in ("default", "paper"):
                raise InputError(f"config={config!r}: use default or paper")
            if int(batch_size or 1) != 1:
                raise InputError("batch_size: AdaptToken answers one question at a time (use 1)")
            self.method = method
            nf = _int_or_none(frames) or (PAPER_CONFIG["num_frames"] if config == "paper" else 1024)
            bud = _int_or_none(budget) or PAPER_CONFIG["budget"]
            common = dict(cache_dir=cache_dir, decode_workers=_int_or_none(decode_workers),
                          seed=int(seed))
            if method == "native":
                self.config = AdaptTokenConfig(num_frames=int(native_frames),
                                               max_pixels=_int_or_none(native_max_pixels),
                                               budget=10 ** 9, **common)
            else:
                self.config = AdaptTokenConfig(num_frames=nf, budget=bud, max_pixels=_int_or_none(max_pixels),
                                               min_pixels=_int_or_none(min_pixels),
                                               group_size=int(group_size),
                                               stop_threshold=float(stop_threshold), **common)
            self._device_arg = device
            self._rank, self._world_size = 0, 1
            try:                                   # several processes: lmms-eval's accelerate launch
                from accelerate import Accelerator
                acc = Accelerator()
                if acc.num_processes > 1:
                    self._rank, self._world_size = acc.local_process_index, acc.num_processes
                    if device in ("auto", "cuda"):
                        device = f"cuda:{acc.local_process_index}"
            except ImportError:
                pass
            from ..defaults import default_model_dir
            from ..models.loading import load_model
            self.model = load_model(model or default_model_dir(), dtype=dtype, device=device,
                                    attn_implementation=attn, quantization=quantization)
            self.batch_size_per_gpu = 1
            self.last_result = None

        @property
        def batch_size(self):
            return 1

        def _video_of(self, request) -> str:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else None
            for v in visuals or []:
                if isinstance(v, str) and v.lower().endswith(VIDEO_EXTS):
                    return v
                if isinstance(v, dict) and isinstance(v.get("video"), str):
                    return v["video"]
            raise InputError(f"{task} doc {doc_id}: AdaptToken answers questions about a video; "
                             f"doc_to_visual gave {type(visuals).__name__} without a video path")

        def answer_one(self, context: str, gen_kwargs: dict, video: str) -> str:
            """One question through `adapttoken.ask` with the task's prompt and generation args."""
            from dataclasses import replace
            gk = dict(gen_kwargs or {})
            temp = float(gk.get("temperature", 0) or 0)
            sample = bool(gk.get("do_sample", False)) and temp > 0
            cfg = replace(self.config, max_new_tokens=int(gk.get("max_new_tokens", 16) or 16),
                          do_sample=sample, temperature=temp if sample else 1.0,
                          top_p=float(gk.get("top_p", 1.0) or 1.0) if sample else 1.0)
            text = context.replace("<image>", "").strip() or context
            opts = options_in(text)
            q = EvalQuestion(text, opts, text)
            method = "uniform" if self.method == "native" else self.method
            res = ask(self.model, video, q, config=cfg, method=method)
            self.last_result = res                  # the full Result (groups, seconds, ...)
            return cut_at(res.answer, gk.get("until"))

        def generate_until(self, requests) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            order: dict[str, list[int]] = {}
            for i, r in enumerate(requests):
                order.setdefault(self._video_of(r), []).append(i)
            try:
                from tqdm import tqdm
                bar = tqdm(total=len(requests), disable=self.rank != 0, desc="AdaptToken")
            except ImportError:
                bar = None
            for video, idx in order.items():            # a video's questions share its features
                for i in idx:
                    context, gen_kwargs = requests[i].args[0], requests[i].args[1]
                    out[i] = self.answer_one(context, gen_kwargs, video)
                    self.cache_hook.add_partial("generate_until", (context, gen_kwargs), out[i])
                    if bar is not None:
                        bar.update(1)
                self.model.clear_cache()
            if bar is not None:
                bar.close()
            return out

        def loglikelihood(self, requests):
            raise NotImplementedError("AdaptToken answers by generation (generate_until); "
                                      "loglikelihood tasks are not supported")

        def generate_until_multi_round(self, requests):
            raise NotImplementedError("AdaptToken answers one round per question; multi-round "
                                      "tasks are not supported")

    AdaptToken.__module__ = __name__
    return AdaptToken


def __getattr__(name):
    if name == CLASS_NAME:
        cls = _build_class()
        globals()[CLASS_NAME] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
