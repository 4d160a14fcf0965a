"""Rebuild a tokenizer from GGUF metadata (`tokenizer.ggml.*`) as a `tokenizers` pipeline.

Byte-level BPE vocabularies (`gpt2`) get the pre-tokenizer that `tokenizer.ggml.pre` names; sentencepiece
vocabularies (`llama`) become BPE with byte fallback and sentencepiece's dummy-prefix handling.
"""
import logging

import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers

logger = logging.getLogger(__name__)

SPACE = "\u2581"  # sentencepiece's visible space

# GGUF tokenizer.ggml.token_type values (llama.cpp's llama_token_type)
NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre -> how text is split before byte-level BPE. Names follow llama.cpp's groups.
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                 r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2_SPLIT = _LLAMA3_SPLIT.replace(r"\p{N}{1,3}", r"\p{N}")
_REGEX_PRE = {name: _LLAMA3_SPLIT for name in ("llama-bpe", "llama3", "llama-v3", "falcon3", "smaug-bpe", "dbrx")}
_REGEX_PRE.update({name: _QWEN2_SPLIT for name in ("qwen2", "deepseek-r1-qwen", "megrez")})
# Single digits first, then the GPT-2 split: what the SmolLM2 tokenizer.json and llama.cpp do for these.
_DIGITS_PRE = {"smollm", "starcoder", "refact", "codeshell", "exaone", "minerva", "command-r"}
_GPT2_PRE = {None, "default", "gpt-2", "gpt2"}


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character map used to spell byte-level BPE tokens."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


def _derive_merges(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary: a pair merges iff its concatenation is a piece,
    earlier the higher that piece scores. This reproduces sentencepiece's BPE encoding."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for token, i in normal.items():
        for cut in range(1, len(token)):
            left, right = token[:cut], token[cut:]
            if left in normal and right in normal:
                ranked.append((-scores[i], normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _added_tokens(tokens: list[str], types: list[int]) -> list[AddedToken]:
    """Control and unknown tokens become special added tokens, user-defined ones plain added tokens:
    either way they are matched whole in the text instead of being cut into pieces."""
    return [AddedToken(tok, normalized=False, special=kind != _USER_DEFINED)
            for tok, kind in zip(tokens, types) if kind in (_CONTROL, _UNKNOWN, _USER_DEFINED)]


def byte_level_bpe(tokens: list[str], types: list[int], merges: list[str],
                         pre: str | None) -> tokenizers.Tokenizer:
    spelling = _byte_alphabet()
    alphabet = set(spelling.values())
    vocab: dict[str, int] = {}
    for i, (tok, kind) in enumerate(zip(tokens, types)):
        # Normal tokens should already be spelled in the byte alphabet; respell any that are not.
        if kind == NORMAL and not set(tok) <= alphabet:
            tok = "".join(spelling[b] for b in tok.encode("utf-8"))
        vocab.setdefault(tok, i)
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    backend = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, pairs, fuse_unk=False, byte_fallback=False))
    if pre in _DIGITS_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    elif pre in _REGEX_PRE:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_REGEX_PRE[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        if pre not in _GPT2_PRE:
            logger.warning("unknown GGUF tokenizer.ggml.pre %r: splitting text as GPT-2 does", pre)
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(_added_tokens(tokens, types))
    return backend


def sentencepiece_bpe(tokens: list[str], types: list[int], scores: list[float] | None,
                            merges: list[str] | None, add_prefix: bool) -> tokenizers.Tokenizer:
    vocab: dict[str, int] = {}
    for i, tok in enumerate(tokens):
        vocab.setdefault(tok, i)
    if merges:
        pairs = [tuple(m.split(" ", 1)) for m in merges]
    elif scores:
        pairs = _derive_merges(tokens, scores, types)
    else:
        raise ValueError("GGUF sentencepiece vocabulary has neither tokenizer.ggml.merges nor tokenizer.ggml.scores")
    unk = next((t for t, kind in zip(tokens, types) if kind == _UNKNOWN), None)
    model = tokenizers.models.BPE(vocab, pairs, unk_token=unk, fuse_unk=True, byte_fallback=True)
    backend = tokenizers.Tokenizer(model)
    # Prepend + Replace (rather than Metaspace) adds the dummy prefix even before leading spaces, as sentencepiece does.
    replace = normalizers.Replace(" ", SPACE)
    backend.normalizer = normalizers.Sequence([normalizers.Prepend(SPACE), replace]) if add_prefix else replace
    steps = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    backend.decoder = decoders.Sequence(steps + [decoders.Strip(" ", 1, 0)] if add_prefix else steps)
    backend.add_special_tokens(_added_tokens(tokens, types))
    return backend
