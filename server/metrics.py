"""Prometheus metrics, named as vLLM names them (with our `tokenmill:` prefix) so dashboards carry over."""
import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                    80.0, 160.0)


class Metrics:
    """One registry per server, so that several servers (tests) can live in one process."""

    def __init__(self, model_name: str):
        self.registry = CollectorRegistry()
        reg, labels = self.registry, ["model_name"]

        def gauge(name: str, doc: str) -> Gauge:
            return Gauge(f"tokenmill:{name}", doc, labels, registry=reg).labels(model_name)

        def counter(name: str, doc: str) -> Counter:  # the client adds the _total suffix
            return Counter(f"tokenmill:{name}", doc, labels, registry=reg).labels(model_name)

        def histogram(name: str, doc: str) -> Histogram:
            return Histogram(f"tokenmill:{name}", doc, labels, buckets=_LATENCY_BUCKETS, registry=reg).labels(model_name)

        self.num_requests_running = gauge("num_requests_running", "Requests in the running batch")
        self.num_requests_waiting = gauge("num_requests_waiting", "Requests waiting to be scheduled")
        self.kv_cache_usage_perc = gauge("kv_cache_usage_perc", "Fraction of KV cache blocks in use (1 = all)")
        self.prompt_tokens = counter("prompt_tokens", "Prompt tokens prefilled")
        self.generation_tokens = counter("generation_tokens", "Tokens generated")
        self.num_preemptions = counter("num_preemptions", "Sequences preempted (recomputed later)")
        self.prefix_cache_queries = counter("prefix_cache_queries", "Prompt tokens looked up in the prefix cache")
        self.prefix_cache_hits = counter("prefix_cache_hits", "Prompt tokens found in the prefix cache")
        self.spec_decode_num_drafts = counter("spec_decode_num_drafts", "Speculative proposals checked")
        self.spec_decode_num_draft_tokens = counter("spec_decode_num_draft_tokens", "Tokens proposed")
        self.spec_decode_num_accepted_tokens = counter("spec_decode_num_accepted_tokens", "Proposed tokens accepted")
        self._request_success = Counter("tokenmill:request_success", "Requests finished, by finish reason",
                                        labels + ["finished_reason"], registry=reg)
        self._model_name = model_name
        self.time_to_first_token = histogram("time_to_first_token_seconds", "Time to first token")
        self.inter_token_latency = histogram("inter_token_latency_seconds", "Time between output steps")
        self.e2e_request_latency = histogram("e2e_request_latency_seconds", "Request latency, arrival to finish")
        self.request_queue_time = histogram("request_queue_time_seconds", "Time waiting before the first prefill")

        self._lora_info = Gauge("tokenmill:lora_requests_info", "LoRA adapters of the running and waiting requests",
                                ["max_lora", "waiting_lora_adapters", "running_lora_adapters"], registry=reg)
        self._expert_tokens = Gauge("tokenmill:moe_expert_tokens", "Mixture-of-Experts: (token, slot) pairs routed "
                                    "to each expert since start, by layer", labels + ["layer", "expert"], registry=reg)

    def set_lora_requests(self, max_loras: int, running: list[str], waiting: list[str]) -> None:
        """vLLM's lora_requests_info: the adapters of running and waiting requests as labels, the time as value."""
        self._lora_info.clear()
        self._lora_info.labels(str(max_loras), ",".join(sorted(set(waiting))),
                               ",".join(sorted(set(running)))).set(time.time())

    def set_expert_load(self, load: dict[int, list[int]]) -> None:
        """engine.expert_load(): read when /metrics is scraped, not after every step."""
        for layer, counts in load.items():
            for expert, n in enumerate(counts):
                self._expert_tokens.labels(self._model_name, str(layer), str(expert)).set(n)

    def request_finished(self, reason: str) -> None:
        self._request_success.labels(self._model_name, reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
