import math

import pytest
import torch

from engine.sampler import Sampler, SamplerOutput, process_logits, truncate_logits
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

# Probabilities at temperature 1: .403 .244 .148 .090 .054 .033 .020 .007
LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -2.0]
VOCAB = len(LOGITS)
N = 20000


@pytest.fixture(autouse=True)
def _fixed_global_rng():
    # Unseeded rows draw from the global RNG; fixing it keeps the statistical tests deterministic.
    torch.manual_seed(0)


def make_seq(i: int = 0, prompt=(1, 2, 3), output=(), **params) -> Sequence:
    seq = Sequence(seq_id=i, request_id=str(i), index=0, prompt_token_ids=list(prompt), params=SamplingParams(**params))
    seq.output_token_ids = list(output)
    return seq


def reference_probs(logits, temperature=1.0, top_k=0, top_p=1.0, min_p=0.0) -> list[float]:
    """Straight-line reading of the definitions: temperature, top_k, top_p, min_p, in that order."""
    z = [l / temperature for l in logits]
    order = sorted(range(len(z)), key=lambda i: -z[i])
    kept = order[:top_k] if top_k else order
    w = {i: math.exp(z[i]) for i in kept}
    total = sum(w.values())
    nucleus, mass = [], 0.0
    for i in kept:
        if mass >= top_p:
            break
        nucleus.append(i)
        mass += w[i] / total
    w_max = max(w[i] for i in nucleus)
    final = [i for i in nucleus if w[i] >= min_p * w_max]
    total = sum(w[i] for i in final)
    return [w[i] / total if i in final else 0.0 for i in range(len(z))]


def frequencies(token_ids: list[int]) -> list[float]:
    counts = torch.bincount(torch.tensor(token_ids), minlength=VOCAB)
    return (counts.double() / len(token_ids)).tolist()


def sample_many(n: int = N, logits=LOGITS, **params) -> list[int]:
    seq = make_seq(**params)
    return Sampler(set())(torch.tensor([logits] * n), [seq] * n).token_ids


def assert_matches(observed: list[float], expected: list[float], tv_max: float = 0.02) -> None:
    tv = 0.5 * sum(abs(o - e) for o, e in zip(observed, expected))
    assert tv < tv_max, (observed, expected)
    for o, e in zip(observed, expected):
        if e == 0.0:
            assert o == 0.0, (observed, expected)


# --- greedy ---------------------------------------------------------------------------------


def test_greedy_equals_argmax():
    logits = torch.randn(16, 100)
    seqs = [make_seq(i, temperature=0.0) for i in range(16)]
    out = Sampler(set())(logits.clone(), seqs)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 16


def test_top_k_1_equals_greedy_even_at_temperature_1():
    logits = torch.randn(16, 100)
    seqs = [make_seq(i, temperature=1.0, top_k=1) for i in range(16)]
    assert Sampler(set())(logits.clone(), seqs).token_ids == logits.argmax(-1).tolist()


def test_greedy_rows_stay_argmax_in_a_batch_with_sampled_rows():
    logits = torch.randn(12, 100)
    seqs = [make_seq(i, temperature=0.0 if i % 2 else 1.5, top_p=0.9) for i in range(12)]
    out = Sampler(set())(logits.clone(), seqs)
    argmax = logits.argmax(-1).tolist()
    assert [out.token_ids[i] for i in range(1, 12, 2)] == [argmax[i] for i in range(1, 12, 2)]


# --- seeded reproducibility -----------------------------------------------------------------


def _run_target(target: Sequence, others: list[Sequence], position: int, steps: int = 50) -> list[int]:
    """Decodes `steps` tokens with `target` at `position` among `others`; the target's logits
    come from their own generator, so they are the same whatever the batch holds."""
    vocab = 64
    target_logits = torch.Generator().manual_seed(7)
    other_logits = torch.Generator().manual_seed(8)
    sampler = Sampler({0})
    seqs = others[:position] + [target] + others[position:]
    for _ in range(steps):
        logits = torch.randn(len(seqs), vocab, generator=other_logits) * 3
        logits[position] = torch.randn(vocab, generator=target_logits) * 3
        out = sampler(logits, seqs)
        for seq, token in zip(seqs, out.token_ids):
            seq.output_token_ids.append(token)
    return target.output_token_ids


TARGET = dict(seed=1234, temperature=0.9, top_p=0.95, presence_penalty=0.5, repetition_penalty=1.1)


def test_seeded_sampling_reproducible_across_runs():
    first = _run_target(make_seq(**TARGET), [], 0)
    second = _run_target(make_seq(**TARGET), [], 0)
    assert first == second
    # Not vacuous: another seed gives another sequence.
    assert _run_target(make_seq(**{**TARGET, "seed": 4321}), [], 0) != first


def test_seeded_sampling_independent_of_batch_composition():
    alone = _run_target(make_seq(**TARGET), [], 0)
    mixed = [
        make_seq(1, seed=99, top_k=5),
        make_seq(2, temperature=1.3),  # unseeded: global RNG
        make_seq(3, temperature=0.0, frequency_penalty=1.0),
        make_seq(4, min_p=0.1, logprobs=3, min_tokens=5),
        make_seq(5, temperature=0.5, top_p=0.5, logit_bias={3: 5.0}),
    ]
    assert _run_target(make_seq(**TARGET), mixed, 2) == alone
    only_seeded = [make_seq(1, seed=5, top_k=10), make_seq(2, seed=6, temperature=2.0)]
    assert _run_target(make_seq(**TARGET), only_seeded, 1) == alone


# --- distributions --------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_sampled_frequencies_match_softmax_at_temperature(temperature):
    observed = frequencies(sample_many(temperature=temperature))
    assert_matches(observed, reference_probs(LOGITS, temperature=temperature))


def test_lower_temperature_gives_lower_entropy():
    def entropy(p):
        return -sum(x * math.log(x) for x in p if x > 0)

    entropies = [entropy(frequencies(sample_many(temperature=t))) for t in (0.3, 0.7, 1.0, 2.0)]
    assert entropies == sorted(entropies)


def test_top_k_keeps_only_k_most_likely_tokens():
    observed = frequencies(sample_many(top_k=3))
    assert_matches(observed, reference_probs(LOGITS, top_k=3))
    assert all(observed[i] > 0 for i in range(3)) and sum(observed[3:]) == 0


def test_top_p_keeps_smallest_set_reaching_p():
    # Cumulative .403 .647 .795 .885: reaching 0.8 needs the first four tokens.
    observed = frequencies(sample_many(top_p=0.8))
    assert_matches(observed, reference_probs(LOGITS, top_p=0.8))
    assert observed[3] > 0 and sum(observed[4:]) == 0


def test_top_p_always_keeps_top_token():
    assert set(sample_many(n=2000, top_p=0.01)) == {0}


def test_min_p_drops_tokens_below_fraction_of_max():
    # p_i / p_max = exp(l_i - 2): 1 .61 .37 .22 .14 ...; min_p=0.2 keeps tokens 0..3.
    observed = frequencies(sample_many(min_p=0.2))
    assert_matches(observed, reference_probs(LOGITS, min_p=0.2))
    assert observed[3] > 0 and sum(observed[4:]) == 0


def test_top_p_uses_probabilities_renormalized_after_top_k():
    # After top_k=6 the cumulative mass is .414 .665 .817 .909, so top_p=0.9 stops at token 3;
    # on the untruncated distribution it would also keep token 4.
    observed = frequencies(sample_many(top_k=6, top_p=0.9))
    assert_matches(observed, reference_probs(LOGITS, top_k=6, top_p=0.9))
    assert observed[3] > 0 and sum(observed[4:]) == 0


def test_combined_top_k_top_p_min_p_with_temperature():
    params = dict(temperature=0.8, top_k=7, top_p=0.975, min_p=0.1)
    expected = reference_probs(LOGITS, **params)
    assert 2 <= sum(e > 0 for e in expected) < 7  # every stage matters here
    assert_matches(frequencies(sample_many(**params)), expected)


def test_truncate_logits_gives_exact_reference_distribution():
    cases = [
        dict(temperature=0.8, top_k=7, top_p=0.975, min_p=0.1),
        dict(temperature=1.0, top_k=6, top_p=0.9),
        dict(temperature=2.0, min_p=0.3),
        dict(temperature=0.5),
        dict(temperature=1.0, top_k=2),
    ]
    params = [SamplingParams(**c) for c in cases]
    probs = truncate_logits(torch.tensor([LOGITS] * len(cases)), params).softmax(-1)
    for row, case in zip(probs.tolist(), cases):
        assert row == pytest.approx(reference_probs(LOGITS, **case), abs=1e-6)


def test_truncate_logits_top_k_only_batch_with_rows_that_turn_it_off():
    # Without top_p in the batch, top_k goes through topk rather than a sort.
    cases = [dict(top_k=2), dict(), dict(top_k=5, temperature=0.5), dict(min_p=0.3), dict(top_k=8)]
    params = [SamplingParams(**c) for c in cases]
    probs = truncate_logits(torch.tensor([LOGITS] * len(cases)), params).softmax(-1)
    for row, case in zip(probs.tolist(), cases):
        assert row == pytest.approx(reference_probs(LOGITS, **case), abs=1e-6)


def test_rows_with_different_params_in_one_batch_follow_their_own_params():
    groups = [dict(top_k=2), dict(temperature=0.7, top_p=0.5), dict(min_p=0.5), dict(temperature=3.0)]
    seqs = [make_seq(**g) for g in groups]
    n = 10000
    batch = [seqs[i % len(groups)] for i in range(n * len(groups))]
    tokens = Sampler(set())(torch.tensor([LOGITS] * len(batch)), batch).token_ids
    for g, params in enumerate(groups):
        assert_matches(frequencies(tokens[g :: len(groups)]), reference_probs(LOGITS, **params), tv_max=0.025)


# --- penalties, bias, min_tokens --------------------------------------------------------------

PEN_LOGITS = [1.0, -1.0, 2.0, -2.0, 0.5, 3.0]


def _processed(**params) -> list[float]:
    seq = make_seq(prompt=[0, 1], output=[2, 2, 3], **params)
    return process_logits(torch.tensor([PEN_LOGITS]), [seq], set())[0].tolist()


def test_repetition_penalty_divides_positive_multiplies_negative_over_prompt_and_output():
    assert _processed(repetition_penalty=2.0) == pytest.approx([0.5, -2.0, 1.0, -4.0, 0.5, 3.0])
    assert _processed(repetition_penalty=0.5) == pytest.approx([2.0, -0.5, 4.0, -1.0, 0.5, 3.0])


def test_frequency_and_presence_penalties_count_output_tokens_only():
    # Output counts: token 2 twice, token 3 once; prompt tokens 0 and 1 are not penalized.
    assert _processed(frequency_penalty=0.5) == pytest.approx([1.0, -1.0, 1.0, -2.5, 0.5, 3.0])
    assert _processed(presence_penalty=0.25) == pytest.approx([1.0, -1.0, 1.75, -2.25, 0.5, 3.0])
    assert _processed(frequency_penalty=-0.5, presence_penalty=-1.0) == pytest.approx(
        [1.0, -1.0, 4.0, -0.5, 0.5, 3.0]
    )


def test_repetition_penalty_applies_before_frequency_and_presence():
    got = _processed(repetition_penalty=2.0, frequency_penalty=0.5, presence_penalty=0.25)
    assert got == pytest.approx([0.5, -2.0, -0.25, -4.75, 0.5, 3.0])


def test_penalties_do_not_leak_between_rows_or_hit_padding():
    seqs = [
        make_seq(0, prompt=[0, 1], output=[2, 2, 3], repetition_penalty=2.0, frequency_penalty=0.5),
        make_seq(1, prompt=[5], output=[], presence_penalty=1.0, repetition_penalty=3.0),
        make_seq(2, prompt=[0, 1, 2, 3], output=[4, 4], frequency_penalty=0.0),
    ]
    got = process_logits(torch.tensor([PEN_LOGITS] * 3), seqs, set()).tolist()
    assert got[0] == pytest.approx([0.5, -2.0, 0.0, -4.5, 0.5, 3.0])
    assert got[1] == pytest.approx([1.0, -1.0, 2.0, -2.0, 0.5, 1.0])  # only prompt token 5, no token 0
    assert got[2] == PEN_LOGITS  # no penalty asked for


def test_logit_bias_is_added_to_logits():
    got = process_logits(torch.tensor([PEN_LOGITS]), [make_seq(logit_bias={1: 2.5, 4: -1.5})], set())
    assert got[0].tolist() == pytest.approx([1.0, 1.5, 2.0, -2.0, -1.0, 3.0])


def test_logit_bias_plus_100_forces_token():
    assert set(sample_many(n=2000, logit_bias={7: 100.0})) == {7}
    assert Sampler(set())(torch.tensor([LOGITS]), [make_seq(temperature=0.0, logit_bias={6: 100.0})]).token_ids == [6]


def test_logit_bias_minus_100_forbids_token():
    tokens = sample_many(n=5000, temperature=2.0, logit_bias={0: -100.0, 1: -100.0})
    assert 0 not in tokens and 1 not in tokens
    assert Sampler(set())(torch.tensor([LOGITS]), [make_seq(temperature=0.0, logit_bias={0: -100.0})]).token_ids == [1]


def test_min_tokens_masks_eos_and_stop_token_ids_until_reached():
    logits = [5.0, 1.0, 0.0, 4.0, 0.5, 3.0]  # eos 0, then stop token 3, then 5 would win greedily
    sampler = Sampler({0})
    for produced in range(3):
        seq = make_seq(output=[1] * produced, temperature=0.0, min_tokens=3, stop_token_ids=[3])
        processed = process_logits(torch.tensor([logits]), [seq], {0})[0].tolist()
        assert processed[0] == processed[3] == -math.inf
        assert processed[5] == 3.0
        assert sampler(torch.tensor([logits]), [seq]).token_ids == [5]
    sampled = make_seq(output=[1, 1], min_tokens=3, stop_token_ids=[3], logit_bias={5: -100.0})
    assert not {0, 3} & set(sampler(torch.tensor([logits] * 2000), [sampled] * 2000).token_ids)


def test_min_tokens_stops_masking_once_reached():
    logits = [5.0, 1.0, 0.0, 4.0, 0.5, 3.0]
    seq = make_seq(output=[1, 1, 1], temperature=0.0, min_tokens=3, stop_token_ids=[3])
    assert process_logits(torch.tensor([logits]), [seq], {0})[0].tolist() == logits
    assert Sampler({0})(torch.tensor([logits]), [seq]).token_ids == [0]


# --- logprobs -------------------------------------------------------------------------------


def test_logprobs_hold_sampled_and_top_tokens_from_raw_logits():
    logits = torch.randn(4, 50) * 2
    raw = torch.log_softmax(logits, -1)
    seqs = [
        make_seq(0, logprobs=5, temperature=1.5, repetition_penalty=1.3, output=[int(logits[0].argmax())]),
        make_seq(1, logprobs=0, temperature=0.7),
        make_seq(2),  # no logprobs asked for
        make_seq(3, logprobs=3, temperature=0.0, logit_bias={int(logits[3].argmin()): 100.0}),
    ]
    out = Sampler(set())(logits.clone(), seqs)
    assert isinstance(out, SamplerOutput) and out.logprobs[2] is None
    for row, k in ((0, 5), (1, 0), (3, 3)):
        entry, token = out.logprobs[row], out.token_ids[row]
        top = raw[row].topk(k).indices.tolist() if k else []
        assert set(entry) == {token, *top}
        for t, lp in entry.items():
            assert lp == pytest.approx(raw[row, t].item(), abs=1e-5)
    # The biased token was sampled, but its logprob is still the raw, unbiased one.
    assert out.token_ids[3] == int(logits[3].argmin())


def test_logprobs_unaffected_by_temperature():
    logits = torch.randn(1, 50) * 2
    raw = torch.log_softmax(logits[0], -1)
    top = raw.topk(4).indices.tolist()
    for temperature in (0.2, 1.0, 3.0):
        entry = Sampler(set())(logits.clone(), [make_seq(logprobs=4, temperature=temperature)]).logprobs[0]
        for t in top:
            assert entry[t] == pytest.approx(raw[t].item(), abs=1e-5)
