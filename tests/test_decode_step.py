"""The static decode step (engine/decode_step.py): compiled on CPU, it gives the tokens of the eager step, and
one graph serves every batch size. (CUDA graphs are checked on a GPU by benchmarks/gpu_check.sh.)"""
import os
import subprocess
import sys

import pytest
import torch

from engine import LLM, SamplingParams
from engine.decode_step import DecodeBuffers, graph_buckets
from kernels import cpu_ops
from tests.conftest import TINY_VOCAB

pytestmark = pytest.mark.skipif(cpu_ops.missing() is not None, reason=f"no CPU kernels: {cpu_ops.missing()}")
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)


def _prompts(count: int = 7) -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in (3, 9, 16, 17, 30, 41, 64)[:count]]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


@pytest.mark.parametrize("max_num_seqs", [1, 3, 8, 17, 256])
def test_graph_buckets_cover_every_batch_size_with_few_graphs(max_num_seqs):
    buckets = graph_buckets(max_num_seqs)
    assert buckets == sorted(set(buckets)) and buckets[0] == 1 and buckets[-1] == max_num_seqs
    assert all(any(b >= n for b in buckets) for n in range(1, max_num_seqs + 1))
    assert len(buckets) <= 4 + max_num_seqs // 16 + 1


def test_padded_rows_write_no_slot_and_read_no_context():
    buffers = DecodeBuffers.allocate(8, 4, 16, torch.float32, torch.device("cpu"))
    assert (buffers.slot_mapping == -1).all() and (buffers.context_lens == 0).all()


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_compiled_step_gives_the_eager_tokens_alone_and_batched(tiny_checkpoint, arch):
    model = str(tiny_checkpoint(arch))
    kw = dict(dtype="float32", num_kv_blocks=64, max_model_len=160)
    eager = LLM(model, enforce_eager=True, **kw)
    compiled = LLM(model, **kw)
    assert eager.engine.runner.decode_step is None
    assert compiled.engine.runner.decode_step is not None
    prompts = _prompts()
    want = [_tokens(eager.generate([p], PARAMS, use_tqdm=False))[0] for p in prompts]
    assert _tokens(eager.generate(prompts, PARAMS, use_tqdm=False)) == want
    assert [_tokens(compiled.generate([p], PARAMS, use_tqdm=False))[0] for p in prompts] == want
    assert _tokens(compiled.generate(prompts, PARAMS, use_tqdm=False)) == want


def test_one_compiled_graph_serves_every_batch_size(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64, max_model_len=160)
    step = llm.engine.runner.decode_step
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for count in (2, 3, 5, 7):  # warm-up compiled one row and "many"; none of these compiles again
        llm.generate(_prompts(count), PARAMS, use_tqdm=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    assert step.buffers.input_ids.shape[0] == llm.engine.config.max_num_seqs


def test_compiled_code_is_kept_under_tokenmills_cache_dir(tmp_path):
    # in a fresh process: inductor fixes its directory the first time it is asked, and building the CPU kernels asks
    code = ("import kernels, torch._inductor.runtime.cache_dir_utils as c; from kernels import cpu_ops; "
            "cpu_ops.load(); print(c.cache_dir())")
    env = {**os.environ, "TOKENMILL_CACHE_DIR": str(tmp_path), "TOKENMILL_EXT_DIR": str(cpu_ops.build_dir().parent)}
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(tmp_path / "inductor")
