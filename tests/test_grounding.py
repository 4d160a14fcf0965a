"""Grounding: the sources go into one system message, citation numbers are read from the answer, quotes are the
passages of a source the answer reproduces, and an answer that cites nothing gets the numbers of what it quotes."""
from rag.chunker import Chunk
from rag.grounding import INSTRUCTION, attributed, citations, cited_numbers, ground, quotes
from rag.index import Hit

HITS = [Hit(Chunk("a.md", 10, 58, "Rivers", "The Zorblat river is 412 kilometres long, and wide."), 0.9),
        Hit(Chunk("b.rst", 0, 38, "", "Mount Qel is 5120 metres high."), 0.5)]


def test_sources_go_into_one_system_message():
    messages = ground([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "How long?"}], HITS)
    assert len(messages) == 2 and messages[1] == {"role": "user", "content": "How long?"}
    system = messages[0]["content"]
    assert system.startswith(f"Be brief.\n\n{INSTRUCTION}")
    assert "[1] (Rivers)\nThe Zorblat river is 412" in system and "[2] (b.rst)\nMount Qel" in system
    assert ground([{"role": "user", "content": "x"}], [])[0]["content"].startswith("No source matched")


def test_citation_numbers_and_quotes():
    assert cited_numbers("It is 412 km [1]. Also [2, 1] and [7] and [1][2].", 2) == [1, 2]
    answer = "The zorblat RIVER is 412 kilometres long. Mount Qel is tall."
    assert quotes(answer, HITS[0].chunk.text) == ["The Zorblat river is 412 kilometres long"]
    assert quotes(answer, HITS[1].chunk.text) == []  # "Mount Qel is" is three words: under the minimum
    assert quotes("Mount Qel is 5120", HITS[1].chunk.text) == ["Mount Qel is 5120"]


def test_an_answer_citing_nothing_gets_the_numbers_of_what_it_quotes():
    quoting = "The Zorblat river is 412 kilometres long."
    assert attributed(quoting, HITS) == quoting + " [1]"
    assert attributed("It is long [2].", HITS) == "It is long [2]."  # the model's own marks are kept
    assert attributed("I do not know.", HITS) == "I do not know."
    listed = citations(HITS, attributed(quoting, HITS))
    assert [(c["number"], c["cited"], c["quotes"]) for c in listed] == [
        (1, True, ["The Zorblat river is 412 kilometres long"]), (2, False, [])]
    assert listed[0]["source"] == "a.md" and (listed[0]["start"], listed[0]["end"]) == (10, 58)
