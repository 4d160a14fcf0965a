"""Stage `tokenizer`: train a sentencepiece BPE tokenizer (byte fallback, ChatML special tokens) on text files and
write it as a Hugging Face tokenizer directory: tokenizer.model, the same vocabulary as tokenizer.json (what
transformers and our server prefer), tokenizer_config.json with the chat template, special_tokens_map.json."""
import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import sentencepiece as spm

from text.gguf_tokenizer import sentencepiece_bpe
from training.data import read_documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
CHAT_TEMPLATE = ("{{ bos_token }}{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
                 "{{ message['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
# GGUF token types, which sentencepiece_bpe takes
_NORMAL, _UNKNOWN, _CONTROL, _UNUSED, _BYTE = 1, 2, 3, 5, 6


@dataclass
class TokenizerSettings:
    data: list[str] = field(default_factory=list)  # text / JSONL files or glob patterns
    out_dir: str = "out/tokenizer"
    vocab_size: int = 4096
    max_sentence_length: int = 8192


def train_tokenizer(s: TokenizerSettings) -> Path:
    if not s.data:
        raise ValueError("setting data: give the text files to train on")
    out = Path(s.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        lines = Path(tmp) / "lines.txt"
        with open(lines, "w", encoding="utf-8") as f:
            for doc in read_documents(s.data):
                for line in doc.splitlines():
                    if line.strip():
                        f.write(line[:s.max_sentence_length] + "\n")
        spm.SentencePieceTrainer.train(
            input=str(lines), model_prefix=str(out / "tokenizer"), model_type="bpe", vocab_size=s.vocab_size,
            byte_fallback=True, character_coverage=0.9995, split_digits=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2,
            pad_id=-1, unk_piece=UNK, bos_piece=BOS, eos_piece=EOS, control_symbols=[IM_START, IM_END],
            max_sentence_length=s.max_sentence_length, num_threads=1, minloglevel=2)
    (out / "tokenizer.vocab").unlink(missing_ok=True)
    write_hf_files(out)
    return out


def write_hf_files(out: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    size = sp.get_piece_size()
    tokens = [sp.id_to_piece(i) for i in range(size)]
    types = [_UNKNOWN if sp.is_unknown(i) else _CONTROL if sp.is_control(i) else _BYTE if sp.is_byte(i)
             else _UNUSED if sp.is_unused(i) else _NORMAL for i in range(size)]
    backend = sentencepiece_bpe(tokens, types, [sp.get_score(i) for i in range(size)], None, add_prefix=True)
    backend.save(str(out / "tokenizer.json"))
    specials = {t: i for i, t in enumerate(tokens) if types[i] in (_UNKNOWN, _CONTROL)}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": BOS, "eos_token": IM_END, "unk_token": UNK,
        "pad_token": UNK, "add_bos_token": True, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "model_max_length": 1_000_000,
        "added_tokens_decoder": {str(i): {"content": t, "special": True, "normalized": False, "lstrip": False,
                                          "rstrip": False, "single_word": False} for t, i in specials.items()},
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
    (out / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": BOS, "eos_token": IM_END, "unk_token": UNK, "pad_token": UNK}, indent=2) + "\n")
