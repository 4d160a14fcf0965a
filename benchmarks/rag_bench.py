"""Retrieval-augmented generation on the Python docs (the `python3.11-doc` sources that `make data` unpacks):
writes benchmarks/results/rag.md.

    .venv/bin/python benchmarks/rag_bench.py [--docs DIR]   (default: the sources under data/downloads)

1. Retrieval: the Python FAQ's questions searched in an index of the FAQ, the tutorial and the language reference;
   a question is found when a chunk of its own FAQ answer is among the top k (recall@1, recall@5, MRR@10), for
   several chunk sizes, with and without the section heading embedded with the chunk.
2. End to end with the default chat model: questions whose answers the indexed docs state
   (benchmarks/rag_questions.json, each with the sentence that holds the fact), answered at temperature 0 without
   and with rag; counts the answers that contain the fact, and checks every citation: its offsets give back its
   text, and whether the chunk it cites holds the fact's sentence.
"""
import argparse
import datetime
import json
import platform
import re
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine import LLM, SamplingParams  # noqa: E402
from models.bert import SentenceEncoder  # noqa: E402
from rag.chunker import ChunkSettings, read_document  # noqa: E402
from rag.grounding import cite, cited_numbers, ground  # noqa: E402
from rag.index import Index  # noqa: E402
from training.sources import faq_pairs, rst_plain  # noqa: E402

DOCS = "data/downloads/python3.11-doc/usr/share/doc/python3.11/html/_sources"
SECTIONS = ("faq", "tutorial", "reference")
CONFIGS = [ChunkSettings(256, 32, True), ChunkSettings(256, 32, False), ChunkSettings(128, 16, True),
           ChunkSettings(128, 16, False)]
QUESTIONS = Path(__file__).parent / "rag_questions.json"


def label(c: ChunkSettings) -> str:
    return f"{c.max_tokens} tokens, overlap {c.overlap_tokens}, {'heading + text' if c.with_title else 'text only'}"


def retrieval(index: Index, docs: Path) -> dict:
    queries = [(str((path).resolve()), q) for path in sorted((docs / "faq").glob("*.rst.txt"))
               for q, _ in faq_pairs(path.read_text(encoding="utf-8"))]
    results = index.search([q for _, q in queries], k=10)
    ranks = []
    for (source, question), hits in zip(queries, results):
        found = [i for i, h in enumerate(hits) if h.chunk.source == source and rst_plain(h.chunk.title) == question]
        ranks.append(found[0] + 1 if found else None)
    n = len(ranks)
    return {"questions": n, "recall@1": sum(r == 1 for r in ranks if r) / n,
            "recall@5": sum(r <= 5 for r in ranks if r) / n, "mrr@10": sum(1 / r for r in ranks if r) / n}


def end_to_end(index: Index, k: int) -> dict:
    rows = json.loads(QUESTIONS.read_text())
    llm = LLM("default", kv_cache_memory="512MiB")
    params = SamplingParams(temperature=0, max_tokens=64)
    plain = [o.outputs[0].text for o in llm.chat([[{"role": "user", "content": r["question"]}] for r in rows],
                                                   params, use_tqdm=False)]
    hits = index.search([r["question"] for r in rows], k)
    grounded = [o.outputs[0].text for o in llm.chat(
        [ground([{"role": "user", "content": r["question"]}], h) for r, h in zip(rows, hits)], params,
        use_tqdm=False)]
    right = lambda text, row: re.search(row["accept"], text, re.I) is not None  # noqa: E731
    cited = dict(own=0, answers=0, total=0, exact=0, quoted=0, holding=0)
    fact_retrieved, examples = 0, []
    for row, h, answer in zip(rows, hits, grounded):
        cited["own"] += bool(cited_numbers(answer, len(h)))
        marked, listed = cite(answer, h)  # what the server returns: the model's marks, or those of what it quotes
        cited["answers"] += bool(cited_numbers(marked, len(h)))
        evidence = " ".join(row["evidence"].split())
        fact_retrieved += any(evidence in " ".join(x.chunk.text.split()) for x in h)
        for c in listed:
            if not c["cited"]:
                continue
            at_offsets = read_document(Path(c["source"]))[c["start"]:c["end"]]
            cited["total"] += 1
            cited["exact"] += at_offsets == c["text"]
            cited["quoted"] += bool(c["quotes"]) and all(q in at_offsets for q in c["quotes"])
            cited["holding"] += evidence in " ".join(c["text"].split())
        if len(examples) < 4:
            examples.append((row["question"], marked.strip()))
    return {"questions": len(rows), "plain_right": sum(right(a, r) for a, r in zip(plain, rows)),
            "rag_right": sum(right(a, r) for a, r in zip(grounded, rows)), "fact_retrieved": fact_retrieved,
            "cited": cited, "examples": examples}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", default=DOCS)
    parser.add_argument("--out-dir", default="out/rag")
    parser.add_argument("--top-k", type=int, default=4)
    parser.add_argument("--results", default=str(Path(__file__).parent / "results" / "rag.md"))
    args = parser.parse_args()
    docs, out = Path(args.docs), Path(args.out_dir)
    encoder = SentenceEncoder()
    table, chosen = [], None
    for i, settings in enumerate(CONFIGS):
        start = time.perf_counter()
        index = Index(out / f"index_{i}", encoder, settings)
        index.update([str(docs / s) for s in SECTIONS])
        index.save()
        seconds = time.perf_counter() - start
        scores = retrieval(index, docs)
        table.append((settings, len(index), seconds, scores))
        print(label(settings), len(index), f"{seconds:.0f} s", scores, flush=True)
        if settings == ChunkSettings():
            chosen = index
    e2e = end_to_end(chosen, args.top_k)
    print(e2e, flush=True)

    n = table[0][3]["questions"]
    lines = [f"# Retrieval-augmented generation ({datetime.date.today()}, {platform.machine()}, "
             f"{torch.get_num_threads()} threads)", "",
             f"`python benchmarks/rag_bench.py --docs {args.docs}`: all-MiniLM-L6-v2 embeddings (ours, equal to "
             "sentence-transformers'), a faiss inner-product index over the Python 3.11 docs' "
             f"{', '.join(SECTIONS)} sources.", "",
             f"## Retrieval: the {n} FAQ questions, found when a chunk of their own answer is in the top k", "",
             "| chunking | chunks | index time (s) | recall@1 | recall@5 | MRR@10 |", "|---|---|---|---|---|---|"]
    for settings, count, seconds, s in table:
        lines.append(f"| {label(settings)} | {count} | {seconds:.0f} | {s['recall@1']:.3f} | {s['recall@5']:.3f} | "
                     f"{s['mrr@10']:.3f} |")
    q, c = e2e["questions"], e2e["cited"]
    lines += ["", f"## End to end: {q} questions on facts the indexed docs state, default model (SmolLM2-135M-"
              f"Instruct), temperature 0, top {args.top_k} chunks ({label(ChunkSettings())})", "",
              "| | count |", "|---|---|",
              f"| answers with the right fact, without rag | {e2e['plain_right']} / {q} |",
              f"| answers with the right fact, with rag | {e2e['rag_right']} / {q} |",
              f"| questions whose fact sentence was among the retrieved chunks | {e2e['fact_retrieved']} / {q} |",
              f"| rag answers in which the model itself cites a source as [n] | {c['own']} / {q} |",
              f"| rag answers that cite a source, with the server's marks for quoted sources | {c['answers']} / {q} |",
              f"| citations whose offsets give back the cited chunk's text | {c['exact']} / {c['total']} |",
              f"| citations whose quotes (the answer's words, 4+ in a row) stand in the chunk at those offsets | "
              f"{c['quoted']} / {c['total']} |",
              f"| citations whose chunk holds the fact's sentence | {c['holding']} / {c['total']} |", "",
              "Examples (with rag):", ""]
    lines += [f"- {question} → {answer!r}" for question, answer in e2e["examples"]]
    text = "\n".join(lines) + "\n"
    print(text)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
