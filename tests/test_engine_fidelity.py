"""Greedy outputs never change with how a request is served: 16 prompts with shared prefixes, run (a) one at a
time, (b) all together, (c) with the prefix cache warm, (d) in tiny prefill chunks, (e) under a KV budget that
forces preemption, (f) on the Triton kernels, (g) as 32 sequences with n = 2 -- the same tokens every time, in
float32 on CPU."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import TINY_VOCAB

PARAMS = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)


def shared_prefix_prompts(vocab: int, seed: int = 5) -> list[list[int]]:
    """4 prefixes (20-64 tokens, block-aligned or not) x 4 suffixes (1-30 tokens)."""
    g = torch.Generator().manual_seed(seed)
    prefixes = [torch.randint(3, vocab, (n,), generator=g).tolist() for n in (40, 37, 20, 64)]
    return [prefix + torch.randint(3, vocab, (n,), generator=g).tolist()
            for prefix in prefixes for n in (1, 5, 17, 30)]


def _tokens(outputs) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def _llm(model: str, **kw) -> LLM:
    kw.setdefault("num_kv_blocks", 128)
    return LLM(model, dtype="float32", max_model_len=160, **kw)


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_tokens_identical_however_requests_are_served(tiny_checkpoint, arch):
    model = str(tiny_checkpoint(arch))
    prompts = shared_prefix_prompts(TINY_VOCAB)
    plain = _llm(model, enable_prefix_caching=False, enforce_eager=True)
    alone = [_tokens(plain.generate([p], PARAMS, use_tqdm=False))[0] for p in prompts]
    assert _tokens(plain.generate(prompts, PARAMS, use_tqdm=False)) == alone  # (b) together

    cached = _llm(model)
    assert _tokens(cached.generate(prompts, PARAMS, use_tqdm=False)) == alone  # cold: siblings share within it
    hits = cached.engine.block_manager.prefix_hits
    assert _tokens(cached.generate(prompts, PARAMS, use_tqdm=False)) == alone  # (c) warm
    assert cached.engine.block_manager.prefix_hits - hits >= sum(len(p) // 16 - 1 for p in prompts)

    # eager but for `cached`: the compiled step equals the eager one (test_decode_step.py), and each engine would
    # compile it again
    chunked = _llm(model, max_num_batched_tokens=5, enforce_eager=True)  # (d) chunks of 5, across block boundaries
    assert _tokens(chunked.generate(prompts, PARAMS, use_tqdm=False)) == alone

    tight = _llm(model, num_kv_blocks=14, enforce_eager=True)  # (e) room for two long sequences at a time
    assert _tokens(tight.generate(prompts, PARAMS, use_tqdm=False)) == alone
    assert tight.engine.num_preemptions > 0
    bm = tight.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks

    # (g) 32 sequences at once (n = 2): CPU decode attention then gathers K/V in groups of similar lengths
    two = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, n=2)
    outs = cached.generate(prompts, two, use_tqdm=False)
    assert [[c.token_ids for c in o.outputs] for o in outs] == [[a, a] for a in alone]

    pytest.importorskip("triton")  # (f) the Triton kernels (the interpreter on CPU), prefix cache and chunks on
    triton = _llm(model, attention_backend="triton", max_num_batched_tokens=24)
    some = [0, 1, 4, 6]  # two pairs that share a prefix
    assert _tokens(triton.generate([prompts[i] for i in some], PARAMS, use_tqdm=False)) == [alone[i] for i in some]


@pytest.mark.slow
def test_default_model_fidelity_with_a_shared_system_prompt(smollm_gguf):
    system = {"role": "system", "content": "You are a careful assistant. " * 20}
    questions = ["What is the capital of France?", "Name a prime number.", "What colour is the sky?",
                 "Say hello in Spanish."]
    conversations = [[system, {"role": "user", "content": q}] for q in questions]
    params = SamplingParams(temperature=0, max_tokens=12)
    runs = {}
    for name, kw in {"plain": dict(enable_prefix_caching=False), "cached": {},
                     "chunked": dict(max_num_batched_tokens=48)}.items():
        # eager: compiling the 30-layer float32 step costs two minutes on 2 cores; the compiled float32 step is
        # checked on the tiny models above, the default model's default path in test_default_path.py
        llm = LLM(str(smollm_gguf), dtype="float32", max_model_len=1024, kv_cache_memory="256MiB", enforce_eager=True,
                  **kw)
        if name == "cached":
            llm.chat(conversations[:1], params, use_tqdm=False)  # warm the system prompt's blocks
        runs[name] = _tokens(llm.chat(conversations, params, use_tqdm=False))
        if name == "cached":
            assert llm.engine.block_manager.prefix_hits >= 4 * 128  # the system prompt: ~140 tokens
    assert runs["plain"] == runs["cached"] == runs["chunked"]


def _with_logprobs(outputs) -> list[list[tuple[int, dict]]]:
    return [[(t, lp) for t, lp in zip(c.token_ids, c.logprobs)] for o in outputs for c in o.outputs]


def test_the_cpu_gguf_path_is_bit_exact_however_requests_are_served(tiny_gguf):
    """The CPU path a Q4_1 GGUF runs by default (tokenmill's C++ kernels, compiled decode step): one computation per
    token, so every way of serving gives the same tokens and the same logprobs to the last bit -- (a)-(e) as
    above, (g) n = 2, and the eager step. Its int8 activations would turn any last-bit difference upstream into a
    different rounding, so this is what keeps them from ever changing."""
    from kernels import cpu_ops
    if cpu_ops.missing():
        pytest.skip(f"no CPU kernels: {cpu_ops.missing()}")
    prompts = shared_prefix_prompts(TINY_VOCAB)
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3)

    def llm(**kw):
        kw.setdefault("num_kv_blocks", 128)
        return LLM(str(tiny_gguf), quantization="gguf", max_model_len=160, **kw)

    plain = llm(enable_prefix_caching=False, enforce_eager=True)
    assert plain.engine.runner.backend.name == "cpu"
    alone = [_with_logprobs(plain.generate([p], params, use_tqdm=False))[0] for p in prompts]
    assert _with_logprobs(plain.generate(prompts, params, use_tqdm=False)) == alone  # (b)

    cached = llm()  # compiled decode step, prefix caching on
    assert cached.engine.runner.decode_step is not None
    assert _with_logprobs(cached.generate(prompts, params, use_tqdm=False)) == alone
    hits = cached.engine.block_manager.prefix_hits
    assert _with_logprobs(cached.generate(prompts, params, use_tqdm=False)) == alone  # (c) warm
    assert cached.engine.block_manager.prefix_hits > hits
    two = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=3, n=2)  # (g)
    assert _with_logprobs(cached.generate(prompts, two, use_tqdm=False)) == [a for a in alone for _ in range(2)]

    chunked = llm(max_num_batched_tokens=5)  # (d)
    assert _with_logprobs(chunked.generate(prompts, params, use_tqdm=False)) == alone
    tight = llm(num_kv_blocks=14)  # (e) preemption: decoded tokens are computed again in a prefill
    assert _with_logprobs(tight.generate(prompts, params, use_tqdm=False)) == alone
    assert tight.engine.num_preemptions > 0
