"""What one benchmark run measured: per-request records in, percentiles and throughputs out.

TTFT: request sent -> first streamed token. ITL: each gap between streamed tokens (pooled over all requests).
TPOT: per request, (end-to-end - TTFT) / (output tokens - 1), which spreads tokens that arrive together.
Percentiles interpolate linearly between order statistics (numpy's default), so they can be checked by hand.
"""
from dataclasses import asdict, dataclass, field

import numpy as np

PERCENTILES = (50, 90, 99)


@dataclass
class RequestRecord:
    ok: bool
    start: float                     # seconds, on a monotonic clock
    end: float
    prompt_tokens: int = 0
    output_tokens: int = 0           # from the usage chunk when the server sends one
    ttft: float | None = None
    itl: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def e2e(self) -> float:
        return self.end - self.start

    @property
    def tpot(self) -> float | None:
        if self.ttft is None or self.output_tokens < 2:
            return None
        return (self.e2e - self.ttft) / (self.output_tokens - 1)


@dataclass
class Distribution:
    mean: float
    p50: float
    p90: float
    p99: float

    @classmethod
    def of(cls, values: list[float]) -> "Distribution | None":
        if not values:
            return None
        p50, p90, p99 = (float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), PERCENTILES))
        return cls(float(np.mean(values)), p50, p90, p99)


@dataclass
class Summary:
    label: str
    concurrency: int | None
    request_rate: float | None
    completed: int
    errors: int
    duration: float
    request_throughput: float        # completed requests / s
    output_throughput: float         # output tokens / s
    total_throughput: float          # (prompt + output) tokens / s
    ttft: Distribution | None
    itl: Distribution | None
    tpot: Distribution | None
    e2e: Distribution | None
    first_error: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def summarize(records: list[RequestRecord], label: str = "", concurrency: int | None = None,
              request_rate: float | None = None) -> Summary:
    """Duration runs from the first request sent to the last one finished."""
    ok = [r for r in records if r.ok]
    failed = [r for r in records if not r.ok]
    duration = (max(r.end for r in records) - min(r.start for r in records)) if records else 0.0
    output = sum(r.output_tokens for r in ok)
    prompt = sum(r.prompt_tokens for r in ok)

    def per_second(amount: float) -> float:
        return amount / duration if duration > 0 else 0.0

    return Summary(
        label=label, concurrency=concurrency, request_rate=request_rate, completed=len(ok), errors=len(failed),
        duration=duration, request_throughput=per_second(len(ok)), output_throughput=per_second(output),
        total_throughput=per_second(prompt + output),
        ttft=Distribution.of([r.ttft for r in ok if r.ttft is not None]),
        itl=Distribution.of([gap for r in ok for gap in r.itl]),
        tpot=Distribution.of([t for r in ok if (t := r.tpot) is not None]),
        e2e=Distribution.of([r.e2e for r in ok]),
        first_error=failed[0].error if failed else None)


def _ms(d: Distribution | None, attr: str) -> str:
    return "-" if d is None else f"{getattr(d, attr) * 1000:.0f}"


TABLE_HEADER = ("| system | conc. | reqs | errors | req/s | out tok/s | total tok/s | TTFT p50 / p90 / p99 ms "
                "| ITL p50 / p90 / p99 ms | TPOT p50 ms | E2E p50 s |")


def table_row(s: Summary) -> str:
    load = str(s.concurrency) if s.request_rate is None else f"{s.request_rate:g}/s"
    ttft = " / ".join(_ms(s.ttft, a) for a in ("p50", "p90", "p99"))
    itl = " / ".join(_ms(s.itl, a) for a in ("p50", "p90", "p99"))
    e2e = "-" if s.e2e is None else f"{s.e2e.p50:.2f}"
    return (f"| {s.label} | {load} | {s.completed} | {s.errors} | {s.request_throughput:.2f} | "
            f"{s.output_throughput:.1f} | {s.total_throughput:.1f} | {ttft} | {itl} | {_ms(s.tpot, 'p50')} | {e2e} |")


def markdown_table(summaries: list[Summary]) -> str:
    separator = "|" + "---|" * (TABLE_HEADER.count("|") - 1)
    return "\n".join([TABLE_HEADER, separator, *(table_row(s) for s in summaries)])
