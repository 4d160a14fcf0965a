"""Retrieved chunks into a chat: a system message with a grounding instruction and the numbered sources, and the
citations that come back with the answer (each chunk's source, offsets, score and text; which of them the answer
cites by number)."""
import re
from dataclasses import dataclass

from rag.index import Hit

INSTRUCTION = ("Answer the question using the numbered sources below. Quote the facts you use from them and cite "
               "each one by its number in brackets, like [1]. If the sources do not hold the answer, say so.")


@dataclass
class RagOptions:
    top_k: int = 4
    query: str | None = None  # what to search for; default: the last user message
    max_chars: int = 1500  # of each source's text put into the prompt


def last_user_text(messages: list[dict]) -> str:
    for m in reversed(messages):
        if m.get("role") == "user":
            content = m.get("content")
            if isinstance(content, list):  # content parts: the text ones
                content = " ".join(p.get("text", "") for p in content if isinstance(p, dict))
            if isinstance(content, str) and content.strip():
                return content
    raise ValueError("rag: there is no user message to search for; give rag.query")


def ground(messages: list[dict], hits: list[Hit], max_chars: int = 1500) -> list[dict]:
    """The messages with the sources put in front: one system message, merged with the request's own if any."""
    sources = "\n\n".join(f"[{n}] ({hit.chunk.title or hit.chunk.source})\n{hit.chunk.text[:max_chars]}"
                          for n, hit in enumerate(hits, 1))
    system = f"{INSTRUCTION}\n\nSources:\n\n{sources}" if hits else \
        "No source matched the question: say that you found nothing to answer from."
    if messages and messages[0].get("role") == "system" and isinstance(messages[0].get("content"), str):
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{system}"}, *messages[1:]]
    return [{"role": "system", "content": system}, *messages]


def cited_numbers(answer: str, count: int) -> list[int]:
    """Source numbers the answer cites as [n] (also [1, 2] and [1][2]), in order of first use, within 1..count."""
    found = []
    for group in re.findall(r"\[(\d+(?:\s*,\s*\d+)*)\]", answer):
        for n in map(int, re.split(r"\s*,\s*", group)):
            if 1 <= n <= count and n not in found:
                found.append(n)
    return found


def quotes(answer: str, text: str, min_words: int = 4) -> list[str]:
    """Passages of `text` that the answer reproduces: maximal runs of at least `min_words` words in the same order
    (case and punctuation aside), each returned as it stands in `text`."""
    words_a = [w.lower() for w in re.findall(r"\w+", answer)]
    spans_t = [(m.start(), m.end(), m.group().lower()) for m in re.finditer(r"\w+", text)]
    # run[j] = length of the common run ending at answer word i and text word j (dynamic programming, row by row)
    best: dict[int, int] = {}  # text end word -> run length, for runs that cannot be extended
    previous = [0] * (len(spans_t) + 1)
    for i in range(len(words_a)):
        current = [0] * (len(spans_t) + 1)
        for j, (_, _, word) in enumerate(spans_t):
            if word == words_a[i]:
                current[j + 1] = previous[j] + 1
                if current[j + 1] >= min_words:
                    best[j] = max(best.get(j, 0), current[j + 1])
        previous = current
    found, covered_to = [], -1
    for end in sorted(best):
        start = end - best[end] + 1
        if end + 1 in best and best[end + 1] > best[end]:
            continue  # the same run goes on
        if start <= covered_to:
            continue
        found.append(text[spans_t[start][0]:spans_t[end][1]])
        covered_to = end
    return found


def cite(answer: str, hits: list[Hit], min_words: int = 4) -> tuple[str, list[dict]]:
    """(the answer with citation marks, the citations). The marks are the model's own, or, when it wrote none,
    the numbers of the sources it quotes (at least `min_words` words in a row) appended. Each citation says where
    its source's text is, whether the answer `cited` it by number, and the `quotes` of it the answer reproduces."""
    found = [quotes(answer, hit.chunk.text, min_words) for hit in hits]
    marked = answer
    if answer and not cited_numbers(answer, len(hits)) and any(found):
        # appended, never inserted, so a stream can send the marks after the text it has already sent
        marked += ("" if answer[-1:].isspace() else " ") + "".join(f"[{n}]" for n, q in enumerate(found, 1) if q)
    cited = set(cited_numbers(marked, len(hits)))
    return marked, [{"number": n, "source": hit.chunk.source, "start": hit.chunk.start, "end": hit.chunk.end,
                     "title": hit.chunk.title, "score": round(hit.score, 4), "text": hit.chunk.text,
                     "cited": n in cited, "quotes": q} for n, (hit, q) in enumerate(zip(hits, found), 1)]


def attributed(answer: str, hits: list[Hit], min_words: int = 4) -> str:
    return cite(answer, hits, min_words)[0]


def citations(hits: list[Hit], answer: str | None = None) -> list[dict]:
    """The citations alone (before the answer is known: the sources, none cited or quoted)."""
    return cite(answer or "", hits)[1]
