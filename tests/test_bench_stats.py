"""serve_bench's statistics on hand-made records: percentiles, throughputs and TPOT worked out by hand."""
import math

import pytest

from benchmarks.bench_stats import Distribution, RequestRecord, markdown_table, summarize


def test_percentiles_interpolate_between_order_statistics():
    d = Distribution.of([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0])
    # rank = p/100 * (n - 1): p50 -> 4.5, p90 -> 8.1, p99 -> 8.91
    assert d.p50 == pytest.approx(0.55) and d.p90 == pytest.approx(0.91) and d.p99 == pytest.approx(0.991)
    assert d.mean == pytest.approx(0.55)
    single = Distribution.of([2.0])
    assert (single.p50, single.p90, single.p99) == (2.0, 2.0, 2.0)
    assert Distribution.of([]) is None


def test_summary_throughputs_tpot_and_pooled_itl():
    records = [
        # sent at 0, first token at 0.5, 5 tokens, done at 1.3: TPOT = 0.8 / 4 = 0.2
        RequestRecord(ok=True, start=0.0, end=1.3, prompt_tokens=10, output_tokens=5, ttft=0.5,
                      itl=[0.2, 0.2, 0.2, 0.2]),
        # sent at 1, first token at 1.1, 3 tokens, done at 2.0: TPOT = 0.9 / 2 = 0.45
        RequestRecord(ok=True, start=1.0, end=2.0, prompt_tokens=20, output_tokens=3, ttft=0.1, itl=[0.5, 0.4]),
        RequestRecord(ok=False, start=0.5, end=0.6, error="HTTP 500: boom"),
    ]
    s = summarize(records, "x", concurrency=2)
    assert s.duration == pytest.approx(2.0) and s.completed == 2 and s.errors == 1
    assert s.first_error == "HTTP 500: boom"
    assert s.request_throughput == pytest.approx(1.0)
    assert s.output_throughput == pytest.approx(4.0) and s.total_throughput == pytest.approx(19.0)
    assert s.ttft.p50 == pytest.approx(0.3) and s.ttft.p99 == pytest.approx(0.496)
    assert s.tpot.p50 == pytest.approx(0.325)
    # six gaps pooled: 0.2 x4, 0.4, 0.5 -> p50 = 0.2, p90 = 0.45
    assert s.itl.p50 == pytest.approx(0.2) and s.itl.p90 == pytest.approx(0.45)
    assert s.e2e.p50 == pytest.approx(1.15)


def test_one_token_answers_have_no_tpot_and_empty_runs_are_zero():
    s = summarize([RequestRecord(ok=True, start=0, end=1, output_tokens=1, ttft=1.0)])
    assert s.tpot is None and s.itl is None and s.ttft.p50 == 1.0
    empty = summarize([])
    assert empty.completed == 0 and empty.output_throughput == 0 and empty.ttft is None
    assert not math.isnan(empty.duration)


def test_markdown_table_has_a_row_per_summary():
    rows = markdown_table([summarize([RequestRecord(ok=True, start=0, end=1, output_tokens=4, ttft=0.25,
                                                    itl=[0.25] * 3)], "tokenmill", 8)]).splitlines()
    assert len(rows) == 3 and rows[0].count("|") == rows[1].count("|") == rows[2].count("|")
    assert "| tokenmill | 8 | 1 | 0 |" in rows[2] and "250 / 250 / 250" in rows[2]
