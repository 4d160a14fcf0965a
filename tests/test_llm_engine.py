"""Engine behaviour: preemption under a tight KV pool, bad input, abort, n > 1, finish reasons."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import TINY_VOCAB


def _prompts(count: int, seed: int = 2) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, TINY_VOCAB, (int(n),), generator=g).tolist()
            for n in torch.randint(10, 40, (count,), generator=g)]


@pytest.fixture(scope="module")
def tiny_llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=128, max_model_len=256)


def _all_blocks_free(llm: LLM) -> bool:
    bm = llm.engine.block_manager
    return bm.num_free_blocks == bm.num_blocks and sorted(bm.free_blocks) == list(range(bm.num_blocks))


def test_tight_kv_pool_preempts_and_still_gives_the_right_tokens(tiny_checkpoint, tiny_llm):
    prompts = _prompts(8)
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    # room for two full sequences (at most 40 + 48 tokens = 6 blocks each) and no more
    tight = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=12, max_model_len=192)
    outputs = tight.generate(prompts, params, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outputs] == expected
    assert all(o.outputs[0].finish_reason == "length" for o in outputs)
    assert tight.engine.num_preemptions > 0
    assert sum(o.num_preemptions for o in outputs) == tight.engine.num_preemptions
    assert _all_blocks_free(tight)
    assert not tight.engine.has_unfinished_requests()


def test_prompt_longer_than_max_model_len_is_rejected_and_engine_stays_usable(tiny_llm):
    good = _prompts(2)
    with pytest.raises(ValueError, match="max_model_len"):
        tiny_llm.generate(good + [[5] * 300], SamplingParams(max_tokens=4), use_tqdm=False)
    assert _all_blocks_free(tiny_llm) and not tiny_llm.engine.has_unfinished_requests()
    outputs = tiny_llm.generate(good, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert [len(o.outputs[0].token_ids) for o in outputs] == [4, 4]


@pytest.mark.parametrize("prompt, match", [([], "empty"), ([TINY_VOCAB + 5], "token ids"), ("", "empty")])
def test_bad_prompts_get_clear_errors(tiny_llm, prompt, match):
    with pytest.raises(ValueError, match=match):
        tiny_llm.generate([prompt], SamplingParams(max_tokens=2), use_tqdm=False)
    assert _all_blocks_free(tiny_llm)


def test_token_ids_outside_the_vocabulary_in_params_are_rejected(tiny_llm):
    with pytest.raises(ValueError, match="logit_bias"):
        tiny_llm.generate([[5, 6]], SamplingParams(logit_bias={TINY_VOCAB: 1.0}), use_tqdm=False)
    with pytest.raises(ValueError, match="stop_token_ids"):
        tiny_llm.generate([[5, 6]], SamplingParams(stop_token_ids=[10**6]), use_tqdm=False)


def test_mismatched_params_list_is_rejected(tiny_llm):
    with pytest.raises(ValueError, match="SamplingParams"):
        tiny_llm.generate([[5], [6]], [SamplingParams()], use_tqdm=False)


def test_abort_returns_blocks_and_leaves_other_requests_running(tiny_llm):
    engine = tiny_llm.engine
    params = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True)
    engine.add_request("keep", _prompts(1)[0], params)
    engine.add_request("drop", _prompts(1, seed=3)[0], params)
    engine.step()  # prefill both
    engine.abort_request("drop")
    finished = []
    while engine.has_unfinished_requests():
        finished += [o for o in engine.step() if o.finished]
    assert [o.request_id for o in finished] == ["keep"]
    assert len(finished[0].outputs[0].token_ids) == 20
    assert _all_blocks_free(tiny_llm)


def test_n_completions_with_a_seed_are_distinct_and_reproducible(tiny_llm):
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True)
    first = tiny_llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    again = tiny_llm.generate([[5, 6, 7]], params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3


def test_stop_token_id_ends_with_stop_reason(tiny_llm):
    prompt = _prompts(1)[0]
    free = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    stopper = free.token_ids[3]
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True,
                                                     stop_token_ids=[stopper]), use_tqdm=False)[0].outputs[0]
    first = free.token_ids.index(stopper)
    assert out.token_ids == free.token_ids[:first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stopper


def test_generation_stops_at_max_model_len(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=8, max_model_len=32)
    out = llm.generate([[5] * 30], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 2 and out.outputs[0].finish_reason == "length"


def test_max_model_len_beyond_kv_capacity_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="KV cache capacity"):
        LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=2, max_model_len=64)


def test_seeded_request_gives_the_same_tokens_alone_and_in_a_mixed_batch(tiny_llm):
    prompt = _prompts(1, seed=5)[0]
    seeded = SamplingParams(temperature=0.9, top_p=0.95, seed=1234, max_tokens=24, ignore_eos=True)
    alone = tiny_llm.generate([prompt], seeded, use_tqdm=False)[0].outputs[0].token_ids
    others = [SamplingParams(temperature=1.0, max_tokens=30, ignore_eos=True),
              SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
              SamplingParams(temperature=0.7, top_k=5, seed=9, max_tokens=16, ignore_eos=True)]
    batch = tiny_llm.generate(_prompts(3, seed=6) + [prompt], others + [seeded], use_tqdm=False)
    assert batch[-1].outputs[0].token_ids == alone


def test_stop_string_spanning_tokens_ends_generation_and_is_not_in_the_text(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    prompt = _prompts(1, seed=7)[0]
    free = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True),
                             use_tqdm=False)[0].outputs[0]
    # a stop string made of the end of token 5 and the start of token 6
    left, right = tok.decode(free.token_ids[5:6]), tok.decode(free.token_ids[6:7])
    assert left and right
    stop = left[-1] + right[0]
    cut = free.text.index(stop)
    out = tiny_llm.generate([prompt], SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, stop=[stop]),
                            use_tqdm=False)[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == free.text[:cut] and stop not in out.text
    assert out.token_ids == free.token_ids[:len(out.token_ids)]


def test_logprobs_come_back_for_every_generated_token(tiny_llm):
    out = tiny_llm.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True),
                            use_tqdm=False)[0].outputs[0]
    assert len(out.logprobs) == 5
    for token, entry in zip(out.token_ids, out.logprobs):
        assert token in entry and 3 <= len(entry) <= 4
        assert entry[token] == max(entry.values())  # greedy picks the most likely token


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_dtypes_generate_close_to_float32(tiny_checkpoint, tiny_llm, dtype):
    prompts = _prompts(3, seed=8)
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    reference = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    llm = LLM(str(tiny_checkpoint("llama")), dtype=dtype, num_kv_blocks=32)
    assert llm.engine.runner.k_cache.dtype == getattr(torch, dtype)
    outputs = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    # rounding may flip a near-tie late in a sequence, but the first tokens must agree
    assert [o[:2] for o in outputs] == [r[:2] for r in reference]


def _run_to_end(engine) -> dict:
    final = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                final[out.request_id] = out
    return final


@pytest.mark.parametrize("where", ["model", "detokenizer"])
def test_a_request_that_raises_fails_alone(tiny_llm, monkeypatch, where):
    engine = tiny_llm.engine
    prompts = _prompts(4, seed=7)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    expected = [o.outputs[0].token_ids for o in tiny_llm.generate(prompts, params, use_tqdm=False)]
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, params)
    if where == "model":  # any batch holding r2 fails, as a bad input to a kernel would
        real_run = engine.runner.run

        def run(seqs, is_prefill):
            if any(s.request_id == "r2" for s in seqs):
                raise RuntimeError("boom in the model")
            return real_run(seqs, is_prefill)
        monkeypatch.setattr(engine.runner, "run", run)
    else:
        def add(token):
            raise UnicodeError("boom in the detokenizer")
        monkeypatch.setattr(engine.requests["r2"].detokenizers[0], "add", add)
    final = _run_to_end(engine)
    assert final["r2"].error and "boom" in final["r2"].error and final["r2"].outputs[0].finish_reason == "error"
    for i in (0, 1, 3):
        assert final[f"r{i}"].error is None and final[f"r{i}"].outputs[0].token_ids == expected[i]
    assert _all_blocks_free(tiny_llm)
    monkeypatch.undo()
    assert tiny_llm.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids == expected[0]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_triton_backend_gives_the_same_greedy_tokens(tiny_checkpoint, arch):
    """The whole model on the Triton kernels (the interpreter on CPU) against the torch reference kernels."""
    pytest.importorskip("triton")
    prompts = _prompts(3, seed=11)
    prompts = [p[:n] for p, n in zip(prompts, (5, 12, 19))]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    outputs = {}
    for backend in ("torch", "triton"):
        llm = LLM(str(tiny_checkpoint(arch)), dtype="float32", num_kv_blocks=16, max_model_len=64,
                  attention_backend=backend)
        assert llm.engine.runner.backend.name == backend
        outputs[backend] = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    assert outputs["triton"] == outputs["torch"]


def test_unknown_attention_backend_is_rejected(tiny_checkpoint):
    with pytest.raises(ValueError, match="attention_backend"):
        LLM(str(tiny_checkpoint("llama")), attention_backend="cuda-magic")


def test_abort_in_the_middle_of_a_chunked_prefill_frees_every_block(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64, max_model_len=256,
              max_num_batched_tokens=16)
    engine = llm.engine
    long_prompt, short_prompt = _prompts(2, seed=13)
    engine.add_request("long", long_prompt * 4, SamplingParams(max_tokens=4))  # 40-160 tokens: several chunks
    engine.add_request("short", short_prompt, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    engine.step()
    assert engine.scheduler.prefilling  # a prompt is under way
    engine.abort_request("long")
    final = _run_to_end(engine)
    assert set(final) == {"short"} and len(final["short"].outputs[0].token_ids) == 8
    assert _all_blocks_free(llm)
    assert engine.kv_cache_usage == 0


def test_update_weights_in_place_changes_the_answers_and_drops_the_prefix_cache(tiny_checkpoint):
    from models.loading import load_model
    path = str(tiny_checkpoint("llama"))
    llm = LLM(path, dtype="float32", num_kv_blocks=64, max_model_len=128)
    prompt = _prompts(1, seed=5)[0]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    before = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    assert llm.engine.block_manager.cached  # the prompt's full blocks stay cached
    policy = load_model(path, "float32").model
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    llm.engine.update_weights(policy.hf_state_dict())
    assert not llm.engine.block_manager.cached  # computed with the old weights: forgotten
    after = llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids
    expected, ids = [], list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(policy.causal_logits(torch.tensor([ids]))[0, -1].argmax()))
            expected.append(ids[-1])
    assert after == expected and after != before
    with pytest.raises(ValueError, match="lacks weights"):
        llm.engine.update_weights({k: v * 0 for k, v in policy.hf_state_dict().items() if "layers.0." not in k})
    assert llm.generate([prompt], params, use_tqdm=False)[0].outputs[0].token_ids == expected  # nothing copied
    llm.engine.add_request("running", prompt, params)
    with pytest.raises(RuntimeError, match="while requests run"):
        llm.engine.update_weights(policy.hf_state_dict())
    llm.engine.abort_request("running")


def test_prompt_logprobs_do_not_depend_on_batch_cache_or_max_tokens_zero(tiny_llm):
    """Prompt logprobs from a cold prompt alone, from a batch where the same prompt's blocks are already cached,
    and with max_tokens 0 (prompt only: no token, blocks back in the pool) are the same numbers."""
    prompts = _prompts(4, seed=5)
    alone = tiny_llm.generate([prompts[0]], SamplingParams(temperature=0, max_tokens=2, prompt_logprobs=2),
                              use_tqdm=False)[0]
    assert alone.prompt_logprobs[0] is None and len(alone.prompt_logprobs) == len(prompts[0])
    assert all(len(e) in (2, 3) and prompts[0][p] in e for p, e in enumerate(alone.prompt_logprobs) if p)
    batch = tiny_llm.generate(prompts, SamplingParams(temperature=0, max_tokens=0, prompt_logprobs=2, n=2),
                              use_tqdm=False)
    scored = batch[0]
    assert [o.token_ids for o in scored.outputs] == [[], []] and scored.outputs[0].finish_reason == "length"
    for want, got in zip(alone.prompt_logprobs[1:], scored.prompt_logprobs[1:]):
        assert want.keys() == got.keys() and all(abs(want[k] - got[k]) < 1e-5 for k in want)
    assert _all_blocks_free(tiny_llm)
