"""Shared fixtures: tiny random Qwen2.5-VL models of the real architecture, built offline."""
from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))


def load_deprecation_guard():
    """tests/deprecation_guard.py, loaded by its path (independent of sys.path and import mode)."""
    import importlib.util
    from pathlib import Path
    path = Path(__file__).with_name("deprecation_guard.py")
    spec = importlib.util.spec_from_file_location("adapttoken_tests_deprecation_guard", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def pytest_configure(config):
    # FutureWarning/DeprecationWarning raised through adapttoken/ or nodes/ fail the test
    config.pluginmanager.register(load_deprecation_guard(), "adapttoken-deprecation-guard")


@pytest.fixture(scope="session")
def tiny():
    """(model, processor) of a 4-layer random tiny Qwen2.5-VL (sdpa)."""
    from adapttoken.training.tiny import build_tiny_model
    return build_tiny_model(seed=0, layers=4, vision_depth=2)


@pytest.fixture(scope="session")
def tiny_adapter(tiny):
    from adapttoken.models.qwen2_5_vl import Qwen25VLAdapter
    model, proc = tiny
    return Qwen25VLAdapter(model, proc)


@pytest.fixture(scope="session")
def tiny_model(tiny_adapter):
    from adapttoken.models.loading import Model
    return Model(tiny_adapter, name="tiny")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory, tiny):
    """The tiny model saved as a local model folder (config.json + model.safetensors + tokenizer)."""
    from adapttoken.training.tiny import save_model_folder
    model, proc = tiny
    return save_model_folder(tmp_path_factory.mktemp("models") / "tiny-qwen25vl", model, proc)


@pytest.fixture(scope="session")
def peaky():
    """A 6-layer tiny model whose attention is sharp, so RoPE/GQA/mask mistakes in the probe show."""
    from adapttoken.models.qwen2_5_vl import Qwen25VLAdapter
    from adapttoken.training.tiny import build_tiny_model
    model, proc = build_tiny_model(seed=1, layers=6, vision_depth=2)
    with torch.no_grad():
        for layer in model.model.language_model.layers:
            layer.self_attn.q_proj.weight.mul_(25)
            layer.self_attn.k_proj.weight.mul_(25)
            layer.self_attn.q_proj.bias.normal_(0, 1)
            layer.self_attn.k_proj.bias.normal_(0, 1)
    return Qwen25VLAdapter(model, proc)
