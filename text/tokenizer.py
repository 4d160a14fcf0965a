"""One tokenizer interface over a `tokenizer.json`, a sentencepiece `tokenizer.model`, or GGUF metadata."""
import json
import logging
import re
from pathlib import Path
from typing import Any

import tokenizers
from sentencepiece import SentencePieceProcessor
from tokenizers import AddedToken, processors

from text.gguf_tokenizer import NORMAL, SPACE, byte_level_bpe, sentencepiece_bpe
from text.tool_prompt import template_handles_tools, with_tools_in_prompt

logger = logging.getLogger(__name__)

_NAMED_SPECIALS = ("bos_token", "eos_token", "unk_token", "pad_token")



def _token_text(value: Any) -> str | None:
    """A special token from tokenizer_config: a string, or a serialized AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e


def _template_processor(bos: tuple[str, int] | None, eos: tuple[str, int] | None) -> processors.TemplateProcessing:
    def sequence(name: str, type_id: int) -> str:
        parts = [f"{bos[0]}:{type_id}"] if bos else []
        parts.append(f"${name}:{type_id}")
        return " ".join(parts + [f"{eos[0]}:{type_id}"] if eos else parts)

    return processors.TemplateProcessing(single=sequence("A", 0), pair=f"{sequence('A', 0)} {sequence('B', 1)}",
                                         special_tokens=[t for t in (bos, eos) if t])


class _SentencePieceBackend:
    """A `tokenizer.model` run by the sentencepiece library, with added/special tokens split out of the text first.

    Text between special tokens is encoded by sentencepiece as-is (dummy prefix included), which is what the model
    was trained on and what llama.cpp does; decoding follows the Llama decoder (byte fallback, one leading space
    stripped at the very start)."""

    def __init__(self, model_file: Path, added: dict[str, tuple[int, bool]], named_specials: list[str]):
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(model_file))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_file} is not a valid sentencepiece model: {e}") from e
        self.size = self.sp.get_piece_size()
        self.added = {self.sp.id_to_piece(i): (i, True) for i in range(self.size)
                      if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for token in named_specials:  # e.g. a pad token that is an ordinary piece: still special
            i = self.sp.piece_to_id(token)
            if self.sp.id_to_piece(i) == token:
                self.added.setdefault(token, (i, True))
        self.added.update(added)
        self.added_by_id = {i: content for content, (i, _) in self.added.items()}
        self.special_ids = {i for i, special in self.added.values() if special}
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True) if t)
        self._split = re.compile(f"({pattern})") if pattern else None
        self._strips_prefix = "".join(self.sp.encode("a", out_type=str)).startswith(SPACE)

    @property
    def vocab_size(self) -> int:
        return max(self.size, max(self.added_by_id, default=-1) + 1)

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if part in self.added:
                ids.append(self.added[part][0])
            elif part:
                ids.extend(self.sp.encode(part))
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
        out = bytearray()
        for i in ids:
            if skip_special_tokens and i in self.special_ids:
                continue
            if i in self.added_by_id:
                out += self.added_by_id[i].encode()
            elif 0 <= i < self.size:
                piece = self.sp.id_to_piece(i)
                if self.sp.is_byte(i):
                    out.append(int(piece[3:-1], 16))  # "<0x0A>"
                else:
                    out += piece.replace(SPACE, " ").encode()
        text = out.decode("utf-8", errors="replace")
        return text[1:] if self._strips_prefix and text.startswith(" ") else text

    def id_to_token(self, i: int) -> str | None:
        if i in self.added_by_id:
            return self.added_by_id[i]
        return self.sp.id_to_piece(i) if 0 <= i < self.size else None

    def token_to_id(self, token: str) -> int | None:
        if token in self.added:
            return self.added[token][0]
        i = self.sp.piece_to_id(token)
        return None if i == self.sp.unk_id() and token != self.sp.id_to_piece(i) else i


class Tokenizer:
    """Encode/decode plus the special-token facts the engine needs (BOS/EOS, chat template)."""

    def __init__(self, backend: tokenizers.Tokenizer | _SentencePieceBackend, *, bos_token: str | None,
                 eos_token: str | None, add_bos_token: bool, add_eos_token: bool = False,
                 chat_template: str | None = None, chat_templates: dict[str, str] | None = None,
                 extra_eos_token_ids: set[int] = frozenset(), vocab_size: int | None = None):
        self._backend = backend
        self._sp = backend if isinstance(backend, _SentencePieceBackend) else None
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_token_id = self.token_to_id(bos_token) if bos_token else None
        self.eos_token_id = self.token_to_id(eos_token) if eos_token else None
        self.add_bos_token = add_bos_token and self.bos_token_id is not None
        self.add_eos_token = add_eos_token and self.eos_token_id is not None
        self.eos_token_ids = {i for i in {self.eos_token_id, *extra_eos_token_ids} if i is not None}
        self.chat_template = chat_template
        self.chat_templates = dict(chat_templates or {})
        own_size = backend.vocab_size if self._sp else backend.get_vocab_size(with_added_tokens=True)
        self.vocab_size = max(own_size, vocab_size or 0)

    # ---- loading -------------------------------------------------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """A Hugging Face tokenizer directory: `tokenizer.json` (preferred) or sentencepiece `tokenizer.model`."""
        root = Path(path)
        if not root.is_dir():
            raise FileNotFoundError(f"tokenizer directory not found: {root}")
        config = _read_json(root / "tokenizer_config.json") or {}
        specials_map = _read_json(root / "special_tokens_map.json") or {}
        named = {k: _token_text(config.get(k, specials_map.get(k))) for k in _NAMED_SPECIALS}
        added = {int(i): t for i, t in (config.get("added_tokens_decoder") or {}).items() if _token_text(t)}
        if (root / "tokenizer.json").is_file():
            backend, add_bos, add_eos = _load_tokenizer_json(root / "tokenizer.json", config, named, added)
        elif (root / "tokenizer.model").is_file():
            added_map = {_token_text(t): (i, bool(t.get("special", True))) for i, t in added.items()}
            backend = _SentencePieceBackend(root / "tokenizer.model", added_map, [t for t in named.values() if t])
            add_bos, add_eos = bool(config.get("add_bos_token", True)), bool(config.get("add_eos_token", False))
        else:
            raise FileNotFoundError(f"no tokenizer.json or tokenizer.model in {root}")
        default, named_templates = _load_chat_templates(root, config)
        extra_eos = (_read_json(root / "generation_config.json") or {}).get("eos_token_id")
        extra_eos = {extra_eos} if isinstance(extra_eos, int) else set(extra_eos or ())
        return cls(backend, bos_token=named["bos_token"], eos_token=named["eos_token"], add_bos_token=add_bos,
                   add_eos_token=add_eos, chat_template=default, chat_templates=named_templates,
                   extra_eos_token_ids=extra_eos)

    @classmethod
    def from_gguf(cls, source) -> "Tokenizer":
        """Rebuild the tokenizer a GGUF file describes in its `tokenizer.ggml.*` metadata."""
        from models.gguf_loader import open_gguf  # the gguf package: needed only for GGUF files
        reader = open_gguf(source) if isinstance(source, (str, Path)) else source

        def meta(key: str, default: Any = None) -> Any:
            field = reader.fields.get(key)
            return default if field is None else field.contents()

        kind, tokens = meta("tokenizer.ggml.model"), meta("tokenizer.ggml.tokens")
        if kind not in ("gpt2", "llama"):
            raise ValueError(f"unsupported GGUF tokenizer.ggml.model {kind!r}; supported: 'gpt2', 'llama'")
        if not tokens:
            raise ValueError("GGUF file has no tokenizer.ggml.tokens")
        types = meta("tokenizer.ggml.token_type") or [NORMAL] * len(tokens)
        merges = meta("tokenizer.ggml.merges")
        if kind == "gpt2":
            backend = byte_level_bpe(tokens, types, merges or [], meta("tokenizer.ggml.pre"))
        else:
            backend = sentencepiece_bpe(tokens, types, meta("tokenizer.ggml.scores"), merges,
                                              add_prefix=meta("tokenizer.ggml.add_space_prefix", True))

        def token(key: str) -> str | None:
            i = meta(f"tokenizer.ggml.{key}")
            return backend.id_to_token(i) if i is not None else None

        bos, eos = token("bos_token_id"), token("eos_token_id")
        # llama.cpp adds BOS for sentencepiece vocabularies unless the file says otherwise
        add_bos = bool(meta("tokenizer.ggml.add_bos_token", kind == "llama"))
        add_eos = bool(meta("tokenizer.ggml.add_eos_token", False))
        _set_bos_eos(backend, bos if add_bos else None, eos if add_eos else None)
        extra_eos = {meta(f"tokenizer.ggml.{k}_token_id") for k in ("eot", "eom")} - {None}
        templates = {k.removeprefix("tokenizer.chat_template."): meta(k) for k in reader.fields
                     if k.startswith("tokenizer.chat_template.")}
        return cls(backend, bos_token=bos, eos_token=eos, add_bos_token=add_bos, add_eos_token=add_eos,
                   chat_template=meta("tokenizer.chat_template"), chat_templates=templates,
                   extra_eos_token_ids=extra_eos, vocab_size=len(tokens))

    # ---- encode / decode ---------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        if self._sp is None:
            return self._backend.encode(text, add_special_tokens=add_special_tokens).ids
        ids = self._sp.encode(text)
        if add_special_tokens:
            ids = [self.bos_token_id] * self.add_bos_token + ids + [self.eos_token_id] * self.add_eos_token
        return ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        if self._sp is None:
            return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return self._sp.decode(ids, skip_special_tokens)

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def convert_ids_to_tokens(self, ids: list[int]) -> list[str | None]:
        return [self._backend.id_to_token(i) for i in ids]

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def save_pretrained(self, directory: str | Path) -> None:
        """tokenizer.json and tokenizer_config.json, e.g. for a tokenizer rebuilt from GGUF metadata. A
        sentencepiece-backed one is saved by copying its directory instead."""
        if self._sp is not None:
            raise ValueError("a sentencepiece-backed tokenizer is saved by copying its directory, not rebuilt")
        out = Path(directory)
        self._backend.save(str(out / "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": self.bos_token,
                  "eos_token": self.eos_token, "add_bos_token": self.add_bos_token,
                  "add_eos_token": self.add_eos_token, "chat_template": self.chat_template}
        (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")

    def grammar_vocab(self) -> tuple[list[str], str, bool]:
        """What a grammar engine needs to know which text each token spells: (token strings by id, how they spell
        bytes: "byte_level" (GPT-2 alphabet), "byte_fallback" (sentencepiece pieces with <0xNN> bytes) or "raw",
        whether a leading space is added to the text). Special tokens other than EOS spell nothing: a
        constrained answer must never contain them."""
        special = self.special_token_ids - self.eos_token_ids
        vocab = ["" if i in special else (self.id_to_token(i) or "") for i in range(self.vocab_size)]
        if self._sp is not None:
            return vocab, "byte_fallback", self._sp._strips_prefix
        spec = json.loads(self._backend.to_str())
        decoder = json.dumps(spec.get("decoder"))
        if '"ByteLevel"' in decoder:
            return vocab, "byte_level", False
        if '"ByteFallback"' in decoder:
            prepends = json.dumps([spec.get("normalizer"), spec.get("pre_tokenizer")], ensure_ascii=False)
            return vocab, "byte_fallback", SPACE in prepends
        return vocab, "raw", False

    @property
    def special_token_ids(self) -> set[int]:
        if self._sp is not None:
            return set(self._sp.special_ids)
        return {i for i, t in self._backend.get_added_tokens_decoder().items() if t.special}

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            tools: list[dict[str, Any]] | None = None, chat_template: str | None = None,
                            **kwargs: Any) -> str:
        """Render the conversation to prompt text. `chat_template` may be a template or the name of one."""
        template = self.chat_templates.get(chat_template, chat_template) if chat_template else self.chat_template
        if template is None and tools and "tool_use" in self.chat_templates:
            template = self.chat_templates["tool_use"]
        if not template:
            raise ValueError("this tokenizer has no chat template; pass chat_template=...")
        uses_tools = tools or any(isinstance(m, dict) and (m.get("role") == "tool" or m.get("tool_calls"))
                                  for m in messages)
        if uses_tools and not template_handles_tools(template):
            messages, tools = with_tools_in_prompt(messages, tools), None
        from text.chat_template import render_chat_template  # jinja2: needed only to render templates
        return render_chat_template(template, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                                    bos_token=self.bos_token, eos_token=self.eos_token, **kwargs)


# ---- helpers for the loaders --------------------------------------------------------------------------------------

def _set_bos_eos(backend: tokenizers.Tokenizer, bos: str | None, eos: str | None) -> None:
    """Make `encode(..., add_special_tokens=True)` add exactly these tokens (None: not that one)."""
    def with_id(token: str | None) -> tuple[str, int] | None:
        token_id = backend.token_to_id(token) if token else None
        return None if token_id is None else (token, token_id)

    backend.post_processor = _template_processor(with_id(bos), with_id(eos))


def _load_tokenizer_json(path: Path, config: dict, named: dict[str, str | None],
                         added: dict[int, dict]) -> tuple[tokenizers.Tokenizer, bool, bool]:
    try:
        backend = tokenizers.Tokenizer.from_file(str(path))
    except Exception as e:  # the Rust side raises a bare Exception on malformed files
        raise ValueError(f"{path} is not a valid tokenizer.json: {e}") from e
    # As transformers does: tokens from tokenizer_config and the named special tokens must exist as added tokens.
    known = {t.content for t in backend.get_added_tokens_decoder().values()}
    for _, t in sorted(added.items()):
        if t["content"] not in known:
            token = AddedToken(t["content"], single_word=t.get("single_word", False), lstrip=t.get("lstrip", False),
                               rstrip=t.get("rstrip", False), normalized=t.get("normalized", False),
                               special=t.get("special", False))
            (backend.add_special_tokens if token.special else backend.add_tokens)([token])
            known.add(t["content"])
    missing = [AddedToken(t, special=True, normalized=False)
               for t in dict.fromkeys(named.values()) if t and t not in known]
    if missing:
        backend.add_special_tokens(missing)
    # An explicit add_bos/eos flag (or no post-processor at all) rebuilds the post-processor, as transformers does.
    if "add_bos_token" in config or "add_eos_token" in config or backend.post_processor is None:
        add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        _set_bos_eos(backend, named["bos_token"] if add_bos else None, named["eos_token"] if add_eos else None)
    with_specials = backend.encode("a", add_special_tokens=True).ids
    plain = backend.encode("a", add_special_tokens=False).ids
    bos_id = backend.token_to_id(named["bos_token"]) if named["bos_token"] else None
    eos_id = backend.token_to_id(named["eos_token"]) if named["eos_token"] else None
    add_bos = bos_id is not None and with_specials[:1] == [bos_id] and plain[:1] != [bos_id]
    add_eos = eos_id is not None and with_specials[-1:] == [eos_id] and plain[-1:] != [eos_id]
    return backend, add_bos, add_eos


def _load_chat_templates(root: Path, config: dict) -> tuple[str | None, dict[str, str]]:
    """The default template and any named ones; chat_template.jinja/.json override tokenizer_config."""
    value = config.get("chat_template")
    if (root / "chat_template.json").is_file():
        value = (_read_json(root / "chat_template.json") or {}).get("chat_template", value)
    if (root / "chat_template.jinja").is_file():
        value = (root / "chat_template.jinja").read_text(encoding="utf-8")
    if isinstance(value, list):
        named = {t["name"]: t["template"] for t in value if isinstance(t, dict) and "name" in t and "template" in t}
        return named.get("default", next(iter(named.values()), None)), named
    return (value if isinstance(value, str) else None), {}
