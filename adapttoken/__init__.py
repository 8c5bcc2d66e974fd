"""AdaptToken: entropy-based adaptive token selection for long-video QA with multimodal LLMs.

Implements arXiv 2603.28696 on transformers' model classes. Imports nothing from ComfyUI.

    from adapttoken import load_model, ask
    model = load_model("models/LLM/Qwen2.5-VL-7B-Instruct")
    result = ask(model, "video.mp4", "What happens?", options=["a", "b", "c", "d"])
"""
from .budget import Selection, allocate, even_split, uniform_frames
from .decode import VideoHandle, open_video
from .entropy import ScoredGroups, StopRule, early_stop, response_entropy, score_groups
from .errors import AdaptTokenError, Cancelled, InputError, ModelLoadError, OutOfMemory, VideoError
from .features import SliceFeatures
from .evidence import key_moments
from .groups import Groups, split_groups
from .models.loading import Model, detect_family, download_model, load_model, supported_families
from .pipeline import AdaptTokenConfig, Result, answer, ask, ask_many, prepare, select
from .question import Hooks, Question
from .rank import RankedGroups

__version__ = "0.1.0"

__all__ = [
    "AdaptTokenConfig", "AdaptTokenError", "Cancelled", "Groups", "Hooks", "InputError", "Model",
    "ModelLoadError", "OutOfMemory", "Question", "RankedGroups", "Result", "ScoredGroups", "Selection",
    "SliceFeatures", "StopRule", "VideoError", "VideoHandle", "allocate", "answer", "ask",
    "detect_family", "download_model", "early_stop", "even_split", "load_model", "open_video",
    "response_entropy", "ask_many", "prepare", "key_moments", "score_groups", "select", "split_groups", "supported_families",
    "uniform_frames",
]
