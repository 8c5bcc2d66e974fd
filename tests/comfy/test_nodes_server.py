"""The node pack inside a real ComfyUI server and its frontend (skipped without COMFYUI_DIR; see
docs/TESTING-COMFYUI.md).

- /object_info shows the 10 nodes exactly as nodes/spec.py declares them;
- each shipped workflow loads in the real frontend (screenshot in tests/_artifacts/comfy/), converts
  to the API format and runs to an answer; queued from the page too;
- ComfyUI's caching re-runs only what changed, the feature cache goes with the model on /free and
  after the answer when keep_loaded is off, Lite skips the groups after its stop;
- bad inputs are refused before any work with a message naming the problem, errors during a run
  arrive with the library's message, Cancel stops a long run, and the server goes on serving.

The model is the bundled demo model when it is installed, else a tiny random Qwen2.5-VL written into
the server's models/LLM (its answers are noise; the tests check mechanics, not accuracy).
"""
from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import sys

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO_ROOT))
from nodes import spec  # noqa: E402

WORKFLOWS = REPO_ROOT / "workflows"
STEMS = ["adapttoken_full", "adapttoken_lite", "adapttoken_preview", "uniform_frames_baseline",
         "adapttoken_vs_uniform"]                 # the workflows that run on the bundled demo
REAL = "adapttoken_real_model"                    # needs Qwen2.5-VL-7B in models/LLM
OLD_WORKFLOWS = sorted((REPO_ROOT / "tests" / "fixtures" / "workflows_0_1").glob("*.json"))
ARTIFACTS = REPO_ROOT / "tests" / "_artifacts" / "comfy"
TINY = "tiny-qwen25vl"
SAMPLE_SLICES = 480          # the sample: 960 frames = 480 slices of 2 frames
SAMPLE = json.loads((REPO_ROOT / "adapttoken" / "assets" / "sample.json").read_text())
SAMPLE_GROUPS = 8            # group_size 64 over 480 slices (strided)


def bundled_installed() -> bool:
    from adapttoken.defaults import BUNDLED_MODEL
    return (Path(BUNDLED_MODEL) / "config.json").is_file()


@pytest.fixture(scope="module")
def model_name(comfy_server) -> str:
    """The model the prompts use: the bundled one when installed, else a tiny random one."""
    from adapttoken.training.tiny import build_tiny_model, save_model_folder
    m, p = build_tiny_model(seed=0, layers=4, vision_depth=2)
    save_model_folder(comfy_server.models_dir / "LLM" / TINY, m, p)
    llama = comfy_server.models_dir / "LLM" / "some-llama"
    llama.mkdir(parents=True, exist_ok=True)
    (llama / "config.json").write_text(json.dumps({"model_type": "llama"}))
    return spec.BUNDLED_MODEL_NAME if bundled_installed() else TINY


@pytest.fixture(scope="module")
def api(comfy_browser, model_name) -> dict[str, dict]:
    """Each shipped workflow, loaded in the frontend (screenshot) and converted to the API format."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    run = comfy_browser([WORKFLOWS / f"{s}.json" for s in STEMS + [REAL]],
                        require_nodes=tuple(spec.BY_ID), out_dir=ARTIFACTS)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{run.results}\n{run.console()[-3000:]}"
    return {s: run.api_prompt(s) for s in STEMS + [REAL]}


def node_of(prompt: dict, class_type: str) -> str:
    return next(k for k, v in prompt.items() if v["class_type"] == class_type)


def make(api: dict, stem: str, model: str, **changes) -> dict:
    """A copy of a converted workflow with the model set and inputs changed:
    changes = {"BudgetAllocate__budget": 512} sets input budget of AdaptToken_BudgetAllocate."""
    p = copy.deepcopy(api[stem])
    p[node_of(p, "AdaptToken_LoadMLLM")]["inputs"]["model"] = model
    for key, value in changes.items():
        node, name = key.split("__")
        p[node_of(p, f"AdaptToken_{node}")]["inputs"][name] = value
    return p


def stats(run, prompt) -> dict:
    ui = run.outputs[node_of(prompt, "AdaptToken_MLLMAnswer")]
    return json.loads(ui["stats"][0])


def cached(run) -> set[str]:
    return {n for d in run.of_type("execution_cached") for n in d["nodes"]}


def ran(run) -> set[str]:
    return {d["node"] for d in run.of_type("executing") if d.get("node") is not None}


# -- what the server shows -------------------------------------------------------------------------

def test_object_info_matches_the_spec(comfy_server, model_name):
    info = comfy_server.object_info()
    for s in spec.SPECS:
        got = info[s.id]
        assert got["display_name"] == s.display_name and got["category"] == spec.CATEGORY
        assert got["output_node"] == s.output_node
        assert got["output"] == [o.type for o in s.outputs]
        assert got["output_name"] == [o.name for o in s.outputs]
        order = got["input_order"]
        assert order.get("required", []) == [i.name for i in s.inputs if not i.optional]
        assert order.get("optional", []) == [i.name for i in s.inputs if i.optional]
        for i in s.inputs:
            typ, opts = got["input"]["optional" if i.optional else "required"][i.name]
            assert typ == i.type, (s.id, i.name)
            if i.is_widget:
                assert opts.get("default") == i.default, (s.id, i.name)
            for key in ("min", "max", "step"):
                if getattr(i, key) is not None:
                    assert opts[key] == getattr(i, key), (s.id, i.name, key)
            if i.type == "COMBO" and not i.dynamic:
                assert opts["options"] == list(i.options)
            if i.multiline:
                assert opts["multiline"] is True
            if i.upload:
                assert opts[f"{i.upload}_upload"] is True
            if i.control_after_generate:
                assert opts["control_after_generate"] is True
    models = info["AdaptToken_LoadMLLM"]["input"]["required"]["model"][1]["options"]
    assert TINY in models and "some-llama" in models
    assert (spec.BUNDLED_MODEL_NAME in models) == bundled_installed()
    attention = info["AdaptToken_LoadMLLM"]["input"]["required"]["attention"][1]["options"]
    assert attention[:2] == ["sdpa", "eager"]
    videos = info["AdaptToken_LoadVideo"]["input"]["required"]["video"][1]["options"]
    assert spec.SAMPLE_VIDEO_NAME in videos


def test_harness_request_returns_binary_bodies_as_bytes(comfy_server):
    """The harness's own client: a video or image body comes back as bytes (it used to die
    decoding them as JSON), JSON as objects, text as str."""
    status, body = comfy_server.request("GET", f"/view?filename={spec.SAMPLE_VIDEO_NAME}&type=input")
    assert status == 200 and body == (comfy_server.input_dir / spec.SAMPLE_VIDEO_NAME).read_bytes()
    status, body = comfy_server.request("GET", f"/extensions/{comfy_server.pack}/adapttoken.js")
    assert status == 200 and isinstance(body, str) and "registerExtension" in body
    assert isinstance(comfy_server.get("/system_stats"), dict)


def test_help_pages_are_served(comfy_server):
    for s in spec.SPECS:
        status, body = comfy_server.request("GET", f"/extensions/{comfy_server.pack}/docs/{s.id}.md")
        text = body.decode() if isinstance(body, bytes) else body
        assert status == 200 and text.startswith(f"# {s.display_name}"), (s.id, status)


def test_sample_video_copied_and_templates_listed(comfy_server):
    copied = comfy_server.input_dir / spec.SAMPLE_VIDEO_NAME
    bundled = REPO_ROOT / "adapttoken" / "assets" / "sample.mp4"
    assert copied.read_bytes() == bundled.read_bytes()
    listed = comfy_server.get("/workflow_templates")[comfy_server.pack]
    assert sorted(listed) == sorted(STEMS + [REAL])
    for stem in STEMS + [REAL]:                                      # thumbnails for the browser
        status, body = comfy_server.request("GET", f"/api/workflow_templates/{comfy_server.pack}/{stem}.jpg")
        assert status == 200 and isinstance(body, bytes) and body[:3] == b"\xff\xd8\xff", stem


# -- the shipped workflows run ---------------------------------------------------------------------

@pytest.mark.parametrize("stem", STEMS)
def test_workflow_runs_to_an_answer(comfy_server, api, model_name, stem):
    prompt = make(api, stem, model_name)
    run = comfy_server.run(prompt, timeout=300)
    assert run.status == "success", run.error
    if stem == "adapttoken_vs_uniform":                # two answers, side by side
        answers = [k for k, v in prompt.items() if v["class_type"] == "AdaptToken_MLLMAnswer"]
        methods = {json.loads(run.outputs[k]["stats"][0])["method"] for k in answers}
        assert len(answers) == 2 and methods == {"adapttoken", "uniform"}
        assert all(isinstance(run.outputs[k]["text"][0], str) for k in answers)
        return
    ui = run.outputs[node_of(prompt, "AdaptToken_MLLMAnswer")]
    assert isinstance(ui["text"][0], str)
    assert json.loads(ui["option_probs"][0]) == {}          # the shipped question is open
    st = stats(run, prompt)
    assert st["num_frames"] == 960 and st["num_slices"] == SAMPLE_SLICES
    if stem == "uniform_frames_baseline":
        assert st["method"] == "uniform" and st["group_passes"] == 0
    else:
        assert st["method"] == ("lite" if stem == "adapttoken_lite" else "adapttoken")
        summary = run.outputs[node_of(prompt, "AdaptToken_BudgetAllocate")]["text"][0]
        assert "group  frames  H/Hmax" in summary
    if stem == "adapttoken_preview":
        img = run.outputs[node_of(prompt, "AdaptToken_SelectionPreview")]["images"][0]
        status, png = comfy_server.request(
            "GET", f"/view?filename={img['filename']}&type={img['type']}&subfolder={img['subfolder']}")
        assert status == 200 and isinstance(png, bytes) and png[:8] == b"\x89PNG\r\n\x1a\n"


def test_key_moments_node_returns_the_needle_frames(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name,
             AttentionRank__options="A. blue square\nB. green square\nC. yellow cross\nD. blue cross")
    p["km"] = {"class_type": "AdaptToken_KeyMoments",
               "inputs": {"selection": [node_of(p, "AdaptToken_BudgetAllocate"), 0], "count": 4}}
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    out = run.outputs["km"]
    moments = json.loads(out["moments"][0])
    assert 1 <= len(moments) <= 4 and len(out["images"]) == len(moments)
    needle = SAMPLE["needles"][0]
    assert needle["frame_start"] - 2 <= moments[0]["frame"] <= needle["frame_end"]
    scores = [m["score"] for m in moments]            # best first (scores rounded to 6 digits)
    assert scores == sorted(scores, reverse=True)


def test_real_model_workflow_loads_and_says_where_the_model_goes(comfy_server, api):
    prompt = api[REAL]                                 # converted by the frontend (api fixture)
    assert prompt[node_of(prompt, "AdaptToken_LoadMLLM")]["inputs"]["model"] == "Qwen2.5-VL-7B-Instruct"
    assert prompt[node_of(prompt, "AdaptToken_LoadVideo")]["inputs"]["num_frames"] == 4096
    rejected = sys.modules[type(comfy_server).__module__].PromptRejected   # the harness's class
    with pytest.raises(rejected) as e:                 # refused before any work, one clear line
        comfy_server.post_prompt(prompt)
    details = [err["details"] for n in e.value.body["node_errors"].values() for err in n["errors"]]
    assert any("'Qwen2.5-VL-7B-Instruct' is not in" in d and "LLM" in d
               and "put the model folder" in d for d in details), details


def test_saved_workflows_of_the_previous_version_still_run(comfy_browser, comfy_server, model_name,
                                                           tmp_path):
    """The files version 0.1 shipped (tests/fixtures/workflows_0_1), loaded and queued from the page."""
    assert len(OLD_WORKFLOWS) == 4
    for path in OLD_WORKFLOWS:
        ui = json.loads(path.read_text())
        for n in ui["nodes"]:
            if n["type"] == "AdaptToken_LoadMLLM":
                n["widgets_values"][0] = model_name
        (tmp_path / path.name).write_text(json.dumps(ui))
    run = comfy_browser([tmp_path / p.name for p in OLD_WORKFLOWS], require_nodes=tuple(spec.BY_ID),
                        queue=True, out_dir=tmp_path / "out")
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{run.results}"
    assert all(r.get("ok") for r in run.results), run.results


def test_ask_many_answers_a_question_list_decoding_the_video_once(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name)
    model, groups = node_of(p, "AdaptToken_LoadMLLM"), node_of(p, "AdaptToken_GroupSplit")
    questions = ("What coloured object appeared in the video?\nA. blue square\nB. green square\n"
                 "C. yellow cross\nD. blue cross\n\n# an open one\nWhat colour was the object?\n\n"
                 "Which shape was it?\nsquare\ncircle\ncross")
    keep = {model, groups, node_of(p, "AdaptToken_LoadVideo")}
    p = {k: v for k, v in p.items() if k in keep}
    p[node_of(p, "AdaptToken_LoadVideo")]["inputs"]["num_frames"] = 766   # a sampling no other test caches
    p["many"] = {"class_type": "AdaptToken_AskMany",
                 "inputs": {"model": [model, 0], "groups": [groups, 0], "questions": questions,
                            "method": "adapttoken", "budget": 1024, "max_new_tokens": 8}}
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    table = run.outputs["many"]["text"][0]
    assert len(table.splitlines()) == 4 and "later questions" in table
    rows = json.loads(run.outputs["many"]["json"][0])
    assert [r["options"] for r in rows] == [["blue square", "green square", "yellow cross", "blue cross"],
                                            [], ["square", "circle", "cross"]]
    assert sorted(rows[0]["option_probs"]) == ["A", "B", "C", "D"] and rows[1]["option_probs"] is None
    assert rows[0]["decoded_frames"] > 0 and rows[1]["decoded_frames"] == rows[2]["decoded_frames"] == 0


def test_multiple_choice_gives_option_probabilities(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name,
             AttentionRank__options="A. blue square\nB. green square\nC. yellow cross\nD. blue cross")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    probs = json.loads(run.outputs[node_of(p, "AdaptToken_MLLMAnswer")]["option_probs"][0])
    assert sorted(probs) == ["A", "B", "C", "D"] and abs(sum(probs.values()) - 1) < 1e-3


def test_workflows_queued_from_the_page(comfy_browser, comfy_server, model_name, tmp_path):
    """Queued with the Run button's code path; the .after.png screenshots show the answer on the
    MLLM Answer node and the summary on Budget Allocate (web/js/adapttoken.js)."""
    for stem in STEMS:
        ui = json.loads((WORKFLOWS / f"{stem}.json").read_text())
        for n in ui["nodes"]:
            if n["type"] == "AdaptToken_LoadMLLM":
                n["widgets_values"][0] = model_name
        (tmp_path / f"{stem}.json").write_text(json.dumps(ui))
    out = ARTIFACTS / "queued"
    out.mkdir(parents=True, exist_ok=True)
    run = comfy_browser([tmp_path / f"{s}.json" for s in STEMS], require_nodes=tuple(spec.BY_ID),
                        queue=True, out_dir=out)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{run.results}"
    assert all((out / f"{s}.after.png").is_file() for s in STEMS)
    errors = [ln for ln in run.console().splitlines() if "adapttoken" in ln.lower() and "error" in ln.lower()]
    assert not errors, errors


def test_evidence_timeline_is_drawn_resizes_and_seeks_the_preview(comfy_browser, comfy_server,
                                                                  model_name, tmp_path):
    ui = json.loads((WORKFLOWS / "adapttoken_full.json").read_text())
    for n in ui["nodes"]:
        if n["type"] == "AdaptToken_LoadMLLM":
            n["widgets_values"][0] = model_name
        if n["type"] == "AdaptToken_LoadVideo":
            n["widgets_values"][1] = 512          # a sampling no other test has cached: a fresh run
        if n["type"] == "AdaptToken_AttentionRank":
            n["widgets_values"][1] = "blue square\ngreen square\nyellow cross\nblue cross"
    (tmp_path / "timeline.json").write_text(json.dumps(ui))
    out = ARTIFACTS / "timeline"
    out.mkdir(parents=True, exist_ok=True)
    run = comfy_browser([tmp_path / "timeline.json"], require_nodes=tuple(spec.BY_ID), queue=True,
                        out_dir=out, probe_timeline=True)
    assert run.returncode == 0, f"{run.stdout}\n{run.stderr}\n{run.results}"
    tl = run.results[0]["timeline"]
    assert tl["present"] and tl["groups"] == 4                  # 256 slices in groups of 64
    assert tl["groupPx1"] >= 2 and tl["width2"] > tl["width1"] * 1.3   # follows the node's width
    needle = SAMPLE["needles"][0]
    t_needle = needle["frame_start"] / SAMPLE["fps"]
    assert abs(tl["moment"] - t_needle) < 1.0                   # the best moment is the needle
    assert tl["hasVideo"] and tl["seeked"]
    assert abs(tl["after"] - tl["lastSeek"]) < 0.25 and abs(tl["after"] - tl["moment"]) < 0.5
    assert abs(tl["after"] - tl["before"]) > 1.0               # the preview moved


# -- laziness, caching and the feature cache -------------------------------------------------------

def test_budget_change_reruns_only_the_allocation(comfy_server, api, model_name):
    first = comfy_server.run(make(api, "adapttoken_full", model_name), timeout=300)
    assert first.status == "success"
    p = make(api, "adapttoken_full", model_name, BudgetAllocate__budget=512)
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success"
    upstream = {node_of(p, f"AdaptToken_{n}") for n in
                ("LoadMLLM", "LoadVideo", "GroupSplit", "AttentionRank", "EntropyScore")}
    assert upstream <= cached(run)
    assert ran(run) == {node_of(p, "AdaptToken_BudgetAllocate"), node_of(p, "AdaptToken_MLLMAnswer")}
    st = stats(run, p)
    assert st["encoded_slices"] == 0 and st["decoded_frames"] == 0 and st["budget"] == 512


def test_new_question_reuses_features_until_free(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name, AttentionRank__question="What appeared first?")
    comfy_server.run(p, timeout=300)
    p2 = make(api, "adapttoken_full", model_name, AttentionRank__question="What appeared last?")
    run = comfy_server.run(p2, timeout=300)
    assert run.status == "success"
    assert {node_of(p2, "AdaptToken_LoadMLLM"), node_of(p2, "AdaptToken_LoadVideo")} <= cached(run)
    st = stats(run, p2)
    assert st["group_passes"] == SAMPLE_GROUPS and st["encoded_slices"] == 0
    # "Unload models": the features go with the weights
    assert comfy_server.free(wait_unload_s=60), "the model was not unloaded within 60 s of /free"
    p3 = make(api, "adapttoken_full", model_name, AttentionRank__question="What appeared at all?")
    st = stats(comfy_server.run(p3, timeout=300), p3)
    assert st["encoded_slices"] == SAMPLE_SLICES


def test_keep_loaded_off_offloads_after_the_answer(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name, LoadMLLM__keep_loaded=False,
             AttentionRank__question="Is anything red?")
    assert stats(comfy_server.run(p, timeout=300), p)["encoded_slices"] == SAMPLE_SLICES
    p2 = make(api, "adapttoken_full", model_name, LoadMLLM__keep_loaded=False,
              AttentionRank__question="Is anything green?")
    assert stats(comfy_server.run(p2, timeout=300), p2)["encoded_slices"] == SAMPLE_SLICES
    p3 = make(api, "adapttoken_full", model_name, AttentionRank__question="Is anything blue?")
    comfy_server.run(p3, timeout=300)
    p4 = make(api, "adapttoken_full", model_name, AttentionRank__question="Is anything grey?")
    assert stats(comfy_server.run(p4, timeout=300), p4)["encoded_slices"] == 0


def test_lite_never_touches_the_groups_after_the_stop(comfy_server, api, model_name):
    comfy_server.free()              # start from an empty feature cache (waits for the unload)
    # threshold 1.0: stop after the first group whatever its entropy (the group rule alone: the
    # answer check, Early Stop's appended input, off)
    p = make(api, "adapttoken_lite", model_name, EarlyStop__threshold=1.0, EarlyStop__confirm=1,
             EarlyStop__check_answer=False, AttentionRank__question="What colour was it?")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    st = stats(run, p)
    assert st["method"] == "lite" and st["group_passes"] == 1
    assert st["skipped_groups"] == list(range(1, SAMPLE_GROUPS))
    assert st["encoded_slices"] == SAMPLE_SLICES // SAMPLE_GROUPS
    summary = run.outputs[node_of(p, "AdaptToken_BudgetAllocate")]["text"][0]
    assert "skipped by Early Stop" in summary


def test_answer_text_is_streamed_to_the_node(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name, MLLMAnswer__max_new_tokens=12)
    run = comfy_server.run(p, timeout=300)
    answer_node = node_of(p, "AdaptToken_MLLMAnswer")
    answer = run.outputs[answer_node]["text"][0]
    texts = run.texts(answer_node)
    if answer:
        assert texts and texts[-1].strip() == answer.strip()


# -- other video sources ---------------------------------------------------------------------------

def test_images_and_core_video_inputs(comfy_server, api, model_name):
    base = make(api, "uniform_frames_baseline", model_name)
    lv = node_of(base, "AdaptToken_LoadVideo")
    p = copy.deepcopy(base)
    p["100"] = {"class_type": "EmptyImage",
                "inputs": {"width": 112, "height": 84, "batch_size": 30, "color": 0x336699}}
    p[lv]["inputs"].update(images=["100", 0], images_fps=10.0, video="not-there.mp4")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    st = stats(run, p)
    assert st["num_frames"] == 30 and st["num_slices"] == 15
    p[node_of(p, "AdaptToken_UniformFrames")]["inputs"]["question"] = "And now?"
    again = comfy_server.run(p, timeout=300)       # the frames stay planned and encoded
    assert lv in cached(again) and stats(again, p)["encoded_slices"] == 0
    p = copy.deepcopy(base)
    p["101"] = {"class_type": "LoadVideo", "inputs": {"file": spec.SAMPLE_VIDEO_NAME}}
    p[lv]["inputs"].update(video_input=["101", 0], num_frames=64)
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    assert stats(run, p)["num_frames"] == 64


@pytest.mark.vhs
def test_frames_and_video_info_from_videohelpersuite(comfy_server, api, model_name, tmp_path):
    """VideoHelperSuite's Load Video (Path) -> IMAGE + VHS_VIDEOINFO -> Load Video: the frame rate
    comes from its video info (loaded_fps after force_rate), not from images_fps. Opt-in: run with
    COMFY_TEST_EXTRA_PACKS=<ComfyUI-VideoHelperSuite checkout> pytest -m vhs (it needs opencv and
    imageio-ffmpeg)."""
    from videos import write_video
    if "VHS_LoadVideoPath" not in comfy_server.get("/object_info"):
        pytest.fail("VideoHelperSuite is not loaded: set COMFY_TEST_EXTRA_PACKS to its checkout")
    src = write_video(tmp_path / "numbered.mp4", 120, width=112, height=112, fps=10)
    p = make(api, "adapttoken_full", model_name)
    lv = node_of(p, "AdaptToken_LoadVideo")
    p["vhs"] = {"class_type": "VHS_LoadVideoPath",
                "inputs": {"video": str(src), "force_rate": 5, "custom_width": 0, "custom_height": 0,
                           "frame_load_cap": 0, "skip_first_frames": 0, "select_every_nth": 1}}
    p[lv]["inputs"].update(images=["vhs", 0], video_info=["vhs", 3], images_fps=24.0, num_frames=16)
    p["fps"] = {"class_type": "PreviewAny", "inputs": {"source": [lv, 2]}}
    p["n"] = {"class_type": "PreviewAny", "inputs": {"source": [lv, 1]}}
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    assert float(run.outputs["fps"]["text"][0]) == 5.0           # VHS's loaded_fps, not 24
    assert int(run.outputs["n"]["text"][0]) == 60                 # 12 s at 5 fps
    assert run.outputs[node_of(p, "AdaptToken_MLLMAnswer")]["text"][0] is not None


def test_path_widget_wins_over_the_list(comfy_server, api, model_name, tmp_path):
    from videos import write_video
    clip = write_video(tmp_path / "elsewhere.mp4", 40, width=64, height=48, fps=8)
    p = make(api, "uniform_frames_baseline", model_name, LoadVideo__path=f'"{clip}"')
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    assert stats(run, p)["num_frames"] == 40


# -- bad inputs, errors, cancel --------------------------------------------------------------------

BAD = {
    "missing file in the list": ("LoadVideo__video", "nope.mp4", "not in ComfyUI's input folder"),
    "missing path": ("LoadVideo__path", "/no/such/video.mp4", "does not exist"),
    "end before start": ("LoadVideo__end", 0.5, "must be after start"),
    "empty question": ("AttentionRank__question", "   ", "question is empty"),
    "one option": ("AttentionRank__options", "only one", "at least two options"),
    "budget 0": ("BudgetAllocate__budget", 0, "budget=0"),
    "budget negative": ("BudgetAllocate__budget", -5, "-5"),
    "URL as path": ("LoadVideo__path", "https://example.com/clip.mp4",
                    "is a URL: only local files are read"),
    "question not UTF-8": ("AttentionRank__question", "What \udcff?",
                           "question is not valid UTF-8 text (byte 0xff at position 5)"),
    "27 options": ("AttentionRank__options", "\n".join(f"choice {i}" for i in range(27)),
                   "27 given, at most 26 (A-Z) are supported: remove 1 of them"),
    "llama folder": ("LoadMLLM__model", "some-llama", "'llama' model; supported families"),
    "unknown model": ("LoadMLLM__model", "gone", "is not in"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_refused_before_any_work(comfy_server, api, model_name, case):
    key, value, message = BAD[case]
    changes = {key: value}
    if key == "LoadVideo__end":
        changes["LoadVideo__start"] = 1.0
    p = make(api, "adapttoken_full", model_name, **changes)
    if key == "LoadMLLM__model":
        p[node_of(p, "AdaptToken_LoadMLLM")]["inputs"]["model"] = value
    rejected = sys.modules[type(comfy_server).__module__].PromptRejected   # the harness's class
    with pytest.raises(rejected) as e:
        comfy_server.post_prompt(p)
    assert e.value.status == 400
    details = [err["details"] for n in e.value.body["node_errors"].values() for err in n["errors"]]
    assert any(message in d for d in details), details


def test_error_during_a_run_has_the_library_message_and_server_goes_on(comfy_server, api, model_name):
    p = make(api, "adapttoken_full", model_name, AttentionRank__layer=999)   # within the widget's range
    run = comfy_server.run(p, timeout=300)
    assert run.status == "error"
    assert run.error["node_type"] == "AdaptToken_AttentionRank"
    assert run.error["exception_type"].endswith("ValueError")
    assert "layer=999 is out of range" in run.error["exception_message"]
    assert comfy_server.run(make(api, "adapttoken_full", model_name), timeout=300).status == "success"


def test_group_size_above_the_slices_runs_one_group(comfy_server, api, model_name):
    """group_size 1000 on the sample's 480 slices: one group of all of them (it used to fail), and
    the clamp is shown on Group Split, in Budget Allocate's summary and in the answer's report."""
    p = make(api, "adapttoken_full", model_name, GroupSplit__group_size=1000,
             AttentionRank__question="One group?")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    shown = run.outputs[node_of(p, "AdaptToken_GroupSplit")]["text"][0]
    assert shown == ("1 strided group of <= 480 slices (480 slices); group_size=1000 clamped to the "
                     "video's 480 slices")
    summary = run.outputs[node_of(p, "AdaptToken_BudgetAllocate")]["text"][0]
    assert "1 group of <= 480 slices (group_size=1000 clamped" in summary
    st = stats(run, p)
    assert st["group_passes"] == 1 and (st["group_size"], st["requested_group_size"]) == (480, 1000)
    assert "group_size=1000 clamped to the video's 480 slices" in comfy_server.log()


def test_cancel_stops_a_long_run(comfy_server, api, model_name, tmp_path):
    from videos import write_video
    name = "adapttoken_long_test.mp4"
    write_video(comfy_server.input_dir / name, 4000, width=112, height=112, fps=25)
    p = make(api, "adapttoken_full", model_name, LoadVideo__video=name, LoadVideo__num_frames=4000,
             GroupSplit__group_size=1, AttentionRank__question="Cancel me?")
    pid = comfy_server.post_prompt(p)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:        # wait until it runs, then give it a moment
        running = comfy_server.get("/queue")["queue_running"]
        if any(item[1] == pid for item in running):
            break
        time.sleep(0.1)
    time.sleep(3.0)
    t0 = time.monotonic()
    comfy_server.interrupt(pid)
    run = comfy_server.wait(pid, timeout=120)
    stopped_after = time.monotonic() - t0
    assert run.status == "interrupted", run.error
    assert stopped_after < 10, f"took {stopped_after:.1f} s to stop"
    ended = run.of_type("execution_interrupted")[0]
    assert ended["node_type"] in ("AdaptToken_BudgetAllocate", "AdaptToken_MLLMAnswer")
    # the server is fine and the next prompt runs
    assert comfy_server.run(make(api, "uniform_frames_baseline", model_name), timeout=300).status == "success"


# -- odd files are answered, bad ranges fail with the library's message, the server goes on --------

def device_memory(comfy_server) -> tuple[str, int]:
    """(device type, bytes torch holds on it) from /system_stats."""
    dev = comfy_server.get("/system_stats")["devices"][0]
    return dev.get("type", "cpu"), int(dev.get("torch_vram_total", 0))


def assert_memory_given_back(comfy_server, before: tuple[str, int]) -> None:
    """On a GPU, torch holds no more memory after a failed prompt than before it (the step's
    working memory went back to the device); a --cpu server has no device memory to check."""
    kind, now = device_memory(comfy_server)
    if kind == "cuda":
        assert now <= before[1] + 64 * 2**20, (before, now)


ODD = {          # file builder, frames sampled: answered from the first video stream
    "animated GIF": (lambda d: __import__("videos").write_gif(d / "anim.gif", 12, fps=10), 12),
    "still PNG": (lambda d: __import__("videos").write_image(d / "still.png"), 2),
    "still JPEG": (lambda d: __import__("videos").write_image(d / "still.jpg"), 2),
    "two video streams": (lambda d: __import__("videos").write_two_video_streams(d / "two.mkv"), 16),
    "size change mid-stream": (lambda d: __import__("videos").write_size_change(d / "size.ts"), 16),
    "10-bit": (lambda d: __import__("videos").write_video(d / "ten.mp4", 16, fps=8, codec="libx264",
                                                         pix_fmt="yuv420p10le"), 16),
    "spaces and non-ASCII path": (lambda d: __import__("videos").write_video(d / "my vidéo 日本.mp4", 16,
                                                                            fps=8), 16),
    "header claims 20 h": (lambda d: __import__("videos").claim_duration(
        __import__("videos").write_video(d / "liar.mp4", 16, fps=8), 72000), 16),
}


@pytest.mark.parametrize("case", list(ODD))
def test_odd_files_are_answered(comfy_server, api, model_name, tmp_path, case):
    build, frames = ODD[case]
    clip = build(tmp_path)
    p = make(api, "adapttoken_full", model_name, LoadVideo__path=str(clip), GroupSplit__group_size=4,
             AttentionRank__question=f"What is in the {case}?")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    st = stats(run, p)
    assert st["num_frames"] == frames and st["num_slices"] == frames // 2
    assert isinstance(run.outputs[node_of(p, "AdaptToken_MLLMAnswer")]["text"][0], str)


def test_budget_above_the_tokens_keeps_them_all(comfy_server, api, model_name, tmp_path):
    from videos import write_gif
    clip = write_gif(tmp_path / "small.gif", 12, fps=10)
    p = make(api, "adapttoken_full", model_name, LoadVideo__path=str(clip), GroupSplit__group_size=4,
             BudgetAllocate__budget=1_000_000, BudgetAllocate__redundancy_threshold=-1.0,
             AttentionRank__question="Everything?")
    run = comfy_server.run(p, timeout=300)
    assert run.status == "success", run.error
    st = stats(run, p)
    summary = run.outputs[node_of(p, "AdaptToken_BudgetAllocate")]["text"][0]
    assert summary.startswith(f"adapttoken: {st['num_slices'] * st['tokens_per_slice']} tokens kept of "
                              f"budget 1000000")


RUN_ERRORS = {   # found only once the file is probed: an execution_error, then the server goes on
    "start after the end": (dict(LoadVideo__start=30.0), "AdaptToken_LoadVideo",
                            "start=30 s is at or beyond the end of"),
    "end before the first frame's start": (dict(LoadVideo__start=1.9, LoadVideo__end=1.95),
                                           "AdaptToken_LoadVideo", "widen the range"),
}


@pytest.mark.parametrize("case", list(RUN_ERRORS))
def test_run_errors_name_the_input_and_the_server_goes_on(comfy_server, api, model_name, tmp_path, case):
    from videos import write_video
    changes, node_type, message = RUN_ERRORS[case]
    clip = write_video(tmp_path / "two_seconds.mp4", 16, fps=8)
    before = device_memory(comfy_server)
    p = make(api, "adapttoken_full", model_name, LoadVideo__path=str(clip), **changes)
    run = comfy_server.run(p, timeout=300)
    assert run.status == "error"
    assert run.error["node_type"] == node_type
    assert message in run.error["exception_message"] and "\n" not in run.error["exception_message"].strip()
    assert "duration 2.000 s" in run.error["exception_message"]
    assert_memory_given_back(comfy_server, before)
    ok = make(api, "uniform_frames_baseline", model_name, LoadVideo__path=str(clip))
    assert comfy_server.run(ok, timeout=300).status == "success"
