"""The node schemas as plain data: ids, inputs, outputs. The V3 classes are built from this table
(nodes/types.py), and the tests check every shipped workflow against it without ComfyUI.

Node ids, input names and output order are a promise to saved workflows: add, never rename.
Imports nothing (neither ComfyUI nor torch), so CI can read it anywhere.
"""
from __future__ import annotations

from dataclasses import dataclass

CATEGORY = "AdaptToken"
BUNDLED_MODEL_NAME = "adapttoken-tiny-synth (bundled)"
SAMPLE_VIDEO_NAME = "adapttoken_sample.mp4"

# Custom edge types: each carries one library object (see docs/DESIGN.md).
AT_MODEL = "AT_MODEL"           # nodes.runtime.ComfyModel (an adapttoken.Model + its ModelPatcher)
AT_VIDEO = "AT_VIDEO"           # adapttoken.VideoHandle (sampling plan + lazy reader)
AT_GROUPS = "AT_GROUPS"         # adapttoken.Groups
AT_RANKED = "AT_RANKED"         # adapttoken.RankedGroups (lazy)
AT_SCORED = "AT_SCORED"         # adapttoken.ScoredGroups (lazy)
AT_SELECTION = "AT_SELECTION"   # adapttoken.Selection
AT_EVIDENCE = "AT_EVIDENCE"     # list of key moments (adapttoken.evidence.key_moments dicts)
CUSTOM_TYPES = (AT_MODEL, AT_VIDEO, AT_GROUPS, AT_RANKED, AT_SCORED, AT_SELECTION, AT_EVIDENCE)
# Edge types other packs define, which some inputs accept (VideoHelperSuite's video info dict)
VHS_VIDEOINFO = "VHS_VIDEOINFO"
FOREIGN_TYPES = (VHS_VIDEOINFO,)
WIDGET_TYPES = ("INT", "FLOAT", "STRING", "BOOLEAN", "COMBO")
SEED_MAX = 0xFFFFFFFFFFFFFFFF


@dataclass(frozen=True)
class In:
    """One input. `options` of a COMBO are its fixed choices; `dynamic` names a list computed when
    ComfyUI asks (model folders, input videos); then `options` are the choices known in advance."""
    name: str
    type: str
    default: object = None
    min: float | None = None
    max: float | None = None
    step: float | None = None
    options: tuple = ()
    dynamic: str = ""
    optional: bool = False
    multiline: bool = False
    upload: str = ""                       # "video": the combo gets ComfyUI's upload button
    control_after_generate: bool = False   # the seed's fixed/increment/randomize companion widget
    tooltip: str = ""

    @property
    def is_widget(self) -> bool:
        return self.type in WIDGET_TYPES


@dataclass(frozen=True)
class Out:
    name: str
    type: str
    tooltip: str = ""


@dataclass(frozen=True)
class NodeSpec:
    id: str
    display_name: str
    description: str
    inputs: tuple[In, ...]
    outputs: tuple[Out, ...]
    output_node: bool = False
    hidden_unique_id: bool = False

    def input(self, name: str) -> In:
        return next(i for i in self.inputs if i.name == name)

    def widget_slots(self) -> list[tuple[str, In | None]]:
        """The order of `widgets_values` in a saved workflow, as the ComfyUI frontend (1.27) writes
        it: required widgets, then optional ones, each in schema order, a seed followed by its
        control_after_generate value; upload buttons ("image") come last."""
        out: list[tuple[str, In | None]] = []
        widgets = [i for i in self.inputs if i.is_widget]
        for i in [w for w in widgets if not w.optional] + [w for w in widgets if w.optional]:
            out.append((i.name, i))
            if i.control_after_generate:
                out.append(("control_after_generate", None))
        out += [("upload", None) for i in widgets if i.upload]
        return out


QUESTION = In("question", "STRING", "", multiline=True,
              tooltip="The question about the video.")
OPTIONS = In("options", "STRING", "", multiline=True,
             tooltip="One answer option per line (letters A, B, C... are added); empty = open question.")
BUDGET = In("budget", "INT", 7040, 1, 1_000_000, 1,
            tooltip="Total visual tokens the answer pass sees (FlexSelect's 7040 for Qwen2.5-VL-7B).")

SPECS: tuple[NodeSpec, ...] = (
    NodeSpec(
        "AdaptToken_LoadMLLM", "Load MLLM (AdaptToken)",
        "Load a local model folder from models/LLM (Qwen2.5-VL or another family adapttoken "
        "supports; safetensors only, never the network).",
        (In("model", "COMBO", BUNDLED_MODEL_NAME, options=(BUNDLED_MODEL_NAME,), dynamic="llm_models",
            tooltip="A subfolder of models/LLM holding config.json and .safetensors weights."),
         In("dtype", "COMBO", "auto", options=("auto", "bf16", "fp16", "fp32"),
            tooltip="auto: bf16 where the GPU supports it, else fp16, fp32 on CPU."),
         In("attention", "COMBO", "sdpa", options=("sdpa", "eager", "flash_attention_2"),
            dynamic="attention",
            tooltip="Attention kernel (flash_attention_2 is listed only when flash-attn is installed)."),
         In("keep_loaded", "BOOLEAN", True,
            tooltip="Keep the model (and its cached video features) on the GPU after MLLM Answer; "
                    "off: offload it after each answer."),
         In("quantization", "COMBO", "none", options=("none", "nf4", "int8", "fp8"), optional=True,
            tooltip="Language-model weights in 4-bit NF4 (about a quarter of bf16: Qwen2.5-VL-7B "
                    "fits a 16 GB card) or 8-bit, computed in dtype; the vision tower and LM head "
                    "stay in dtype. Needs bitsandbytes (pip install bitsandbytes accelerate). "
                    "fp8: float8 weights and matmuls for the language model and the vision tower, "
                    "for speed on GPUs with FP8 (H100/H200, L4/L40, RTX 40xx); no extra package. A "
                    "quantized model is loaded on the GPU and stays there: ComfyUI's unloading "
                    "frees its video caches, not its weights.")),
        (Out("model", AT_MODEL),)),
    NodeSpec(
        "AdaptToken_LoadVideo", "Load Video (AdaptToken)",
        "Plan which frames to sample from a video; decodes nothing until a later node needs frames. "
        "A connected images or video_input wins over path, and path wins over the video list.",
        (In("video", "COMBO", SAMPLE_VIDEO_NAME, options=(), dynamic="input_videos", upload="video",
            tooltip="A video in ComfyUI's input folder."),
         In("num_frames", "INT", 1024, 2, 100_000, 2,
            tooltip="Frames sampled uniformly over the range (the paper uses 4096)."),
         In("max_fps", "FLOAT", 0.0, 0.0, 240.0, 0.1, tooltip="Cap on sampled frames per second; 0 = no cap."),
         In("start", "FLOAT", 0.0, 0.0, 1e7, 0.1, tooltip="Start of the range, seconds."),
         In("end", "FLOAT", 0.0, 0.0, 1e7, 0.1, tooltip="End of the range, seconds; 0 = to the end."),
         In("max_pixels", "INT", 308 * 560, 28 * 28, 4096 * 4096, 28 * 28,
            tooltip="Per-frame pixel cap before the vision tower (308x560: 220 tokens per 2 frames)."),
         In("path", "STRING", "", optional=True,
            tooltip="A video file path on the server; when not empty it is used instead of the list."),
         In("images_fps", "FLOAT", 24.0, 0.01, 1000.0, 0.01, optional=True,
            tooltip="Frame rate of the images input (used only when images are connected)."),
         In("video_input", "VIDEO", optional=True, tooltip="A core VIDEO; frames are read by index."),
         In("images", "IMAGE", optional=True, tooltip="Frames already in memory."),
         In("video_info", VHS_VIDEOINFO, optional=True,
            tooltip="VideoHelperSuite's video info (from its Load Video, with its IMAGE output on "
                    "images): its loaded_fps is the frames' rate and wins over images_fps.")),
        (Out("video", AT_VIDEO), Out("source_frames", "INT"), Out("source_fps", "FLOAT"),
         Out("sampled_fps", "FLOAT"), Out("sampled_frames", "INT"), Out("duration", "FLOAT"),
         Out("width", "INT"), Out("height", "INT"))),
    NodeSpec(
        "AdaptToken_GroupSplit", "Group Split (AdaptToken)",
        "Split the sampled slices (2 frames each) into groups; strided groups each cover the whole video.",
        (In("video", AT_VIDEO, tooltip="The planned video from Load Video."),
         In("group_size", "INT", 64, 1, 100_000, 1,
            tooltip="Temporal slices per group (FlexSelect: 64); more than the video has: one group "
                    "of all slices (the node shows the size used)."),
         In("layout", "COMBO", "strided", options=("strided", "contiguous"),
            tooltip="strided: group g holds slices g, g+G, ... (each group spans the whole video); "
                    "contiguous: consecutive runs of slices.")),
        (Out("groups", AT_GROUPS),)),
    NodeSpec(
        "AdaptToken_AttentionRank", "Attention Rank (AdaptToken)",
        "Rank each group's visual tokens by the question's attention at one layer. Lazy: the group "
        "passes run when Budget Allocate asks for them.",
        (In("model", AT_MODEL, tooltip="The model from Load MLLM."),
         In("groups", AT_GROUPS, tooltip="The groups from Group Split."), QUESTION, OPTIONS,
         In("layer", "INT", -1, -1, 1000, 1, tooltip="Reference layer; -1 = the model's default."),
         In("aggregation", "COMBO", "max", options=("max", "mean"),
            tooltip="Score of a token: max (FlexSelect) or mean over heads and question tokens.")),
        (Out("ranked", AT_RANKED),)),
    NodeSpec(
        "AdaptToken_EntropyScore", "Entropy Score (AdaptToken)",
        "How certain the answer is after each group (low entropy = evidence). Lazy.",
        (In("ranked", AT_RANKED, tooltip="The ranked groups from Attention Rank."),
         In("mode", "COMBO", "auto", options=("auto", "options", "first_token", "greedy_mean"),
            tooltip="auto: over the option letters for multiple choice, else the first answer token."),
         In("tokens", "INT", 1, 1, 64, 1, tooltip="Greedy tokens averaged by greedy_mean.")),
        (Out("scored", AT_SCORED),)),
    NodeSpec(
        "AdaptToken_EarlyStop", "Early Stop (AdaptToken-Lite)",
        "AdaptToken-Lite: process groups in order and stop once the model is certain enough (in "
        "`confirm` groups that agree on the answer); the "
        "groups after the stop are never encoded or run (only frames that lie next to an earlier group's are decoded on the way).",
        (In("scored", AT_SCORED, tooltip="The scored groups from Entropy Score."),
         In("threshold", "FLOAT", 0.2, 0.0, 1.0, 0.01, tooltip="Stop when entropy / max entropy is below this."),
         In("min_groups", "INT", 1, 1, 100_000, 1, tooltip="Process at least this many groups."),
         In("confirm", "INT", 2, 1, 100, 1, optional=True,
            tooltip="Stop only once this many groups were under the threshold and favoured the "
                    "same answer (1: the paper's rule, stop at the first confident group)."),
         In("check_answer", "BOOLEAN", True, optional=True,
            tooltip="Before stopping, answer over the tokens chosen so far and stop only if that "
                    "answer agrees with the confident groups (questions that need several groups, "
                    "such as counting, then read on).")),
        (Out("scored", AT_SCORED),)),
    NodeSpec(
        "AdaptToken_BudgetAllocate", "Budget Allocate (AdaptToken)",
        "Runs the group passes, splits the token budget by relevance, keeps each group's top tokens "
        "and drops tokens that repeat the same place over time.",
        (In("scored", AT_SCORED, tooltip="Scored groups: from Entropy Score (AdaptToken) or Early "
                                          "Stop (Lite)."), BUDGET,
         In("relevance", "COMBO", "linear", options=("linear", "softmax", "even"),
            tooltip="linear: 1 - H/Hmax; softmax(-H/Hmax/tau); even: FlexSelect's equal split."),
         In("tau", "FLOAT", 0.1, 0.001, 10.0, 0.001, tooltip="Temperature of softmax relevance."),
         In("floor", "INT", 0, 0, 1_000_000, 1, tooltip="Minimum tokens per processed group."),
         In("redundancy_threshold", "FLOAT", 0.9, -1.0, 1.0, 0.01,
            tooltip="Drop a token whose place repeats with cosine similarity above this; negative = off.")),
        (Out("selection", AT_SELECTION), Out("summary", "STRING"))),
    NodeSpec(
        "AdaptToken_UniformFrames", "Uniform Frames (baseline)",
        "Baseline: as many evenly spaced frames as fit the budget, no selection.",
        (In("model", AT_MODEL, tooltip="The model from Load MLLM."),
         In("video", AT_VIDEO, tooltip="The planned video from Load Video."), QUESTION, OPTIONS, BUDGET),
        (Out("selection", AT_SELECTION),)),
    NodeSpec(
        "AdaptToken_MLLMAnswer", "MLLM Answer",
        "Answer once from the selected tokens in temporal order, at their full-video positions.",
        (In("selection", AT_SELECTION, tooltip="The kept tokens from Budget Allocate or Uniform Frames."),
         In("max_new_tokens", "INT", 64, 1, 4096, 1, tooltip="Longest answer, in tokens."),
         In("do_sample", "BOOLEAN", False, tooltip="Off: greedy decoding (the paper's setting)."),
         In("temperature", "FLOAT", 1.0, 0.01, 5.0, 0.01, tooltip="Sampling temperature (do_sample on)."),
         In("top_p", "FLOAT", 1.0, 0.0, 1.0, 0.01, tooltip="Nucleus sampling share (do_sample on)."),
         In("seed", "INT", 0, 0, SEED_MAX, 1, control_after_generate=True,
            tooltip="Used when do_sample is on.")),
        (Out("answer", "STRING"), Out("option_probs", "STRING", "JSON: probability of each option letter."),
         Out("report", "STRING", "JSON: groups, entropies, budgets, kept tokens, timings.")),
        output_node=True, hidden_unique_id=True),
    NodeSpec(
        "AdaptToken_SelectionPreview", "Selection Preview (AdaptToken)",
        "Picture of what was kept: top frames with kept cells, tokens over time, budget per group.",
        (In("selection", AT_SELECTION, tooltip="The kept tokens from Budget Allocate or Uniform Frames."),),
        (Out("image", "IMAGE"),),
        output_node=True),
    NodeSpec(
        "AdaptToken_KeyMoments", "Key Moments (AdaptToken)",
        "The frames the selection leans on, best first: each moment is a slice whose kept tokens' "
        "attention scores sum highest (only groups that received budget keep tokens). Returns the "
        "frames at the video's size, their times and an evidence list for other nodes.",
        (In("selection", AT_SELECTION, tooltip="The kept tokens from Budget Allocate or Uniform Frames."),
         In("count", "INT", 8, 1, 256, 1, tooltip="How many moments (fewer when fewer slices kept tokens).")),
        (Out("images", "IMAGE", "The moments' frames, best first, at the video's size."),
         Out("moments", "STRING", "JSON list: time (s), frame (source index), group, score, tokens."),
         Out("evidence", AT_EVIDENCE, "The same list, typed, for chaining.")),
        output_node=True),
    NodeSpec(
        "AdaptToken_AskMany", "Ask Many Questions (AdaptToken)",
        "Answer a list of questions on one video in one run: the first question decodes and "
        "encodes the video, the others reuse its features and each group's prefix keys/values. "
        "Output: a table and JSON (answer, option probabilities, seconds, key moments).",
        (In("model", AT_MODEL, tooltip="The model from Load MLLM."),
         In("groups", AT_GROUPS, tooltip="The groups from Group Split (uniform uses their video)."),
         In("questions", "STRING", "", multiline=True,
            tooltip="One question per block, blocks separated by a blank line; the lines after a "
                    "question are its options (A. / B) letters optional); one line = open question."),
         In("method", "COMBO", "adapttoken", options=("adapttoken", "lite", "even_split", "uniform"),
            tooltip="adapttoken; lite (Early Stop at threshold 0.2); even_split (FlexSelect's equal "
                    "split); uniform (evenly spaced frames)."),
         BUDGET,
         In("max_new_tokens", "INT", 64, 1, 4096, 1, tooltip="Longest answer, in tokens.")),
        (Out("table", "STRING", "One line per question: id, answer, seconds."),
         Out("json", "STRING", "JSON list: question, options, answer, option_probs, seconds, evidence.")),
        output_node=True, hidden_unique_id=True),
)

BY_ID: dict[str, NodeSpec] = {s.id: s for s in SPECS}
