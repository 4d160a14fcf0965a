"""quantization="gguf" end to end on a tiny GGUF file (tests/conftest.py: tiny_gguf, tiny_checkpoint("qwen2") with
Q4_1 projections and a Q8_0 tied embedding): the file reads back as the checkpoint it came from, tokenizer included;
the blocks handed to the kernels are exactly the weights the float32 path multiplies; the model built on them gives
logits close to float32's, the same for a row alone or in a batch; what the path cannot compute is refused by name."""
import subprocess
import sys

import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader
from torch import nn

from kernels import cpu_ops
from models.config import ModelConfig
from models.gguf_loader import gguf_quantized, gguf_to_hf_config, gguf_weights
from models.hf_loader import hf_config, hf_weights
from models.loading import load_model
from models.quantize import GGUFLinear
from text.tokenizer import Tokenizer
from tests.conftest import ROOT, TINY_VOCAB, write_tiny_gguf

_MISSING = cpu_ops.missing()
needs_kernels = pytest.mark.skipif(_MISSING is not None, reason=f"tokenmill's CPU kernels cannot be built: {_MISSING}")

TEXTS = ["The quick brown fox jumps over the lazy dog.", "<s>user: Hello, world! 12345</s>", "  two  spaces\n\n",
         "def f(x):\n    return x * 2\n", "Über naïve café — 東京 😀", "unseen words: zygote quixotic"]


def _reader(path) -> tuple[GGUFReader, dict]:
    reader = GGUFReader(path)
    return reader, gguf_to_hf_config(reader)


def _groups(w: torch.Tensor) -> torch.Tensor:
    return w.reshape(w.shape[0], -1, 32)


# ---- the file ----------------------------------------------------------------------------------------------------

def test_the_tiny_gguf_stores_the_checkpoint_in_llama_cpp_types_and_layout(tiny_gguf, tiny_checkpoint):
    reader, cfg = _reader(tiny_gguf)
    types = {t.name: t.tensor_type for t in reader.tensors}
    assert types.pop("token_embd.weight") == GGMLQuantizationType.Q8_0
    assert {kind for name, kind in types.items() if "norm" in name or name.endswith(".bias")} \
        == {GGMLQuantizationType.F32}
    assert {kind for name, kind in types.items() if "norm" not in name and name.endswith(".weight")} \
        == {GGMLQuantizationType.Q4_1}
    got, directory = ModelConfig.from_hf(cfg), ModelConfig.from_hf(hf_config(tiny_checkpoint("qwen2")))
    assert got.rms_norm_eps == pytest.approx(directory.rms_norm_eps)  # GGUF stores it as a float32
    same = {"rms_norm_eps": None, "torch_dtype": None}  # a GGUF file names no torch dtype
    assert {**vars(got), **same} == {**vars(directory), **same}
    # every matrix within about half a quantization step (d, m rounded to float16) of the checkpoint's: a
    # transposed square one would not be
    weights = gguf_weights(reader, cfg)
    for name, w in hf_weights(tiny_checkpoint("qwen2")).items():
        if w.dim() == 2:
            g = _groups(w)
            step = g.abs().amax(-1) / 127 if "embed" in name else (g.amax(-1) - g.amin(-1)) / 15
            error = (_groups(weights[name]) - g).abs().amax(-1)
            assert (error <= 0.6 * step + 1e-6).all(), (name, float((error / step).nan_to_num().max()))


def test_the_gguf_tokenizer_encodes_and_decodes_as_the_directorys(tiny_gguf, tiny_checkpoint):
    from_gguf, from_dir = Tokenizer.from_gguf(tiny_gguf), Tokenizer.from_dir(tiny_checkpoint("qwen2"))
    for text in TEXTS:
        ids = from_dir.encode(text)
        assert from_gguf.encode(text) == ids, text
        assert from_gguf.decode(ids, skip_special_tokens=False) == from_dir.decode(ids, skip_special_tokens=False)
    assert (from_gguf.bos_token_id, from_gguf.eos_token_id, from_gguf.add_bos_token) == (2, 1, False)
    assert from_gguf.special_token_ids == from_dir.special_token_ids == {0, 1, 2}
    chat = [{"role": "user", "content": "hi"}]
    assert from_gguf.apply_chat_template(chat) == from_dir.apply_chat_template(chat) == "<s>user: hi\n<s>assistant:"


def test_the_stored_blocks_dequantize_bit_for_bit_to_the_float_weights(tiny_gguf):
    reader, cfg = _reader(tiny_gguf)
    quantized, weights = gguf_quantized(reader, cfg), gguf_weights(reader, cfg)
    projections = {n for n in weights if n.endswith(".weight") and "norm" not in n} - {"model.embed_tokens.weight"}
    assert {n for n, w in quantized.items() if w.kind == "q4_1"} == projections and len(projections) == 14
    assert {n for n, w in quantized.items() if w.kind == "q8_0"} == {"model.embed_tokens.weight"}
    for name, w in quantized.items():
        d = w.d.float()[..., None]
        # as gguf dequantizes: each product, then each sum, rounded to float32
        dequantized = d * _groups(w.q.float()) + (w.m.float()[..., None] if w.kind == "q4_1" else 0)
        assert torch.equal(dequantized.reshape(w.q.shape), weights[name]), name


# ---- the model built on them --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_model(tiny_gguf):
    # quantize_gguf does not load the extension itself (the engine's cpu backend does it first): without this line
    # the fixture would pass or fail with the test order; the subprocess test below checks load_model on its own
    cpu_ops.load()
    return load_model(str(tiny_gguf), quantization="gguf").model


@needs_kernels
def test_every_projection_is_a_q4_1_kernel_and_the_tied_head_a_q8_0_one(gguf_model):
    projections = [m for m in gguf_model.layers.modules() if isinstance(m, (nn.Linear, GGUFLinear))]
    assert len(projections) == 2 * 4 and all(type(m) is GGUFLinear and m.kind == "q4_1" for m in projections)
    head = gguf_model.lm_head
    assert type(head) is GGUFLinear and head.kind == "q8_0" and (head.in_features, head.out_features) == (64, 512)
    assert all(m.self_attn.qkv_proj.bias is not None for m in gguf_model.layers)


@needs_kernels
def test_gguf_logits_are_close_to_float32_and_a_row_does_not_depend_on_the_batch(gguf_model, tiny_gguf):
    ids = torch.randint(3, TINY_VOCAB, (4, 24), generator=torch.Generator().manual_seed(0))
    full = load_model(str(tiny_gguf), dtype="float32").model
    with torch.inference_mode():
        expected, logits = full.causal_logits(ids), gguf_model.causal_logits(ids)
        alone = torch.cat([gguf_model.causal_logits(row[None]) for row in ids])
    # Rounding activations to int8 steps of max|x| / 127 per 32-block costs each matmul about 0.5% (relative L2;
    # down_proj, with heavier-tailed inputs, 0.85%); through 2 x 4 projections and the head that compounds to
    # 1.7% per position on average, 4.4% at most (measured over 3 x 8 x 64 positions; on these 4 x 24: 1.8%, 3.2%)
    error = (logits - expected).norm(dim=-1) / expected.norm(dim=-1)
    assert error.mean() < 0.025 and error.max() < 0.06, (error.mean(), error.max())
    assert (logits.argmax(-1) == expected.argmax(-1)).float().mean() > 0.9  # measured 0.95-0.99
    assert torch.equal(alone, logits)


@pytest.mark.slow
@needs_kernels
def test_greedy_generation_and_its_logprobs_are_the_same_alone_and_in_a_batch(tiny_gguf):
    from engine import LLM, SamplingParams
    prompts = [torch.randint(3, TINY_VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (1, 5, 17, 30, 40, 64)]
    # the top-5 logprobs of every step too: a random model's greedy tokens repeat, its logprobs do not
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=5)
    # no prefix cache: a prompt whose first block was cached by its run alone prefills its other tokens against the
    # cache, through another attention call that rounds differently (last-bit logprob differences, measured)
    llm = LLM(str(tiny_gguf), quantization="gguf", enforce_eager=True, num_kv_blocks=64, max_model_len=256,
              enable_prefix_caching=False)
    assert isinstance(llm.engine.runner.model.lm_head, GGUFLinear) and llm.engine.kv_dtype == torch.float16

    def steps(outputs) -> list[tuple[list[int], list[dict[int, float]]]]:
        return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outputs]

    alone = [steps(llm.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert steps(llm.generate(prompts, params, use_tqdm=False)) == alone
    assert all(len(tokens) == len(logprobs) == 16 for tokens, logprobs in alone)


@pytest.mark.slow
@needs_kernels
def test_load_model_builds_the_gguf_path_in_a_fresh_process(tiny_gguf):
    """Nothing else has loaded the kernels there: load_model must do it."""
    code = ("import sys; from models.loading import load_model; "
            "print(type(load_model(sys.argv[1], quantization='gguf').model.lm_head).__name__)")
    run = subprocess.run([sys.executable, "-c", code, str(tiny_gguf)], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "GGUFLinear", run.stderr[-2000:]


@needs_kernels
def test_the_kv_cache_is_float16_on_the_gguf_path_unless_asked(tiny_gguf, tiny_checkpoint):
    from engine import LLM
    from engine.config import EngineConfig
    kw = dict(quantization="gguf", enforce_eager=True, num_kv_blocks=8, max_model_len=128)
    assert LLM(str(tiny_gguf), **kw).engine.runner.k_cache.dtype == torch.float16  # as llama.cpp's cache
    assert LLM(str(tiny_gguf), kv_cache_dtype="float32", **kw).engine.runner.v_cache.dtype == torch.float32
    plain = LLM(str(tiny_checkpoint("qwen2")), dtype="float32", enforce_eager=True, num_kv_blocks=8, max_model_len=128)
    assert plain.engine.runner.k_cache.dtype == torch.float32
    with pytest.raises(ValueError, match="kv_cache_dtype='float16' with a float32 model and the 'torch' backend"):
        LLM(str(tiny_checkpoint("qwen2")), dtype="float32", attention_backend="torch", kv_cache_dtype="float16",
            num_kv_blocks=8)
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of auto, float32, float16"):
        EngineConfig(kv_cache_dtype="fp8")


# ---- what the path refuses ----------------------------------------------------------------------------------------

def test_gguf_quantization_of_a_directory_says_it_needs_a_gguf_file(tiny_checkpoint):
    with pytest.raises(ValueError, match="computes with a GGUF file's own blocks: give a .gguf file"):
        load_model(str(tiny_checkpoint("qwen2")), quantization="gguf")


@needs_kernels
def test_a_projection_stored_in_another_type_is_named(tiny_checkpoint, tmp_path):
    path = write_tiny_gguf(tiny_checkpoint("qwen2"), tmp_path / "f16-down.gguf", f16_tensor="blk.1.ffn_down.weight")
    assert {t.name: t.tensor_type for t in GGUFReader(path).tensors}["blk.1.ffn_down.weight"] \
        == GGMLQuantizationType.F16
    with pytest.raises(ValueError, match=r"Q4_1 and Q8_0 tensors only; the file stores model\.layers\.1\.mlp\.down_proj\.weight"):
        load_model(str(path), quantization="gguf")
