"""Quantized weights (bitsandbytes nf4 / int8, models/quant.py): the config handed to
from_pretrained, the errors, the CLI flag, and (where the installed bitsandbytes runs on the CPU)
the bundled model loaded quantized for real, selecting as the unquantized one does. The CUDA side:
tests/gpu/test_gpu_quant.py."""
from __future__ import annotations

import importlib.util
import subprocess
import sys

import pytest
import torch

import adapttoken as at
from adapttoken.defaults import BUNDLED_MODEL
from adapttoken.errors import InputError
from adapttoken.models import quant
from adapttoken.models.loading import LoadOptions

HAVE_BNB = importlib.util.find_spec("bitsandbytes") is not None and \
    importlib.util.find_spec("accelerate") is not None
CPU = torch.device("cpu")


def test_values_accepted_and_refused():
    assert quant.normalize(None) is None and quant.normalize("none") is None
    assert quant.normalize("") is None and quant.normalize("NF4") == "nf4"
    assert quant.normalize(" int8 ") == "int8"
    assert quant.normalize("FP8") == "fp8"
    with pytest.raises(InputError, match="none, nf4 .*int8.*fp8"):
        quant.normalize("fp4")
    with pytest.raises(InputError, match="quantization='4bit'"):
        LoadOptions(quantization="4bit").check()
    with pytest.raises(InputError, match="quantization='int4'"):
        at.load_model(BUNDLED_MODEL, device="cpu", quantization="int4")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs transformers")
def test_bitsandbytes_config():
    c = quant.bnb_config("nf4", torch.bfloat16)
    assert c.load_in_4bit and not c.load_in_8bit
    assert c.bnb_4bit_quant_type == "nf4" and c.bnb_4bit_compute_dtype == torch.bfloat16
    assert c.bnb_4bit_use_double_quant
    assert "model.visual" in c.llm_int8_skip_modules and "lm_head" in c.llm_int8_skip_modules
    c8 = quant.bnb_config("int8", torch.float16)
    assert c8.load_in_8bit and not c8.load_in_4bit
    assert list(c8.llm_int8_skip_modules) == list(quant.QUANT_SKIP_MODULES)


def test_skip_patterns_match_the_vision_towers_and_not_the_decoder():
    """transformers matches llm_int8_skip_modules from the start of a module's name (or as its
    suffix): the vision towers and projectors of every family, and lm_head, are kept."""
    from transformers.quantizers.quantizers_utils import should_convert_module
    skip = list(quant.QUANT_SKIP_MODULES)
    for kept in ("model.visual.blocks.0.attn.qkv", "model.visual.merger.mlp.0",
                 "model.vision_tower.encoder.layer.0.attention.q_proj",
                 "model.multi_modal_projector.linear_1", "lm_head"):
        assert not should_convert_module(kept, skip), kept
    for converted in ("model.language_model.layers.0.self_attn.q_proj",
                      "model.language_model.layers.27.mlp.down_proj"):
        assert should_convert_module(converted, skip), converted


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes/accelerate not installed")
def test_load_options_pass_the_config_and_place_the_model():
    o = LoadOptions(quantization="nf4")
    assert o.places_itself                      # load_pretrained never calls .to() on it
    kw = o.pretrained_kwargs(CPU, torch.float32)
    assert kw["device_map"] == {"": "cpu"}
    assert kw["quantization_config"].bnb_4bit_compute_dtype == torch.float32
    kw = LoadOptions(quantization="int8", device_map="auto").pretrained_kwargs(CPU, torch.float32)
    assert kw["device_map"] == "auto" and kw["quantization_config"].load_in_8bit


def test_missing_bitsandbytes_names_the_pip_command(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)        # import fails
    with pytest.raises(InputError, match=r'pip install "adapttoken\[quant\]"'):
        LoadOptions(quantization="nf4").pretrained_kwargs(CPU, torch.float32)
    with pytest.raises(InputError, match="bitsandbytes"):
        at.load_model(BUNDLED_MODEL, device="cpu", quantization="int8")


@pytest.mark.skipif(not HAVE_BNB, reason="bitsandbytes/accelerate not installed")
def test_device_errors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(InputError, match="no CUDA GPU"):
        quant.check_device("nf4", torch.device("cuda"))
    with pytest.raises(InputError, match="CUDA GPU or the CPU"):
        quant.check_device("nf4", torch.device("mps"))
    monkeypatch.setattr(quant, "_runs_on_cpu", lambda q: "NotImplementedError: no CPU kernel")
    with pytest.raises(InputError, match="cannot run it there .*no CPU kernel.*use a CUDA GPU"):
        quant.check_device("int8", CPU)


def test_quantization_and_tensor_parallel_exclude_each_other():
    class Layout:
        tp = 2
    with pytest.raises(InputError, match="tensor parallel"):
        LoadOptions(layout=Layout(), quantization="nf4").check()


def test_cli_flag(capsys):
    from adapttoken.cli import build_parser
    a = build_parser().parse_args(["ask", "v.mp4", "q?", "--quantization", "nf4"])
    assert a.quantization == "nf4"
    assert build_parser().parse_args(["ask", "v.mp4", "q?"]).quantization == "none"
    assert build_parser().parse_args(["ask", "v.mp4", "q?", "--quantization", "fp8"]).quantization == "fp8"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["ask", "v.mp4", "q?", "--quantization", "fp4"])
    from adapttoken.eval.command import run_parser
    assert run_parser().parse_args(["jsonl", "--data", "x.jsonl",
                                    "--quantization", "int8"]).quantization == "int8"


def test_cli_error_without_bitsandbytes(monkeypatch, capsys):
    from adapttoken.cli import main
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    rc = main(["ask", str(BUNDLED_MODEL.parent / "sample.mp4"), "What colour?", "--device", "cpu",
               "--quantization", "nf4", "--frames", "16"])
    err = capsys.readouterr().err
    assert rc == 2 and "bitsandbytes" in err and "pip install" in err and "Traceback" not in err


def test_bitsandbytes_is_optional():
    """Importing the library (and loading unquantized) never imports bitsandbytes."""
    code = ("import sys, adapttoken, adapttoken.models.quant, adapttoken.cli; "
            "print('bitsandbytes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    import tomllib
    from pathlib import Path
    project = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())["project"]
    assert not any(d.startswith("bitsandbytes") for d in project["dependencies"])
    assert any(d.startswith("bitsandbytes") for d in project["optional-dependencies"]["quant"])


# -- the real thing, on the CPU (recent bitsandbytes releases run 4-bit and 8-bit there) ---------

def _cpu_runs(q: str) -> bool:
    return HAVE_BNB and quant._runs_on_cpu(q) is None


@pytest.fixture(scope="module")
def reference():
    from adapttoken.demo import demo_config
    model = at.load_model(BUNDLED_MODEL, device="cpu")
    cfg = demo_config(512)
    res = at.ask(model, str(BUNDLED_MODEL.parent / "sample.mp4"),
                 "What colour was the object that appeared in the video?",
                 options=["red", "green", "blue", "yellow"], config=cfg)
    return cfg, res


@pytest.mark.parametrize("q", ["nf4", "int8"])
def test_bundled_model_quantized_on_the_cpu_selects_like_fp32(q, reference):
    if not _cpu_runs(q):
        pytest.skip(f"the installed bitsandbytes does not run {q} on the CPU")
    import bitsandbytes as bnb
    cfg, ref = reference
    model = at.load_model(BUNDLED_MODEL, device="cpu", quantization=q)
    hf = model.adapter.model
    layer = hf.model.language_model.layers[0]
    want = bnb.nn.Linear4bit if q == "nf4" else bnb.nn.Linear8bitLt
    assert isinstance(layer.mlp.down_proj, want) and isinstance(layer.self_attn.q_proj, want)
    assert type(hf.lm_head) is torch.nn.Linear                         # kept
    assert type(hf.model.visual.blocks[0].attn.qkv) is torch.nn.Linear  # vision tower kept
    assert quant.quantization_of(hf) == q
    assert model.adapter.dtype == torch.float32 and model.adapter.device == CPU
    res = at.ask(model, str(BUNDLED_MODEL.parent / "sample.mp4"),
                 "What colour was the object that appeared in the video?",
                 options=["red", "green", "blue", "yellow"], config=cfg)
    assert res.answer == ref.answer
    a = {(t["slice"], t["row"], t["col"]) for t in ref.kept_tokens}
    b = {(t["slice"], t["row"], t["col"]) for t in res.kept_tokens}
    assert len(a & b) >= 0.9 * len(a), (len(a & b), len(a))
    for g0, g1 in zip(ref.groups, res.groups):
        if g0.entropy is not None and g1.entropy is not None:
            assert abs(g0.entropy_norm - g1.entropy_norm) <= 0.05, (g0.group, g0.entropy_norm,
                                                                    g1.entropy_norm)


def test_random_quantized_build_draws_one_weight_at_a_time():
    """bench's quantized random model (quant.random_quantized): transformers' quantizing load over
    weights drawn as it reads them. Every weight is drawn once and at most a couple are alive at
    a time (the 72B model is never whole in bf16); the decoder's linears come out quantized, the
    rest as drawn (norms ones, biases zeros); a seed gives the same weights, another seed others."""
    if not _cpu_runs("nf4"):
        pytest.skip("the installed bitsandbytes does not run nf4 on the CPU")
    import bitsandbytes as bnb
    import bitsandbytes.functional as F
    from transformers import Qwen2_5_VLForConditionalGeneration as C

    from adapttoken.bench.gpu_measure import TINY_TEXT, TINY_VISION, build_config
    from adapttoken.training.tiny import build_tokenizer
    cfg = build_config(build_tokenizer(), TINY_TEXT, TINY_VISION)
    n_keys = len(C(cfg).state_dict())

    def up(m):
        w = m.model.language_model.layers[1].mlp.up_proj.weight
        return F.dequantize_4bit(w.data, w.quant_state).float()

    m, drawn = quant.random_quantized(C, cfg, "nf4", torch.bfloat16, CPU, seed=3)
    assert drawn.drawn == len(drawn) == n_keys
    assert drawn.peak_live <= 3, drawn.peak_live
    layer = m.model.language_model.layers[1]
    assert isinstance(layer.mlp.up_proj, bnb.nn.Linear4bit) and isinstance(layer.self_attn.k_proj,
                                                                           bnb.nn.Linear4bit)
    assert quant.quantization_of(m) == "nf4" and type(m.lm_head) is torch.nn.Linear
    w = up(m)
    assert abs(w.std().item() - cfg.text_config.initializer_range) < 0.005
    assert torch.equal(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not layer.self_attn.q_proj.bias.any()
    assert torch.equal(w, up(quant.random_quantized(C, cfg, "nf4", torch.bfloat16, CPU, seed=3)[0]))
    assert not torch.equal(w, up(quant.random_quantized(C, cfg, "nf4", torch.bfloat16, CPU, seed=4)[0]))
    # the model runs: a text forward gives finite logits
    out = m(input_ids=torch.tensor([[1, 2, 3, 4]]))
    assert torch.isfinite(out.logits.float()).all()


def test_one_list_of_choices_everywhere(capsys):
    """The CLI commands, the benchmarks and Load MLLM offer the same quantizations, in the same
    order (the node's list is a promise to saved workflows: values are only ever appended)."""
    from pathlib import Path

    from adapttoken.cli import build_parser
    from adapttoken.defaults import QUANTIZATION_CHOICES
    from adapttoken.eval.command import run_parser
    assert quant.CHOICES == QUANTIZATION_CHOICES
    for parser, argv in ((build_parser(), ["ask", "v.mp4", "q?"]),
                         (run_parser(), ["jsonl", "--data", "x.jsonl"])):
        for q in QUANTIZATION_CHOICES:
            assert parser.parse_args(argv + ["--quantization", q]).quantization == q
    root = Path(__file__).resolve().parents[1]
    from adapttoken.bench import gpu, synthetic
    for main in (gpu.main, synthetic.main):          # their parsers live inside main()
        with pytest.raises(SystemExit) as e:
            main(["--quantization", "fp4"])          # refused by argparse, before any work
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert "choose from " + ", ".join(repr(q) for q in QUANTIZATION_CHOICES) in err, err
    sys.path.insert(0, str(root))
    from nodes import spec
    assert tuple(spec.BY_ID["AdaptToken_LoadMLLM"].input("quantization").options) == QUANTIZATION_CHOICES
