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
