"""The decoder is token-exact with transformers (float32 greedy) on the same weights."""
import pytest
import torch

from engine import LLM, SamplingParams
from tests.conftest import TINY_ARCHS, TINY_VOCAB

MAX_TOKENS = 48


def _tiny_prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, TINY_VOCAB, (n,), generator=g).tolist() for n in (5, 17, 40, 83)]


def _hf_greedy(hf, prompt: list[int]) -> list[int]:
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=MAX_TOKENS, do_sample=False)
    return out[0, len(prompt):].tolist()


def _explain_mismatch(hf, prompt: list[int], ours: list[int], theirs: list[int]) -> str:
    """Where the two first differ, and transformers' top-2 logit margin there (below ~1e-4 is a numerical tie)."""
    step = next(i for i, (a, b) in enumerate(zip(ours + [-1], theirs + [-1])) if a != b)
    with torch.no_grad():
        logits = hf(torch.tensor([prompt + theirs[:step]])).logits[0, -1]
    top = logits.topk(2).values
    return f"first difference at generated token {step}: ours {ours[step:step + 3]}, transformers " \
           f"{theirs[step:step + 3]}, transformers' top-2 margin there {float(top[0] - top[1]):.2e}"


def _check_exact(hf, prompts, outputs):
    for prompt, out in zip(prompts, outputs):
        expected = _hf_greedy(hf, prompt)
        ours = out.outputs[0].token_ids
        assert ours == expected, _explain_mismatch(hf, prompt, ours, expected)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_greedy_generation_is_token_identical_to_transformers(arch, tiny_checkpoint):
    import transformers
    directory = tiny_checkpoint(arch)
    hf = transformers.AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    prompts = _tiny_prompts()
    llm = LLM(str(directory), dtype="float32", num_kv_blocks=64)
    outputs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    _check_exact(hf, prompts, outputs)


@pytest.fixture(scope="module")
def smollm_pair(smollm_gguf):
    """(our LLM, transformers' model) both loaded from the default SmolLM2 GGUF, float32."""
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        smollm_gguf.parent, gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
    # eager: the compiled float32 step is checked token for token on the tiny models; compiling it for 30 layers
    # would add two minutes to the suite
    llm = LLM("default", dtype="float32", kv_cache_memory="256MiB", enforce_eager=True)
    return llm, hf


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Hi"}],
    [{"role": "system", "content": "You are a terse assistant."},
     {"role": "user", "content": "Name three colours of the rainbow and say one thing about each of them."}],
    [{"role": "user", "content": "Write a haiku about the sea."},
     {"role": "assistant", "content": "Waves fold into foam,\nsalt wind carries gull voices,\nthe tide keeps its time."},
     {"role": "user", "content": "Now one about mountains, please."}],
]


@pytest.mark.slow
def test_default_gguf_greedy_generation_is_token_identical_to_transformers(smollm_pair):
    llm, hf = smollm_pair
    outputs = llm.chat(CONVERSATIONS, SamplingParams(temperature=0, max_tokens=MAX_TOKENS), use_tqdm=False)
    prompts = [out.prompt_token_ids for out in outputs]
    assert len({len(p) for p in prompts}) == len(prompts), "the prompts should differ in length"
    _check_exact(hf, prompts, outputs)
    assert outputs[0].outputs[0].text.startswith("The capital of France is Paris")


@pytest.mark.slow
def test_prompts_batched_together_give_the_tokens_each_gives_alone(smollm_pair):
    llm, _ = smollm_pair
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS)
    together = llm.chat(CONVERSATIONS, params, use_tqdm=False)
    for conversation, batched in zip(CONVERSATIONS, together):
        alone = llm.chat(conversation, params, use_tqdm=False)[0]
        assert alone.outputs[0].token_ids == batched.outputs[0].token_ids
        assert alone.outputs[0].text == batched.outputs[0].text
