"""Retrieval-augmented generation: documents chunked (chunker), embedded (models/bert.py) and stored in a faiss
index on disk (index), and retrieved chunks put into a chat with citations (grounding). The CLI builds indexes
(`tokenmill rag index`); the server searches one for chat requests that ask (`--rag-index`, `"rag": true`).

    from rag import Index, SentenceEncoder, ground
    index = Index.open("out/index", SentenceEncoder())
    hits = index.search(["How do I make a tuple?"], k=4)[0]
    messages = ground([{"role": "user", "content": "How do I make a tuple?"}], hits)  # then LLM.chat([messages])
"""
from models.bert import SentenceEncoder
from rag.chunker import Chunk, ChunkSettings
from rag.grounding import citations, ground
from rag.index import Hit, Index

__all__ = ["Index", "Hit", "Chunk", "ChunkSettings", "SentenceEncoder", "ground", "citations"]
