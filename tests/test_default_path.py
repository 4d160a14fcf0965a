"""With the settings a user gets by default (dtype="auto": the path measured fastest among the batch-invariant ones;
the compiled decode step), the default model's greedy chat answers are identical alone and batched, to the last
bit of their logprobs, and equal to those of --enforce-eager."""
import pytest

from engine import LLM, SamplingParams
from engine.path_choice import PATHS

QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "Write a haiku about the sea.",
             "How do I reverse a list in Python?", "Why is the sky blue?", "What is 17 times 23?",
             "Give me three tips for better sleep.", "Explain recursion to a child."]
# the settings of the shared server fixture (tests/conftest.py)
SETTINGS = dict(max_model_len=2048, kv_cache_memory="512MiB")


def _answers(llm: LLM, conversations, params) -> list[tuple[list[int], list]]:
    outs = llm.chat(conversations, params, use_tqdm=False)
    return [(o.outputs[0].token_ids, o.outputs[0].logprobs) for o in outs]


@pytest.mark.slow
def test_default_settings_are_batch_invariant_and_equal_to_eager(smollm_gguf):
    conversations = [[{"role": "user", "content": q}] for q in QUESTIONS]
    params = SamplingParams(temperature=0, max_tokens=32, ignore_eos=True, logprobs=2)
    llm = LLM("default", **SETTINGS)
    assert llm.engine.path in PATHS and llm.engine.runner.decode_step is not None
    alone = [_answers(llm, [c], params)[0] for c in conversations]
    assert all(len(tokens) == 32 for tokens, _ in alone)
    assert _answers(llm, conversations, params) == alone
    assert _answers(llm, conversations[::-1], params) == alone[::-1]
    del llm
    eager = LLM("default", enforce_eager=True, **SETTINGS)
    assert eager.engine.runner.decode_step is None
    assert _answers(eager, conversations, params) == alone
