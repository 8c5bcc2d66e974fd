"""The ComfyUI pack without ComfyUI: the node table (nodes/spec.py) and every shipped workflow
checked against it, the pack's import being light, and the pure text helpers of the nodes.
tests/comfy/ checks the same table against a real ComfyUI's /object_info and runs the workflows."""
from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nodes import spec  # noqa: E402
from nodes.text import images_fps_of, parse_options, parse_question_list, trimmed_sampling  # noqa: E402

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))
REAL_MODEL = "Qwen2.5-VL-7B-Instruct"      # the real-model workflow's folder in models/LLM
FRONTEND_ONLY = {"MarkdownNote", "Note"}      # virtual nodes the frontend never sends to the server
CONTROL_VALUES = {"fixed", "increment", "decrement", "randomize"}
SOCKET_TYPES = set(spec.CUSTOM_TYPES) | set(spec.FOREIGN_TYPES) | {"IMAGE", "VIDEO"}
NODE_IDS = ["AdaptToken_LoadMLLM", "AdaptToken_LoadVideo", "AdaptToken_GroupSplit",
            "AdaptToken_AttentionRank", "AdaptToken_EntropyScore", "AdaptToken_EarlyStop",
            "AdaptToken_BudgetAllocate", "AdaptToken_UniformFrames", "AdaptToken_MLLMAnswer",
            "AdaptToken_SelectionPreview", "AdaptToken_KeyMoments", "AdaptToken_AskMany"]
SAMPLE = json.loads((ROOT / "adapttoken" / "assets" / "sample.json").read_text())


# -- the table -------------------------------------------------------------------------------------

def test_node_ids_are_the_promised_ones():
    assert [s.id for s in spec.SPECS] == NODE_IDS
    assert len(spec.BY_ID) == len(spec.SPECS)


@pytest.mark.parametrize("s", spec.SPECS, ids=lambda s: s.id)
def test_spec_is_consistent(s):
    names = [i.name for i in s.inputs]
    assert len(set(names)) == len(names)
    assert len({o.name for o in s.outputs}) == len(s.outputs)
    assert s.display_name and s.description
    for i in s.inputs:
        assert i.is_widget or i.type in SOCKET_TYPES, i
        if i.type == "INT":
            assert isinstance(i.default, int) and i.min <= i.default <= i.max, i
        elif i.type == "FLOAT":
            assert i.min <= i.default <= i.max, i
        elif i.type == "COMBO" and not i.dynamic:
            assert i.default in i.options, i
        elif i.type == "BOOLEAN":
            assert isinstance(i.default, bool)
    for o in s.outputs:
        assert o.type in SOCKET_TYPES | set(spec.WIDGET_TYPES), o


def test_the_method_chain_types_line_up():
    """video -> groups -> ranked -> scored -> selection: each step consumes what the last made."""
    out = {s.id: [o.type for o in s.outputs] for s in spec.SPECS}
    ins = {s.id: [i.type for i in s.inputs if not i.is_widget] for s in spec.SPECS}
    assert out["AdaptToken_LoadVideo"][0] in ins["AdaptToken_GroupSplit"]
    assert out["AdaptToken_GroupSplit"] == ["AT_GROUPS"] and "AT_GROUPS" in ins["AdaptToken_AttentionRank"]
    assert ins["AdaptToken_EntropyScore"] == out["AdaptToken_AttentionRank"]
    assert ins["AdaptToken_EarlyStop"] == out["AdaptToken_EarlyStop"] == out["AdaptToken_EntropyScore"]
    assert ins["AdaptToken_BudgetAllocate"] == out["AdaptToken_EntropyScore"]
    assert out["AdaptToken_BudgetAllocate"][0] == out["AdaptToken_UniformFrames"][0] == "AT_SELECTION"
    assert ins["AdaptToken_MLLMAnswer"] == ins["AdaptToken_SelectionPreview"] == ["AT_SELECTION"]


def test_widget_order_is_the_frontends():
    """Checked in the ComfyUI 1.27 frontend: optional widgets after required ones, the seed's
    control value right after it, the upload button last."""
    assert [n for n, _ in spec.BY_ID["AdaptToken_LoadVideo"].widget_slots()] == [
        "video", "num_frames", "max_fps", "start", "end", "max_pixels", "path", "images_fps", "upload"]
    assert [n for n, _ in spec.BY_ID["AdaptToken_MLLMAnswer"].widget_slots()][-2:] == [
        "seed", "control_after_generate"]


# -- the workflows ---------------------------------------------------------------------------------

def _valid_widget(i: spec.In, v) -> bool:
    if i.type == "INT":
        return isinstance(v, int) and not isinstance(v, bool) and i.min <= v <= i.max
    if i.type == "FLOAT":
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) \
            and i.min <= v <= i.max
    if i.type == "BOOLEAN":
        return isinstance(v, bool)
    if i.type == "STRING":
        return isinstance(v, str)
    allowed = set(i.options)
    if i.dynamic == "input_videos":
        allowed.add(spec.SAMPLE_VIDEO_NAME)
    if i.dynamic == "llm_models":                 # a folder of models/LLM (the real-model workflow)
        allowed.add(REAL_MODEL)
    return v in allowed


def test_the_workflows_are_shipped():
    assert [p.name for p in WORKFLOWS] == ["adapttoken_full.json", "adapttoken_lite.json",
                                           "adapttoken_preview.json", "adapttoken_real_model.json",
                                           "adapttoken_vs_uniform.json", "uniform_frames_baseline.json"]
    assert not (ROOT / "example_workflows").exists()          # one folder only (issue 16)
    for p in WORKFLOWS:                                       # the template browser's thumbnails
        assert p.with_suffix(".jpg").is_file(), f"no thumbnail {p.with_suffix('.jpg').name}"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_reads_left_to_right_in_groups(path):
    """Every edge goes right (or down within a column), and every node sits inside a titled group."""
    ui = json.loads(path.read_text())
    nodes = {n["id"]: n for n in ui["nodes"]}
    for _, src, _, dst, _, _ in ui["links"]:
        a, b = nodes[src]["pos"], nodes[dst]["pos"]
        assert a[0] < b[0] or (a[0] == b[0] and a[1] < b[1]), (nodes[src]["type"], nodes[dst]["type"])
    groups = ui["groups"]
    assert groups and all(g["title"] for g in groups)
    titles = [g["title"] for g in groups]
    assert titles[0].startswith("1. Inputs") and titles[-1].startswith("3. Answer")

    def inside(n, g):
        x, y, w, h = g["bounding"]
        (nx, ny), (nw, nh) = n["pos"], n["size"]
        return x <= nx and nx + nw <= x + w and y < ny and ny + nh <= y + h

    for n in nodes.values():
        if n["type"] not in FRONTEND_ONLY:
            assert any(inside(n, g) for g in groups), n["type"]
    notes = [n for n in nodes.values() if n["type"] in FRONTEND_ONLY]
    assert len(notes) >= len(groups)                          # a note on each step


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.stem)
def test_workflow_matches_the_spec(path):
    ui = json.loads(path.read_text())
    assert ui["version"] == 0.4 and isinstance(ui["links"], list) and "groups" in ui
    nodes = {n["id"]: n for n in ui["nodes"]}
    assert len(nodes) == len(ui["nodes"]) and ui["last_node_id"] >= max(nodes)
    links = {lk[0]: lk for lk in ui["links"]}
    assert len(links) == len(ui["links"]) and ui["last_link_id"] >= max(links)
    for n in nodes.values():
        if n["type"] in FRONTEND_ONLY:
            continue
        s = spec.BY_ID[n["type"]]                                  # every node type exists
        sockets = {i.name: i for i in s.inputs if not i.is_widget}
        for k, inp in enumerate(n["inputs"]):
            want = sockets[inp["name"]]
            assert inp["type"] == want.type, (n["type"], inp)
            if inp["link"] is not None:
                lk = links[inp["link"]]
                assert lk[3] == n["id"] and lk[4] == k, (n["type"], inp, lk)
        linked = {i["name"] for i in n["inputs"] if i["link"] is not None}
        missing = [name for name, i in sockets.items() if not i.optional and name not in linked]
        assert not missing, f"{n['type']}: required inputs not connected: {missing}"
        assert [(o["name"], o["type"]) for o in n["outputs"]] == [(o.name, o.type) for o in s.outputs]
        for k, o in enumerate(n["outputs"]):
            for lid in o.get("links") or []:
                assert links[lid][1] == n["id"] and links[lid][2] == k
        slots = s.widget_slots()
        values = n.get("widgets_values", [])
        assert len(values) == len(slots), (n["type"], values, [x for x, _ in slots])
        for (name, i), v in zip(slots, values):
            if name == "upload":
                assert v == "image"
            elif name == "control_after_generate":
                assert v in CONTROL_VALUES
            else:
                assert _valid_widget(i, v), (n["type"], name, v)
    for lid, src, src_slot, dst, dst_slot, typ in ui["links"]:      # both ends agree on the type
        assert nodes[src]["outputs"][src_slot]["type"] == typ
        assert nodes[dst]["inputs"][dst_slot]["type"] == typ
        assert lid in nodes[src]["outputs"][src_slot]["links"] and nodes[dst]["inputs"][dst_slot]["link"] == lid


def _graph(name):
    ui = json.loads((ROOT / "workflows" / name).read_text())
    types = {n["id"]: n["type"] for n in ui["nodes"]}
    edges = {(types[lk[1]], types[lk[3]]) for lk in ui["links"]}
    return sorted(t for t in types.values() if t not in FRONTEND_ONLY), edges, ui


def test_lite_is_full_plus_early_stop_and_preview_is_full_plus_preview():
    full, full_edges, _ = _graph("adapttoken_full.json")
    lite, lite_edges, _ = _graph("adapttoken_lite.json")
    prev, prev_edges, _ = _graph("adapttoken_preview.json")
    uni, _, _ = _graph("uniform_frames_baseline.json")
    assert sorted(lite) == sorted(full + ["AdaptToken_EarlyStop"])
    assert ("AdaptToken_EntropyScore", "AdaptToken_BudgetAllocate") in full_edges
    assert {("AdaptToken_EntropyScore", "AdaptToken_EarlyStop"),
            ("AdaptToken_EarlyStop", "AdaptToken_BudgetAllocate")} <= lite_edges
    assert sorted(prev) == sorted(full + ["AdaptToken_SelectionPreview", "AdaptToken_KeyMoments"])
    assert {("AdaptToken_BudgetAllocate", "AdaptToken_SelectionPreview"),
            ("AdaptToken_BudgetAllocate", "AdaptToken_KeyMoments")} <= prev_edges
    both, both_edges, _ = _graph("adapttoken_vs_uniform.json")
    assert sorted(both) == sorted(full + ["AdaptToken_UniformFrames", "AdaptToken_MLLMAnswer"])
    assert ("AdaptToken_UniformFrames", "AdaptToken_MLLMAnswer") in both_edges
    real, real_edges, real_ui = _graph("adapttoken_real_model.json")
    assert real == full and real_edges == full_edges
    assert sorted(uni) == sorted(["AdaptToken_LoadMLLM", "AdaptToken_LoadVideo",
                                  "AdaptToken_UniformFrames", "AdaptToken_MLLMAnswer"])


def test_real_model_workflow_has_the_papers_setting():
    ui = json.loads((ROOT / "workflows" / "adapttoken_real_model.json").read_text())
    values = {n["type"]: n.get("widgets_values") for n in ui["nodes"]}
    assert values["AdaptToken_LoadMLLM"][0] == REAL_MODEL
    assert values["AdaptToken_LoadVideo"][1] == 4096 and values["AdaptToken_BudgetAllocate"][0] == 7040


@pytest.mark.parametrize("path", [p for p in WORKFLOWS if p.stem != "adapttoken_real_model"],
                         ids=lambda p: p.stem)
def test_workflow_points_at_the_bundled_demo(path):
    """Bundled model + bundled sample video, and the sample's own (open) question."""
    ui = json.loads(path.read_text())
    values = {n["type"]: n.get("widgets_values") for n in ui["nodes"]}
    assert values["AdaptToken_LoadMLLM"][0] == spec.BUNDLED_MODEL_NAME
    assert values["AdaptToken_LoadVideo"][0] == spec.SAMPLE_VIDEO_NAME
    assert values["AdaptToken_LoadVideo"][6] == ""                 # path empty: the list is used
    q = next(x for x in SAMPLE["questions"] if not x["options"])
    asked = values.get("AdaptToken_AttentionRank") or values["AdaptToken_UniformFrames"]
    assert asked[0] == q["text"] and parse_options(asked[1]) == ()


def test_sample_video_is_small_and_decodable():
    from adapttoken.video import probe_video
    path = ROOT / "adapttoken" / "assets" / "sample.mp4"
    assert path.stat().st_size < 2 * 1024 * 1024
    info = probe_video(path)
    assert info.num_frames == SAMPLE["num_frames"] and info.fps == pytest.approx(SAMPLE["fps"])


# -- the pack's import -----------------------------------------------------------------------------

def test_pack_import_is_light_and_needs_no_comfyui():
    code = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('at_pack', {str(ROOT / '__init__.py')!r},"
        f" submodule_search_locations=[{str(ROOT)!r}])\n"
        "m = importlib.util.module_from_spec(spec); sys.modules['at_pack'] = m\n"
        "spec.loader.exec_module(m)\n"
        "import at_pack.nodes.spec\n"
        "assert m.WEB_DIRECTORY == './web/js' and callable(m.comfy_entrypoint)\n"
        "heavy = [x for x in ('torch', 'transformers', 'av', 'comfy_api', 'adapttoken') if x in sys.modules]\n"
        "print(heavy)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/",
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
    assert (ROOT / "web" / "js" / "adapttoken.js").is_file()


# -- text helpers ----------------------------------------------------------------------------------

def test_parse_options():
    assert parse_options("") == ()
    assert parse_options("a dog\n\n  a cat  \n") == ("a dog", "a cat")
    assert parse_options("A. a dog\nB) a cat\n(C) a car") == ("a dog", "a cat", "a car")
    assert parse_options("A. a dog\nC. a cat") == ("A. a dog", "C. a cat")   # not A, B...: kept
    assert parse_options("B. only") == ("B. only",)


# -- help and registry ---------------------------------------------------------------------------

@pytest.mark.parametrize("s", spec.SPECS, ids=lambda s: s.id)
def test_every_input_has_a_tooltip_and_the_node_a_help_page(s):
    assert all(i.tooltip.strip() for i in s.inputs), [i.name for i in s.inputs if not i.tooltip]
    page = ROOT / "web" / "js" / "docs" / f"{s.id}.md"        # ComfyUI's node help: docs/<id>.md
    text = page.read_text(encoding="utf-8")
    assert text.startswith(f"# {s.display_name}\n")
    for name in [i.name for i in s.inputs] + [o.name for o in s.outputs]:
        assert f"| `{name}` |" in text, f"{page.name} does not describe {name}"


def test_pyproject_is_ready_for_the_registry_without_invented_urls():
    import tomllib
    import xml.etree.ElementTree as ET
    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "urls" not in meta["project"]                       # no repository URL until a real one
    comfy = meta["tool"]["comfy"]
    assert set(comfy) >= {"PublisherId", "DisplayName", "Icon"} and comfy["DisplayName"]
    assert comfy["Icon"] == "" or comfy["Icon"].startswith("https://")
    assert ET.parse(ROOT / "web" / "icon.svg").getroot().tag.endswith("svg")   # shipped icon


def test_a_trimmed_core_video_samples_inside_its_trim_window():
    base = {"num_frames": 64, "start": 0.0, "end": None}
    assert trimmed_sampling(base, (0.0, 0.0)) == base                       # untrimmed: as typed
    assert trimmed_sampling(base, (10.0, 5.0)) == {**base, "start": 10.0, "end": 15.0}
    assert trimmed_sampling(base, (10.0, 0.0)) == {**base, "start": 10.0, "end": None}
    within = {"num_frames": 64, "start": 1.0, "end": 3.0}                     # seconds of the clip
    assert trimmed_sampling(within, (10.0, 5.0)) == {**within, "start": 11.0, "end": 13.0}
    assert trimmed_sampling({**within, "end": 9.0}, (10.0, 5.0))["end"] == 15.0   # clip's end


def test_question_list_syntax():
    text = """# the sample video
What coloured object appeared?
A. red
B) blue
(C) green

How many objects appeared?
---
Which shape?
square
circle
"""
    assert parse_question_list(text) == [
        ("What coloured object appeared?", ("red", "blue", "green")),
        ("How many objects appeared?", ()),
        ("Which shape?", ("square", "circle"))]
    assert parse_question_list("") == [] and parse_question_list("\n# only a comment\n") == []


def test_videohelpersuite_video_info_gives_the_frame_rate():
    info = {"source_fps": 30.0, "loaded_fps": 10.0, "loaded_frame_count": 90}
    assert images_fps_of(info, 24.0) == 10.0                 # VHS's rate of the frames it returned
    assert images_fps_of(None, 24.0) == 24.0                 # not connected: the typed rate
    assert images_fps_of({"loaded_fps": 0}, 12.5) == 12.5
    assert images_fps_of({"loaded_fps": "x"}, 12.5) == 12.5
