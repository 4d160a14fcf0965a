"""text.tokenizer.Tokenizer against transformers and sentencepiece, over GGUF, tokenizer.json and tokenizer.model."""
import json
import random
from pathlib import Path

import gguf
import pytest
import sentencepiece as spm

from text.tokenizer import Tokenizer

TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  leading spaces",
    "trailing spaces   ",
    "multiple    spaces   between words",
    "line one\nline two\n\nline four\n",
    "\ttabs\tand\ttabs\t",
    "digits 12345 and 3.14159, year 2024",
    "x=12345;y=678",
    "def square(x):\n    return x ** 2  # comment\n\nprint(square(3))\n",
    "café naïve résumé Ærøskøbing straße",
    "日本語のテキスト、中文文本。한국어",
    "emoji 😀🎉 skin tone 👍🏽 family 👨\u200d👩\u200d👧",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|im_end|>more<|endoftext|>end",
    "I'm here, you're there; it's fine. We'll see!",
    "",
    " ",
    "\n",
]


# ---- SmolLM2 GGUF ------------------------------------------------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("text", TEXTS)
def test_gguf_ids_and_decode_match_transformers_gguf_tokenizer(smollm_tokenizer, hf_smollm_tokenizer, text):
    ids = smollm_tokenizer.encode(text)
    assert ids == hf_smollm_tokenizer.encode(text)
    assert smollm_tokenizer.encode(text, add_special_tokens=False) == hf_smollm_tokenizer.encode(text, add_special_tokens=False)
    assert smollm_tokenizer.decode(ids) == hf_smollm_tokenizer.decode(ids, skip_special_tokens=True)
    assert smollm_tokenizer.decode(ids, skip_special_tokens=False) == hf_smollm_tokenizer.decode(ids)


@pytest.mark.parametrize("text", TEXTS)
def test_gguf_decode_round_trips_text(smollm_tokenizer, text):
    assert smollm_tokenizer.decode(smollm_tokenizer.encode(text), skip_special_tokens=False) == text


def test_gguf_special_tokens_are_single_ids_and_skipped_in_decode(smollm_tokenizer):
    ids = smollm_tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2 and len(ids) == 5
    assert smollm_tokenizer.decode(ids) == "user\nhi"


def test_gguf_metadata_gives_special_tokens_flags_and_template(smollm_tokenizer):
    assert (smollm_tokenizer.bos_token, smollm_tokenizer.bos_token_id) == ("<|im_start|>", 1)
    assert (smollm_tokenizer.eos_token, smollm_tokenizer.eos_token_id) == ("<|im_end|>", 2)
    assert smollm_tokenizer.eos_token_ids == {2}
    assert smollm_tokenizer.vocab_size == 49152
    # tokenizer.ggml.add_bos_token is False in this file: no BOS is prepended
    assert smollm_tokenizer.add_bos_token is False
    assert smollm_tokenizer.encode("hi")[0] != smollm_tokenizer.bos_token_id
    assert smollm_tokenizer.chat_template.startswith("{% for message in messages %}")
    assert smollm_tokenizer.id_to_token(1) == "<|im_start|>" and smollm_tokenizer.convert_ids_to_tokens([216]) == ["Ġ"]


def test_smollm_pretokenizer_isolates_digits_like_the_reference_tokenizer(smollm_tokenizer):
    # The SmolLM2 tokenizer.json (and llama.cpp's "smollm" pre-tokenizer) split off each digit before the GPT-2
    # regex, so a run of spaces before a digit stays one token ("ĠĠ" = 256). transformers 5.23 does not map
    # "smollm" and uses the plain GPT-2 regex, which gives [216, 216, 33] here; we follow the model's tokenizer.
    assert smollm_tokenizer.convert_ids_to_tokens(smollm_tokenizer.encode("  1")) == ["ĠĠ", "1"]
    assert smollm_tokenizer.encode("x  12") == [104, 256, 33, 34]
    assert smollm_tokenizer.encode("12345") == [33, 34, 35, 36, 37]


@pytest.mark.slow
def test_smollm_pretokenizer_matches_reference_layout_where_transformers_gguf_differs(smollm_tokenizer, hf_smollm_tokenizer):
    from tokenizers import Tokenizer as HFTokenizer, pre_tokenizers
    reference = HFTokenizer.from_str(hf_smollm_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    for text in ["  1", "a\n\n1", "x = [1,  2]\n    return 0", " 3 4  5"]:
        assert smollm_tokenizer.encode(text) == reference.encode(text).ids


@pytest.mark.slow
def test_from_dir_of_saved_transformers_tokenizer_matches_it(hf_smollm_tokenizer, tmp_path):
    hf_smollm_tokenizer.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 0]}))
    tok = Tokenizer.from_dir(tmp_path)
    for text in TEXTS:
        assert tok.encode(text) == hf_smollm_tokenizer.encode(text)
        assert tok.decode(tok.encode(text)) == hf_smollm_tokenizer.decode(hf_smollm_tokenizer.encode(text), skip_special_tokens=True)
    assert tok.eos_token_ids == {0, 2}  # generation_config's ids also end generation
    assert tok.chat_template == hf_smollm_tokenizer.chat_template
    assert (tok.bos_token_id, tok.eos_token_id, tok.add_bos_token, tok.vocab_size) == (1, 2, False, 49152)


def test_from_dir_with_tokenizer_json_honours_add_bos_token(tiny_checkpoint, tmp_path):
    source = tiny_checkpoint("llama")
    (tmp_path / "tokenizer.json").write_bytes((source / "tokenizer.json").read_bytes())
    config = json.loads((source / "tokenizer_config.json").read_text())
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({**config, "add_bos_token": True}))
    with_bos = Tokenizer.from_dir(tmp_path)
    without_bos = Tokenizer.from_dir(source)
    assert with_bos.add_bos_token and not without_bos.add_bos_token
    assert with_bos.encode("Hello") == [with_bos.bos_token_id] + without_bos.encode("Hello")
    assert with_bos.encode("Hello", add_special_tokens=False) == without_bos.encode("Hello")


# ---- sentencepiece ---------------------------------------------------------------------------------------------------

SPM_TEXTS = ["Hello world", "the quick brown fox", "fox 123 über café", "naïve\nstraße", "trailing  ",
             "日本 😀 unseen characters use byte fallback", "a  b   c"]


@pytest.fixture(scope="module")
def spm_model(tmp_path_factory) -> Path:
    """A tiny BPE sentencepiece model trained like Llama's: identity normalization, byte fallback."""
    directory = tmp_path_factory.mktemp("spm")
    rng = random.Random(0)
    words = "the quick brown fox jumps over lazy dog hello world token mill engine café naïve 12 345 über straße"
    lines = [" ".join(rng.choice(words.split()) for _ in range(12)) for _ in range(2000)]
    (directory / "corpus.txt").write_text("\n".join(lines), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(directory / "corpus.txt"), model_prefix=str(directory / "m"), vocab_size=400, model_type="bpe",
        byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        character_coverage=1.0, split_digits=True, unk_id=0, bos_id=1, eos_id=2, minloglevel=2)
    return directory / "m.model"


@pytest.fixture(scope="module")
def spm_dir(spm_model, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("spm-dir")
    (directory / "tokenizer.model").write_bytes(spm_model.read_bytes())
    (directory / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": {"content": "<s>", "special": True}, "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "chat_template": [
            {"name": "default", "template": "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{% endfor %}"},
            {"name": "tool_use", "template": "{{ tools | length }} tools"}]}))
    return directory


@pytest.mark.parametrize("text", SPM_TEXTS + ["  leading spaces", ""])
def test_sentencepiece_dir_matches_sentencepiece_plus_bos(spm_dir, spm_model, text):
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    tok = Tokenizer.from_dir(spm_dir)
    assert tok.encode(text) == [1] + sp.encode(text)
    assert tok.encode(text, add_special_tokens=False) == sp.encode(text)
    assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)) == text


def test_sentencepiece_dir_matches_transformers_llama_tokenizer(spm_dir, spm_model):
    # transformers cannot read tokenizer.model here (its converter needs protobuf, not installed), so we build
    # LlamaTokenizer the way that converter does: the vocabulary plus merges generated from the piece scores.
    # It uses a Metaspace pre-tokenizer that adds no dummy prefix before leading whitespace or after a special
    # token, unlike sentencepiece and llama.cpp, so those texts are covered by the sentencepiece test instead.
    from transformers import LlamaTokenizer
    from transformers.tokenization_utils_base import generate_merges
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    scores = {sp.id_to_piece(i): sp.get_score(i) for i in range(sp.get_piece_size())}
    hf = LlamaTokenizer(vocab=vocab, merges=generate_merges(vocab, scores), add_bos_token=True)
    tok = Tokenizer.from_dir(spm_dir)
    for text in SPM_TEXTS:
        assert tok.encode(text) == hf.encode(text)
        assert tok.decode(tok.encode(text)) == hf.decode(hf.encode(text), skip_special_tokens=True)


def test_sentencepiece_special_tokens_in_text_become_single_ids(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    ids = tok.encode("fox</s>dog", add_special_tokens=False)
    assert ids.count(2) == 1 and 2 not in tok.encode("fox dog")
    assert tok.decode(ids) == tok.decode(tok.encode("fox", add_special_tokens=False)) + " dog"
    assert "</s>" in tok.decode(ids, skip_special_tokens=False)
    assert (tok.bos_token, tok.bos_token_id, tok.eos_token_ids, tok.vocab_size) == ("<s>", 1, {2}, 400)


def test_chat_template_list_in_tokenizer_config_picks_default_and_named(spm_dir):
    tok = Tokenizer.from_dir(spm_dir)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}]) == "[user] hi"
    assert tok.apply_chat_template([], tools=[{}, {}], chat_template="tool_use") == "2 tools"


def test_chat_template_jinja_file_overrides_tokenizer_config(spm_dir, tmp_path):
    for name in ("tokenizer.model", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((spm_dir / name).read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] | upper }}")
    assert Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}]) == "HI"


def _write_gguf(path: Path, model: str, tokens: list[str], scores: list[float], types: list[int]) -> Path:
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_unk_token_id(0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_gguf_sentencepiece_vocabulary_matches_sentencepiece(spm_model, tmp_path):
    # What llama.cpp's converter writes for a sentencepiece model: pieces, scores and types, but no merges.
    sp = spm.SentencePieceProcessor(model_file=str(spm_model))
    n = sp.get_piece_size()
    kinds = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 6 if sp.is_byte(i) else 1 for i in range(n)]
    path = _write_gguf(tmp_path / "spm.gguf", "llama", [sp.id_to_piece(i) for i in range(n)],
                       [sp.get_score(i) for i in range(n)], kinds)
    tok = Tokenizer.from_gguf(path)
    assert tok.add_bos_token  # llama.cpp's default for sentencepiece vocabularies without the flag
    for text in SPM_TEXTS + ["  leading spaces", ""]:
        assert tok.encode(text) == [1] + sp.encode(text)
        assert tok.decode(tok.encode(text)) == text


# ---- errors --------------------------------------------------------------------------------------------------------

def test_missing_directory_is_named_in_the_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        Tokenizer.from_dir(tmp_path / "nope")


def test_directory_without_tokenizer_files_is_rejected(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=str(tmp_path)):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_json_names_the_file(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", "vocab": 3}}')
    with pytest.raises(ValueError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(spm_dir, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes((spm_dir / "tokenizer.model").read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(ValueError, match="tokenizer_config.json"):
        Tokenizer.from_dir(tmp_path)


def test_corrupt_sentencepiece_model_names_the_file(tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)


def test_unsupported_gguf_tokenizer_model_is_named(tmp_path):
    path = _write_gguf(tmp_path / "bert.gguf", "bert", ["[UNK]", "[CLS]", "[SEP]", "a"], [0.0] * 4, [2, 3, 3, 1])
    with pytest.raises(ValueError, match="tokenizer.ggml.model 'bert'"):
        Tokenizer.from_gguf(path)


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        Tokenizer.from_gguf(tmp_path / "missing.gguf")
