"""The lmms-eval adapter (adapttoken/eval/lmms_eval_model.py).

The tests marked `needs_lmms_eval` run in lmms-eval 0.7.3's own virtual environment
(scripts/test_lmms_eval_adapter.sh: it pins av<16); in the main suite they are skipped. They
resolve `--model adapttoken` through lmms-eval's registry (our entry point), build lmms-eval's own
`Instance` requests for a tiny synthetic video and call `generate_until` with the bundled model.
The others need no lmms-eval."""
from __future__ import annotations

import importlib.util
import tomllib
from pathlib import Path

import pytest

from adapttoken.eval import lmms_eval_model as adapter

ROOT = Path(__file__).resolve().parents[2]


def _have_lmms_eval() -> bool:
    try:
        return importlib.util.find_spec("lmms_eval.api.instance") is not None
    except ImportError:
        return False


HAVE_LMMS_EVAL = _have_lmms_eval()
needs_lmms_eval = pytest.mark.skipif(
    not HAVE_LMMS_EVAL,
    reason="needs lmms-eval 0.7.3 in its own venv (it pins av<16): scripts/test_lmms_eval_adapter.sh")
# the bundled tiny model's settings (tests/eval_fixtures.py TINY_ARGS)
MODEL_ARGS = ("method=adapttoken,frames=32,budget=64,max_pixels=12544,min_pixels=12544,"
              "group_size=4,device=cpu")


def test_options_and_stop_strings():
    vmme = ("Select the best answer ...\nWhat colour?\nA. red\nB. green\nC. blue\nD. yellow\n"
            "Answer with the option's letter from the given choices directly.")
    assert adapter.options_in(vmme) == ["red", "green", "blue", "yellow"]
    assert adapter.options_in("Q?\n(A) one\n(B) two\n(C) three") == ["one", "two", "three"]
    assert adapter.options_in("Describe the video.") == []
    assert adapter.options_in("A. only one") == []
    assert adapter.cut_at("B. green\n\nbecause", ["\n\n"]) == "B. green"
    assert adapter.cut_at("C", None) == "C"


def test_entry_point_declared_and_module_needs_no_lmms_eval():
    """pyproject registers the manifest function in lmms-eval's group; the module imports here
    (no lmms_eval) and builds the class only when asked."""
    eps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["entry-points"]
    assert eps["lmms_eval.models"] == {"adapttoken": "adapttoken.eval.lmms_eval_model:manifest"}
    assert callable(adapter.manifest) and adapter.CLASS_NAME == "AdaptToken"


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    from adapttoken.training import synthetic as syn
    p = tmp_path_factory.mktemp("lmms") / "clip.mp4"
    s = syn.make_sample(p, 32, 101, kind="what", form="mc", attribute="colour")
    q = s.questions[0]
    return p, q.text, list(q.options)


@pytest.fixture(scope="module")
def lm():
    from lmms_eval.models import get_model
    cls = get_model("adapttoken")              # resolved through the entry point
    assert cls.__name__ == "AdaptToken" and cls.is_simple
    # what lmms-eval's evaluator passes besides --model_args
    return cls.create_from_arg_string(MODEL_ARGS, {"batch_size": 1})


def _requests(clip, task="synthetic_videomme"):
    from lmms_eval.api.instance import Instance
    path, text, opts = clip
    docs = [{"video": str(path), "question": text, "options": opts},
            {"video": str(path), "question": text, "options": opts[1:] + opts[:1]}]

    def doc_to_visual(doc):                    # as lmms-eval's video tasks return it
        return [doc["video"]]

    def doc_to_text(doc):                      # lmms-eval's VideoMME layout
        return ("Select the best answer to the following multiple-choice question based on the "
                "video and the subtitles. Respond with only the letter (A, B, C, or D) of the "
                "correct option.\n" + doc["question"] + "\n"
                + "\n".join(f"{'ABCD'[i]}. {o}" for i, o in enumerate(doc["options"]))
                + "\nAnswer with the option's letter from the given choices directly.")

    gen = {"max_new_tokens": 4, "temperature": 0, "do_sample": False, "until": ["\n\n"]}
    reqs = [Instance(request_type="generate_until",
                     arguments=(doc_to_text(d), dict(gen), doc_to_visual, i, task, "test"),
                     idx=0, metadata={"task": task, "doc_id": i, "repeats": 1})
            for i, d in enumerate(docs)]
    return docs, reqs


@needs_lmms_eval
def test_generate_until_with_lmms_eval_requests(lm, clip):
    from adapttoken.eval.profiles import EvalQuestion
    from adapttoken.pipeline import ask
    docs, reqs = _requests(clip)
    lm.task_dict = {"synthetic_videomme": {"test": docs}}
    out = lm.generate_until(reqs)
    assert len(out) == 2 and all(isinstance(o, str) for o in out)
    # the same as asking the library directly with the task's prompt and options
    for r, o, d in zip(reqs, out, docs):
        ctx = r.args[0]
        cfg = lm.config.__class__(**{**lm.config.__dict__, "max_new_tokens": 4})
        res = ask(lm.model, d["video"], EvalQuestion(ctx, d["options"], ctx), config=cfg,
                  method="adapttoken")
        assert o == adapter.cut_at(res.answer, ["\n\n"])
        assert res.option_probs is not None and set(res.option_probs) == set("ABCD")


@needs_lmms_eval
def test_second_question_on_a_video_reuses_its_features(lm, clip):
    docs, reqs = _requests(clip)
    lm.task_dict = {"synthetic_videomme": {"test": docs}}
    lm.model.clear_cache()                     # nothing left from another test
    decoded, real = [], lm.answer_one

    def spy(context, gen_kwargs, video):
        text = real(context, gen_kwargs, video)
        decoded.append((lm.last_result.decoded_frames, lm.last_result.encoded_slices))
        return text

    lm.answer_one = spy
    try:
        lm.generate_until(reqs)
    finally:
        del lm.answer_one
    assert decoded[0][0] > 0 and decoded[1] == (0, 0)


@needs_lmms_eval
def test_unsupported_request_kinds_say_so(lm):
    with pytest.raises(NotImplementedError, match="generate_until"):
        lm.loglikelihood([])
