"""What the server adds for retrieval: the sentence-embedding model behind /v1/embeddings and, with --rag-index,
the index a chat request searches when it asks for `rag` (its messages grounded in the top chunks, the answer's
citations returned in a `citations` field)."""
import asyncio
import base64
import logging
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from models.bert import SentenceEncoder
from rag.grounding import RagOptions, cite, citations, ground, last_user_text
from rag.index import Hit, Index
from server.errors import APIError
from server.protocol import EmbeddingRequest

logger = logging.getLogger(__name__)
MAX_INPUTS = 2048  # as OpenAI's embeddings endpoint


@dataclass
class Retrieval:
    encoder: SentenceEncoder
    index: Index | None = None
    # one forward at a time: the encoder is shared by every request and torch runs it on all cores anyway
    lock: threading.Lock = field(default_factory=threading.Lock)

    @classmethod
    def load(cls, embedding_model: str, rag_index: str | None) -> "Retrieval":
        encoder = SentenceEncoder(embedding_model)
        index = Index.open(rag_index, encoder) if rag_index else None
        if index is not None:
            logger.info("rag index %s: %d chunks from %d files", rag_index, len(index), len(index.files))
        return cls(encoder, index)

    def _embed(self, inputs: list[list[int]]):
        with self.lock:
            return self.encoder.embed_ids(inputs)

    async def embeddings(self, req: EmbeddingRequest) -> dict:
        if req.model is not None and req.model != self.encoder.name:
            raise APIError(404, f"the embedding model {req.model!r} does not exist; this server embeds with "
                                f"{self.encoder.name!r}", param="model", code="model_not_found")
        inputs = [req.input] if isinstance(req.input, str) or (req.input and isinstance(req.input[0], int)) \
            else req.input
        if not inputs:
            raise APIError(400, "input must not be empty", param="input", code="invalid_value")
        if len(inputs) > MAX_INPUTS:
            raise APIError(400, f"at most {MAX_INPUTS} inputs per request, got {len(inputs)}", param="input",
                           code="invalid_value")
        if any(not t for t in inputs):
            raise APIError(400, "input cannot contain an empty string or an empty list", param="input",
                           code="invalid_value")
        if req.dimensions is not None and req.dimensions != self.encoder.dimension:
            raise APIError(400, f"{self.encoder.name} gives {self.encoder.dimension} dimensions; dimensions="
                                f"{req.dimensions} is not supported", param="dimensions", code="invalid_value")
        encoded = await asyncio.to_thread(self._tokenize, inputs, req.truncate_prompt_tokens)
        vectors, counts = await asyncio.to_thread(self._embed, encoded)
        vectors, tokens = vectors.numpy(), sum(counts)
        base64_out = req.encoding_format == "base64"
        data = [{"object": "embedding", "index": i,
                 "embedding": base64.b64encode(v.astype("<f4", copy=False).tobytes()).decode() if base64_out
                 else v.tolist()} for i, v in enumerate(vectors)]
        return {"object": "list", "data": data, "model": self.encoder.name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    def _tokenize(self, inputs: list[str | list[int]], truncate: int | None) -> list[list[int]]:
        """Each input as the model reads it; over the model's limit a 400, unless `truncate` asks to cut it."""
        enc, vocab = self.encoder, self.encoder.tokenizer.get_vocab_size()
        limit = enc.max_tokens if truncate in (None, -1) else min(truncate, enc.max_tokens)
        result = []
        for i, item in enumerate(inputs):
            if isinstance(item, str):
                ids = enc.token_ids(item)
            else:
                if any(not 0 <= t < vocab for t in item):
                    raise APIError(400, f"input[{i}]: token ids must be in [0, {vocab}) ({enc.name}'s vocabulary)",
                                   param="input", code="invalid_value")
                ids = list(item)
            specials = len(enc.with_specials([]))
            if len(ids) + specials > limit and truncate is None:
                raise APIError(400, f"input[{i}] has {len(ids) + specials} tokens; {enc.name} reads at most "
                                    f"{enc.max_tokens} (set truncate_prompt_tokens to cut longer inputs)",
                               param="input", code="context_length_exceeded")
            result.append(enc.with_specials(ids[:max(limit - specials, 0)]))
        return result

    async def ground(self, messages: list[dict], rag) -> tuple[list[dict], list[Hit]]:
        """(messages with the sources put in, the hits) for a chat request's `rag` options."""
        if self.index is None:
            raise APIError(400, "rag needs the server to run with --rag-index INDEX", param="rag",
                           code="invalid_value")
        options = RagOptions(top_k=rag.top_k, query=rag.query)
        try:
            query = options.query or last_user_text(messages)
        except ValueError as e:
            raise APIError(400, str(e), param="rag", code="invalid_value") from None
        hits = await asyncio.to_thread(self._search, query, options.top_k)
        return ground(messages, hits, options.max_chars), hits

    def _search(self, query: str, k: int) -> list[Hit]:
        with self.lock:
            return self.index.search([query], k)[0]


def cited_response(body: dict, hits: list[Hit]) -> dict:
    """A chat response with citation marks in each answer (rag.grounding.cite) and the `citations` field, which
    follows the first choice."""
    found = []
    for choice in body["choices"]:
        marked, listed = cite(choice["message"].get("content") or "", hits)
        if choice["message"].get("content"):
            choice["message"]["content"] = marked
        found.append(listed)
    return {**body, "citations": found[0]}


async def cited_stream(events: AsyncIterator[dict | str], hits: list[Hit]) -> AsyncIterator[dict | str]:
    """The first chunk carries the sources; the chunk that finishes choice 0 gets its citation marks (if the
    server adds them) and carries the sources again, with the ones the answer cites and quotes."""
    answer, first = "", True
    async for event in events:
        choices = event.get("choices") if isinstance(event, dict) else None
        if choices:
            for c in choices:
                if c["index"] != 0:
                    continue
                answer += c["delta"].get("content") or ""
                if c.get("finish_reason"):
                    marked, listed = await asyncio.to_thread(cite, answer, hits)
                    if len(marked) > len(answer):
                        c["delta"]["content"] = (c["delta"].get("content") or "") + marked[len(answer):]
                    event = {**event, "citations": listed}
                    first = False
            if first:
                event = {**event, "citations": citations(hits)}
                first = False
        yield event
