"""Speculative decoding never changes what a request gets: greedy outputs (with stop strings, max_tokens, logprobs
and a JSON schema) equal decoding without it, sampled outputs keep the target's distribution (a chi-square test
against the probabilities transformers computes), rejected proposals' KV blocks go back, and bad settings are
refused naming the key."""
import itertools
import json

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sampling_params import StructuredOutputsParams
from engine.speculative import SpeculativeConfig, ngram_proposal

# propose always (no cool-down, any batch): the check is exercised on every step
EAGER_NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "min_acceptance": 0.0,
               "max_batch": 4096}


def test_ngram_proposal_follows_the_latest_longest_match():
    tokens = [1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3]
    assert ngram_proposal(tokens, 3, 3, 1) == [7, 8, 5]  # "2 3" last seen before 7 8 5 (the latest match)
    assert ngram_proposal([1, 2, 3, 1, 2], 5, 4, 2) == [3, 1, 2]
    assert ngram_proposal([4, 5, 6], 3, 3, 1) == [] and ngram_proposal([4], 3, 3, 1) == []


@pytest.mark.parametrize("raw,words", [
    ({"method": "ngram", "num_speculative_tokens": 3, "lookahead": 2}, "unknown key(s) lookahead"),
    ({"num_speculative_tokens": 3}, "method is required"),
    ({"method": "eagle", "num_speculative_tokens": 3}, "method must be one of"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "num_speculative_tokens must be"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "prompt_lookup_min"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "speculative_config.model"),
    ("ngram", "must be a JSON object"),
])
def test_bad_speculative_config_names_the_key(raw, words):
    with pytest.raises(ValueError, match="speculative_config") as error:
        SpeculativeConfig.from_dict(raw)
    assert words in str(error.value)


@pytest.fixture(scope="module")
def plain(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=256, max_model_len=512)


@pytest.fixture(scope="module")
def speculative(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=256, max_model_len=512,
               speculative_config=EAGER_NGRAM)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(3)
    loop = torch.randint(3, 512, (12,), generator=g).tolist()
    return [loop * 6,  # a repeating prompt: long proposals, many accepted
            torch.randint(3, 512, (40,), generator=g).tolist(),  # random: proposals mostly rejected
            list(range(3, 200)), [7, 7, 7, 7]]


@pytest.mark.parametrize("settings", [
    dict(max_tokens=48, ignore_eos=True),
    dict(max_tokens=7, ignore_eos=True, logprobs=3),
    dict(max_tokens=40, ignore_eos=True, stop=["ar", "e "]),
], ids=["long", "max_tokens-logprobs", "stop-strings"])
def test_greedy_outputs_equal_decoding_without_speculation(plain, speculative, settings):
    params = SamplingParams(temperature=0, **settings)
    want = plain.generate(_prompts(), params, use_tqdm=False)
    got = speculative.generate(_prompts(), params, use_tqdm=False)
    for w, g in zip(want, got):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids and g.outputs[0].text == w.outputs[0].text
        assert g.outputs[0].finish_reason == w.outputs[0].finish_reason
        if settings.get("logprobs"):
            for a, b in zip(w.outputs[0].logprobs, g.outputs[0].logprobs):
                assert a.keys() == b.keys() and all(abs(a[k] - b[k]) < 1e-4 for k in a)
    spec = speculative.engine.speculator
    assert spec.num_drafts > 0 and 0 < spec.num_accepted_tokens < spec.num_draft_tokens
    bm = speculative.engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # every reserved proposal block came back


def test_structured_output_holds_under_speculation(plain, speculative):
    schema = {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "string", "maxLength": 6}},
              "required": ["a", "b"]}
    params = SamplingParams(temperature=0, max_tokens=60, structured_outputs=StructuredOutputsParams(json=schema))
    prompt = [list(range(3, 60)) * 2]
    want = plain.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    got = speculative.generate(prompt, params, use_tqdm=False)[0].outputs[0]
    assert got.token_ids == want.token_ids
    if got.finish_reason == "stop":
        json.loads(got.text)


def test_sampling_keeps_the_target_distribution(tiny_checkpoint, monkeypatch):
    """Three tokens sampled (top_k 4, temperature 1), the last two checked against a proposal of the likeliest
    continuation (accepted often, rejected often): the 64 outcomes' counts against the exact probabilities from
    transformers' logits."""
    import transformers
    from scipy.stats import chisquare
    path = str(tiny_checkpoint("llama"))
    prompt = torch.randint(3, 512, (30,), generator=torch.Generator().manual_seed(0)).tolist()
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    def top4(context: list[int]) -> dict[int, float]:
        with torch.no_grad():
            logits = model(torch.tensor([context])).logits[0, -1]
        values, ids = logits.topk(4)
        return dict(zip(ids.tolist(), torch.softmax(values, -1).tolist()))

    exact: dict[tuple, float] = {}
    likeliest: dict[tuple, list[int]] = {}  # context after the prompt -> the proposal for what follows
    for a in top4(prompt):
        b = max(top4(prompt + [a]).items(), key=lambda kv: kv[1])[0]
        likeliest[(a,)] = [b, max(top4(prompt + [a, b]).items(), key=lambda kv: kv[1])[0]]
    monkeypatch.setattr("engine.speculative.ngram_proposal",
                        lambda tokens, k, n_max, n_min: likeliest.get(tuple(tokens[len(prompt):]), []))
    for a, pa in top4(prompt).items():
        for b, pb in top4(prompt + [a]).items():
            for c, pc in top4(prompt + [a, b]).items():
                exact[(a, b, c)] = pa * pb * pc
    llm = LLM(path, dtype="float32", num_kv_blocks=2048, max_model_len=512,
              speculative_config=EAGER_NGRAM)
    samples = 800
    out = llm.generate([prompt], SamplingParams(temperature=1.0, top_k=4, max_tokens=3, ignore_eos=True,
                                                n=samples, seed=11), use_tqdm=False)[0]
    counts = {key: 0 for key in exact}
    for o in out.outputs:
        counts[tuple(o.token_ids)] += 1
    assert sum(counts.values()) == samples
    spec = llm.engine.speculator
    assert spec.num_drafts >= samples and spec.num_accepted_tokens > 0
    # cells expected fewer than 5 times are pooled, as the chi-square approximation asks
    keys = sorted(exact, key=exact.get)
    small = list(itertools.takewhile(lambda k: exact[k] * samples < 5, keys))
    observed = [counts[k] for k in keys[len(small):]] + ([sum(counts[k] for k in small)] if small else [])
    expected = [exact[k] * samples for k in keys[len(small):]] + ([sum(exact[k] for k in small) * samples]
                                                                   if small else [])
    expected = [e * samples / sum(expected) for e in expected]  # float32 probabilities sum to 1 within 1e-7
    assert chisquare(observed, expected).pvalue > 1e-3


@pytest.mark.parametrize("draft_arch,all_accepted", [("llama", True), ("qwen2", False)],
                         ids=["draft-is-the-target", "other-draft"])
def test_draft_model_greedy_outputs_equal_decoding_without_it(tiny_checkpoint, plain, draft_arch, all_accepted):
    """A draft sharing the target's tokenizer: itself (every proposal accepted) or another tiny model (few)."""
    spec = LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=256, max_model_len=512,
               speculative_config={"method": "draft_model", "model": str(tiny_checkpoint(draft_arch)),
                                   "num_speculative_tokens": 4, "min_acceptance": 0.0})
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    want = plain.generate(_prompts(), params, use_tqdm=False)
    got = spec.generate(_prompts(), params, use_tqdm=False)
    assert [g.outputs[0].token_ids for g in got] == [w.outputs[0].token_ids for w in want]
    s = spec.engine.speculator
    assert s.num_drafts > 0 and (s.num_accepted_tokens == s.num_draft_tokens) == all_accepted
    assert not s.draft.mirrors  # finished sequences' draft caches are freed
    draft_blocks = s.draft.engine.block_manager
    assert draft_blocks.num_free_blocks == draft_blocks.num_blocks


def test_a_draft_with_another_vocabulary_is_refused(tiny_checkpoint):
    with pytest.raises(ValueError, match="speculative_config.model: the draft's vocabulary"):
        LLM(str(tiny_checkpoint("llama")), dtype="float32", num_kv_blocks=64, max_model_len=512,
            speculative_config={"method": "draft_model", "model": "default", "num_speculative_tokens": 2})


def test_server_speculates_and_counts_it_in_metrics(tiny_checkpoint, plain):
    import httpx

    from tests.conftest import RunningServer
    server = RunningServer(str(tiny_checkpoint("llama")), "--served-model-name", "tiny", "--dtype", "float32",
                           "--max-model-len", "512", "--kv-cache-memory", "16MiB", "--embedding-model", "none",
                           "--enforce-eager", "--speculative-config", json.dumps(EAGER_NGRAM))
    try:
        prompt = _prompts()[0]
        body = httpx.post(f"{server.base_url}/v1/completions", headers=server.headers, timeout=60, json={
            "model": "tiny", "prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True}).json()
        want = plain.generate([prompt], SamplingParams(temperature=0, max_tokens=24, ignore_eos=True),
                              use_tqdm=False)[0].outputs[0].text
        assert body["choices"][0]["text"] == want
        metrics = httpx.get(f"{server.base_url}/metrics").text
        counts = {name: float(line.rsplit(" ", 1)[1]) for line in metrics.splitlines()
                  for name in ("num_drafts_total", "num_draft_tokens_total", "num_accepted_tokens_total")
                  if line.startswith(f"tokenmill:spec_decode_{name}{{")}
        assert counts["num_drafts_total"] > 0 and 0 < counts["num_accepted_tokens_total"] <= \
            counts["num_draft_tokens_total"]
    finally:
        server.stop()


def test_cli_refuses_a_bad_speculative_config(tiny_checkpoint):
    import subprocess
    import sys
    run = subprocess.run([sys.executable, "-m", "server.cli", "generate", str(tiny_checkpoint("llama")),
                          "--prompt", "hi", "--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2, '
                          '"lookahead": 1}'], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "speculative_config: unknown key(s) lookahead" in run.stderr
