"""The pack's ComfyExtension and its one-time set-up (model folder, sample video)."""
from __future__ import annotations

import logging
import os
import shutil

from .comfy_api_compat import ComfyExtension, io

import folder_paths

from .spec import SAMPLE_VIDEO_NAME

log = logging.getLogger("adapttoken")
SAMPLE_VIDEO = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                            "adapttoken", "assets", "sample.mp4")


def setup() -> None:
    """Register models/LLM (the community folder for VLM weights) and put the bundled sample video
    into the input folder when it is not there yet. Cheap, local, no network."""
    folder_paths.add_model_folder_path("LLM", os.path.join(folder_paths.models_dir, "LLM"))
    target = os.path.join(folder_paths.get_input_directory(), SAMPLE_VIDEO_NAME)
    if os.path.isfile(SAMPLE_VIDEO) and not os.path.exists(target):
        try:
            os.makedirs(os.path.dirname(target), exist_ok=True)
            shutil.copyfile(SAMPLE_VIDEO, target)
        except OSError as e:
            log.warning("AdaptToken: could not copy the sample video to %s: %s", target, e)


class AdaptTokenExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        from .answer import AskMany, MLLMAnswer
        from .method import (AttentionRank, BudgetAllocate, EarlyStop, EntropyScore, GroupSplit,
                             UniformFrames)
        from .model import LoadMLLM
        from .preview import KeyMoments, SelectionPreview
        from .video import LoadVideo
        return [LoadMLLM, LoadVideo, GroupSplit, AttentionRank, EntropyScore, EarlyStop,
                BudgetAllocate, UniformFrames, MLLMAnswer, SelectionPreview, KeyMoments, AskMany]
