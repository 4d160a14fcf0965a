"""engine.detokenizer.IncrementalDetokenizer with the SmolLM2 byte-level BPE tokenizer."""
import random

import pytest
import sentencepiece as spm

from engine.detokenizer import IncrementalDetokenizer
from text.tokenizer import Tokenizer

MIXED = "Héllo wörld! Ça va? 😀🎉 日本語のテキスト 👨\u200d👩\u200d👧 naïve café — done.\nNext: 12345 ✓"


@pytest.fixture(scope="module")
def tok(smollm_tokenizer):
    return smollm_tokenizer


@pytest.fixture(scope="module")
def prompt(tok) -> list[int]:
    return tok.encode(tok.apply_chat_template([{"role": "user", "content": "Say something."}]))


def stream(tok, prompt, ids, **kwargs) -> tuple[IncrementalDetokenizer, list[str]]:
    """Feed ids one by one until the detokenizer finishes; deltas include the final flush when no stop matched."""
    detok = IncrementalDetokenizer(tok, prompt, **kwargs)
    deltas = []
    for i in ids:
        deltas.append(detok.add(i))
        if detok.finished:
            break
    else:
        deltas.append(detok.flush())
    return detok, deltas


def spanning_stop(tok, ids: list[int], at: int) -> str:
    """A stop string made of the end of token `at` and the start of token `at + 1`."""
    left, right = tok.decode([ids[at]]), tok.decode([ids[at + 1]])
    assert len(left) >= 2 and len(right) >= 2, "pick tokens with at least two characters"
    return left[-2:] + right[:2]


def test_deltas_never_hold_replacement_chars_and_join_to_the_full_decode(tok, prompt):
    ids = tok.encode(MIXED, add_special_tokens=False)
    # The text must really split characters across tokens for this test to mean anything.
    assert any("\ufffd" in tok.decode([i]) for i in ids)
    detok, deltas = stream(tok, prompt, ids)
    assert all("\ufffd" not in d for d in deltas)
    assert "".join(deltas) == detok.text == tok.decode(ids) == MIXED
    assert detok.stop_reason is None


def test_deltas_join_to_decode_for_random_token_sequences(tok, prompt):
    rng = random.Random(0)
    for _ in range(20):
        ids = [rng.randrange(tok.vocab_size) for _ in range(40)]
        _, deltas = stream(tok, prompt, ids)
        assert "".join(deltas) == tok.decode(ids)


def test_prompt_text_is_never_output(tok):
    prompt = tok.encode("The prompt text.")
    ids = tok.encode(" And the answer.")
    detok, deltas = stream(tok, prompt, ids)
    assert detok.text == " And the answer."


def test_stop_string_spanning_two_tokens_ends_generation_and_is_not_output(tok, prompt):
    text = "The answer is forty-two, and nothing else matters here."
    ids = tok.encode(text)
    stop = spanning_stop(tok, ids, 2)
    assert not any(stop in tok.decode([i]) for i in ids)
    detok, deltas = stream(tok, prompt, ids, stop=[stop])
    assert detok.finished and detok.stop_reason == stop
    assert all(stop not in d for d in deltas) and stop not in detok.text
    # everything before the stop string is delivered, nothing after it
    assert "".join(deltas) == detok.text == text[:text.index(stop)]
    assert len(deltas) == 4  # stopped on the token completing the stop string
    assert detok.add(ids[4]) == "" and detok.flush() == ""


def test_stop_string_is_kept_when_include_stop_str_in_output(tok, prompt):
    text = "The answer is forty-two, and nothing else matters here."
    ids = tok.encode(text)
    stop = spanning_stop(tok, ids, 2)
    detok, deltas = stream(tok, prompt, ids, stop=[stop], include_stop_str_in_output=True)
    assert detok.stop_reason == stop
    assert "".join(deltas) == detok.text == text[:text.index(stop) + len(stop)]


def test_stop_string_split_inside_a_multibyte_character(tok, prompt):
    text = "Weather: ☀️ sunny 😀 then rain"
    ids = tok.encode(text)
    detok, deltas = stream(tok, prompt, ids, stop=["😀 then"])
    assert detok.text == "".join(deltas) == "Weather: ☀️ sunny "


def test_text_that_only_looks_like_a_stop_prefix_is_released(tok, prompt):
    text = "Hello world, hello wonderful world"
    ids = tok.encode(text)
    detok, deltas = stream(tok, prompt, ids, stop=["wonderland"])
    assert detok.stop_reason is None
    assert "".join(deltas) == detok.text == text


def test_flush_delivers_held_back_text(tok, prompt):
    ids = tok.encode("Hello wor")
    detok = IncrementalDetokenizer(tok, prompt, stop=["world"])
    streamed = "".join(detok.add(i) for i in ids)
    assert streamed == "Hello "  # "wor" might begin "world", so it is held back
    assert detok.flush() == "wor"
    assert detok.text == "Hello wor" and detok.stop_reason is None


@pytest.mark.parametrize("stops", [["world", "lo w"], ["lo w", "world"]])
def test_earliest_completed_stop_string_wins(tok, prompt, stops):
    detok, deltas = stream(tok, prompt, tok.encode("Hello world and more"), stop=stops)
    assert detok.stop_reason == "lo w"
    assert detok.text == "".join(deltas) == "Hel"


def test_earliest_stop_wins_when_both_complete_in_one_token(tok, prompt):
    detok, _ = stream(tok, prompt, tok.encode(" hello"), stop=["llo", "el"])
    assert (detok.stop_reason, detok.text) == ("el", " h")


def test_special_tokens_are_skipped_or_kept(tok, prompt):
    ids = tok.encode("Done.") + [tok.eos_token_id]
    assert stream(tok, prompt, ids)[0].text == "Done."
    assert stream(tok, prompt, ids, skip_special_tokens=False)[0].text == "Done.<|im_end|>"


def test_sentencepiece_leading_space_comes_from_prompt_context(tmp_path):
    corpus = tmp_path / "corpus.txt"
    rng = random.Random(1)
    corpus.write_text("\n".join(" ".join(rng.choice(["hello", "world", "fox", "dog"]) for _ in range(8))
                                for _ in range(500)))
    spm.SentencePieceTrainer.train(input=str(corpus), model_prefix=str(tmp_path / "tokenizer"), vocab_size=300,
                                   model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                                   remove_extra_whitespaces=False, minloglevel=2)
    tok = Tokenizer.from_dir(tmp_path)
    prompt, answer = tok.encode("hello"), tok.encode("world dog", add_special_tokens=False)
    assert tok.decode(answer) == "world dog"  # decoded alone, the first token's space is dropped
    detok, deltas = stream(tok, prompt, answer)
    assert "".join(deltas) == detok.text == " world dog"
