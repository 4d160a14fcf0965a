"""Constrained decoding with xgrammar: compile a request's StructuredOutputsParams to a grammar (cached), keep one
matcher per sequence, and mask the logits of constrained rows so that only tokens the grammar allows can be
sampled. Unconstrained rows of the same batch are left alone."""
import json
from functools import lru_cache
from typing import Any

import torch

from engine.sampling_params import StructuredOutputsParams

# JSON-schema keywords xgrammar 0.2.8 accepts but does not enforce (measured: outputs violating them pass), so a
# schema using them could yield JSON that fails it. Requests naming them are refused instead.
_UNENFORCED = {"not", "if", "then", "else", "contentEncoding", "contentMediaType", "contentSchema",
               "unevaluatedItems", "$dynamicRef", "$recursiveRef"}
_FORMATS = {"email", "date", "time", "date-time", "duration", "ipv4", "ipv6", "hostname", "uuid", "uri",
            "uri-reference", "uri-template", "json-pointer", "relative-json-pointer"}
_SCHEMA_MAPS = {"properties", "patternProperties", "$defs", "definitions", "dependentSchemas"}
_DATA = {"enum", "const", "default", "examples", "required", "dependentRequired", "description", "title"}


def _xgrammar():
    """xgrammar, imported on first use: an engine serving no constrained request never needs it."""
    import xgrammar
    return xgrammar


def check_json_schema(schema: str | dict[str, Any]) -> dict[str, Any]:
    """The schema as a dict, or a ValueError saying why it is not a valid JSON schema."""
    if isinstance(schema, str):
        try:
            schema = json.loads(schema)
        except json.JSONDecodeError as e:
            raise ValueError(f"the JSON schema is not valid JSON: {e}") from None
    if not isinstance(schema, (dict, bool)):
        raise ValueError(f"a JSON schema must be an object, got {type(schema).__name__}")
    import jsonschema
    try:
        jsonschema.Draft202012Validator.check_schema(schema)
    except jsonschema.SchemaError as e:
        where = "/".join(str(p) for p in e.absolute_path) or "the top level"
        raise ValueError(f"not a valid JSON schema: {e.message} (at {where})") from None
    return schema


def check_enforceable(schema: Any, where: str = "#") -> None:
    """A ValueError when the schema uses a feature that constrained decoding cannot enforce."""
    if not isinstance(schema, dict):
        return
    for key, value in schema.items():
        at = f"{where}/{key}"
        if key in _UNENFORCED:
            raise ValueError(f"the JSON-schema keyword {key!r} (at {at}) is not supported by constrained decoding")
        if key == "allOf" and len(value) > 1:
            raise ValueError(f"'allOf' with several schemas (at {at}) is not supported by constrained decoding; "
                             "merge them into one schema")
        if key == "format" and value not in _FORMATS:
            raise ValueError(f"the string format {value!r} (at {at}) is not supported by constrained decoding; "
                             f"supported: {', '.join(sorted(_FORMATS))}")
        if key in _DATA:
            continue
        if key in _SCHEMA_MAPS and isinstance(value, dict):
            for name, sub in value.items():
                check_enforceable(sub, f"{at}/{name}")
        elif isinstance(value, dict):
            check_enforceable(value, at)
        elif isinstance(value, list):
            for i, sub in enumerate(value):
                check_enforceable(sub, f"{at}/{i}")


class Grammars:
    """The engine's grammar side: compiles (with xgrammar's cache), makes matchers, masks logits."""

    def __init__(self, tokenizer, vocab_size: int, eos_token_ids: set[int]):
        self.tokenizer = tokenizer
        self.eos_token_ids = eos_token_ids
        self.vocab_size = vocab_size
        self._compiler = None
        # the server compiles a request's constraint to check it, the engine again when it queues the request:
        # the second time (and for every later request with the same constraint) is a lookup, checks included
        self._compiled = lru_cache(maxsize=256)(self._compile)

    @property
    def compiler(self):
        """xgrammar's compiler for this vocabulary, built with the first constrained request."""
        if self._compiler is None:
            xgr = _xgrammar()
            vocab, vocab_type, add_prefix_space = self.tokenizer.grammar_vocab()
            vocab = vocab[:self.vocab_size] + [""] * (self.vocab_size - len(vocab))
            kinds = {"byte_level": xgr.VocabType.BYTE_LEVEL, "byte_fallback": xgr.VocabType.BYTE_FALLBACK,
                     "raw": xgr.VocabType.RAW}
            info = xgr.TokenizerInfo(vocab, kinds[vocab_type], vocab_size=self.vocab_size,
                                     stop_token_ids=sorted(self.eos_token_ids), add_prefix_space=add_prefix_space)
            self._compiler = xgr.GrammarCompiler(info, max_threads=1)
        return self._compiler

    def compile(self, params: StructuredOutputsParams):
        """Raises ValueError, naming the problem, for a constraint that cannot be compiled or enforced."""
        return self._compiled(*params.key)

    def _compile(self, kind: str, text: str):
        try:
            if kind == "json":
                schema = check_json_schema(text)
                check_enforceable(schema)
                return self.compiler.compile_json_schema(text, any_whitespace=False)
            if kind == "json_object":
                return self.compiler.compile_json_schema('{"type": "object"}', any_whitespace=False,
                                                         strict_mode=False)
            if kind == "regex":
                return self.compiler.compile_regex(text)
            if kind == "choice":
                return self.compiler.compile_grammar(
                    "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in json.loads(text)))
            if kind == "grammar":
                return self.compiler.compile_grammar(text)
            return self.compiler.compile_structural_tag(text)
        except (RuntimeError, ValueError, TypeError) as e:  # xgrammar raises RuntimeError with a C++ location
            message = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
            raise ValueError(f"cannot compile the {kind} constraint: {_without_location(message)}") from None

    def matchers(self, params: StructuredOutputsParams | None, n: int) -> list[Any]:
        """One matcher per sequence of a request (each of its n samples walks the grammar on its own)."""
        if params is None:
            return [None] * n
        grammar = self.compile(params)
        return [_xgrammar().GrammarMatcher(grammar) for _ in range(n)]

    def mask(self, logits: torch.Tensor, matchers: list[Any]) -> None:
        """Set to -inf, in place, the logits of tokens that each row's matcher forbids (rows without one stay)."""
        rows = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not rows:
            return
        xgr = _xgrammar()
        bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        for i in rows:
            matchers[i].fill_next_token_bitmask(bitmask, i)
        xgr.apply_token_bitmask_inplace(logits, bitmask.to(logits.device), vocab_size=self.vocab_size,
                                        indices=rows)


def _without_location(message: str) -> str:
    """xgrammar's C++ errors start with "[time] /path/file.cc:line: "; the user needs only the reason."""
    if message.startswith("[") and ".cc:" in message:
        return message.split(": ", 1)[-1]
    return message
