"""Every Prometheus metric of ModelMora, defined here and nowhere else.

Two kinds of figures:
- events (requests, batches, loads, crashes) are counted where they happen, through the
  `record_*` methods below, by the scheduler, the manager, the service layer and the doors;
- state (queue depths, memory, model states, jobs by status) is read when Prometheus scrapes,
  by `LiveCollector` from a `Live` snapshot that the server builds, so the hot path pays
  nothing for it.

Names follow Prometheus conventions: `modelmora_` prefix, base units (`_seconds`, `_bytes`),
`_total` counters (prometheus-client adds the suffix). Labels are bounded: a model label only
ever holds a registered model's name (or "" before the name is known to exist), error codes
come from the error table, and no request id or free text becomes a label.

One `Metrics` per server, with its own registry: tests that build several servers in one
process do not share counts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from modelmora.observability.stats import RequestStats

__all__ = ["CONTENT_TYPE_LATEST", "Live", "LiveCollector", "Metrics", "ModelLive", "current_protocol"]

# Request latencies: from a millisecond (the null model) to minutes (an image generation).
LATENCY_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)
LOAD_BUCKETS = (0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0, 600.0)

# Where an inference request came in: the label `protocol`, set by each door (the REST edge,
# the gRPC door, the job dispatcher); "internal" for the server's own calls (warm-up).
PROTOCOLS = ("rest", "grpc", "job", "internal")
current_protocol: ContextVar[str] = ContextVar("protocol", default="internal")


@dataclass(slots=True)
class ModelLive:
    """One model's state as the scrape sees it."""

    name: str
    task: str
    state: str
    loaded: bool
    queue_by_priority: dict[str, int] = field(default_factory=dict)
    in_flight: int = 0
    rss_bytes: int = 0
    gpu_bytes: int = 0
    device: str = ""


@dataclass(slots=True)
class Live:
    """Everything the scrape reads at once (built by `ModelMora.live_figures`)."""

    models: list[ModelLive] = field(default_factory=list)
    states: tuple[str, ...] = ()
    in_flight: int = 0
    queued: int = 0
    budget_ram_bytes: int | None = None
    budget_gpu_bytes: dict[str, int] = field(default_factory=dict)
    used_ram_bytes: int = 0
    system_available_bytes: int = 0
    spare_rss_bytes: int = 0
    gpus: list[dict[str, float | str]] = field(default_factory=list)  # device, total/used bytes, util
    # Cluster-wide (the job store's counts): empty on all replicas but the one reporting them.
    jobs: dict[str, int] = field(default_factory=dict)
    jobs_running: int = 0  # this replica's own share: the jobs it runs now
    jobs_processed: dict[str, int] = field(default_factory=dict)
    result_store_bytes: int | None = None
    ready: bool = False
    uptime_seconds: float = 0.0


class LiveCollector(Collector):
    """State read at scrape time from `snapshot()`."""

    def __init__(self, snapshot: Callable[[], Live]) -> None:
        self.snapshot = snapshot

    def describe(self) -> Iterable[Metric]:
        return []  # dynamic: no describe-time registration checks

    def collect(self) -> Iterator[Metric]:
        live = self.snapshot()
        g = GaugeMetricFamily
        up = g("modelmora_ready", "1 when the server accepts requests (ready and not draining)")
        up.add_metric([], 1.0 if live.ready else 0.0)
        yield up
        uptime = g("modelmora_uptime_seconds", "Seconds since the server process started")
        uptime.add_metric([], live.uptime_seconds)
        yield uptime
        inflight = g("modelmora_in_flight_requests", "Requests in progress over REST and gRPC")
        inflight.add_metric([], live.in_flight)
        yield inflight

        queue = g(
            "modelmora_queue_depth",
            "Requests waiting in a model's queue, by priority",
            labels=["model", "priority"],
        )
        loaded = g("modelmora_models_loaded", "Models with a running worker")
        state = g(
            "modelmora_model_state",
            "1 for the model's current lifecycle state, 0 for the others",
            labels=["model", "state"],
        )
        running = g(
            "modelmora_model_in_flight_requests",
            "Requests holding the model (queued or running)",
            labels=["model"],
        )
        rss = g(
            "modelmora_worker_rss_bytes", "Resident memory of the model's worker process", labels=["model"]
        )
        gpu = g(
            "modelmora_model_gpu_memory_bytes",
            "GPU memory held by the model's worker process",
            labels=["model", "device"],
        )
        for m in live.models:
            for priority, depth in m.queue_by_priority.items():
                queue.add_metric([m.name, priority], depth)
            for s in live.states:
                state.add_metric([m.name, s], 1.0 if s == m.state else 0.0)
            running.add_metric([m.name], m.in_flight)
            if m.loaded:
                rss.add_metric([m.name], m.rss_bytes)
                if m.device.startswith("cuda"):
                    gpu.add_metric([m.name, m.device], m.gpu_bytes)
        loaded.add_metric([], sum(1 for m in live.models if m.loaded))
        queued = g("modelmora_queued_requests", "Requests waiting in all queues (the admission count)")
        queued.add_metric([], live.queued)
        yield from (queue, queued, loaded, state, running, rss, gpu)

        budget = g("modelmora_memory_budget_bytes", "RAM budget for all workers (resources.max_memory_mb)")
        if live.budget_ram_bytes is not None:
            budget.add_metric([], live.budget_ram_bytes)
        used = g("modelmora_memory_used_bytes", "RAM used by all workers, the warm spare included")
        used.add_metric([], live.used_ram_bytes)
        spare = g("modelmora_spare_rss_bytes", "Resident memory of the warm spare worker (0: none)")
        spare.add_metric([], live.spare_rss_bytes)
        avail = g("modelmora_system_memory_available_bytes", "Memory the operating system reports available")
        avail.add_metric([], live.system_available_bytes)
        yield from (budget, used, spare, avail)

        gpu_budget = g("modelmora_gpu_memory_budget_bytes", "GPU memory budget per device", labels=["device"])
        for device, size in live.budget_gpu_bytes.items():
            gpu_budget.add_metric([device], size)
        gpu_total = g(
            "modelmora_gpu_memory_total_bytes", "GPU memory of the device (NVML)", labels=["device"]
        )
        gpu_used = g(
            "modelmora_gpu_memory_used_bytes", "GPU memory in use on the device (NVML)", labels=["device"]
        )
        gpu_util = g(
            "modelmora_gpu_utilization_ratio",
            "Fraction of time the device was busy over NVML's last sample period",
            labels=["device"],
        )
        for dev in live.gpus:
            name = str(dev["device"])
            gpu_total.add_metric([name], float(dev["total_bytes"]))
            gpu_used.add_metric([name], float(dev["used_bytes"]))
            if "utilization" in dev:
                gpu_util.add_metric([name], float(dev["utilization"]))
        yield from (gpu_budget, gpu_total, gpu_used, gpu_util)

        jobs = g(
            "modelmora_jobs",
            "Async jobs in the job store, by status (cluster-wide: one replica exports it)",
            labels=["status"],
        )
        for status, count in sorted(live.jobs.items()):
            jobs.add_metric([status], count)
        yield jobs
        running = g("modelmora_jobs_running", "Async jobs this replica runs now (sums over replicas)")
        running.add_metric([], live.jobs_running)
        yield running
        processed = g(
            "modelmora_jobs_processed",
            "Async jobs this server finished or requeued since it started, by outcome",
            labels=["outcome"],
        )
        for outcome, count in sorted(live.jobs_processed.items()):
            processed.add_metric([outcome], count)
        yield processed
        store = g("modelmora_result_store_bytes", "Bytes held by the result store (files backend)")
        if live.result_store_bytes is not None:
            store.add_metric([], live.result_store_bytes)
        yield store


class Metrics:
    """The server's metrics: counters and histograms recorded as things happen, plus the
    `LiveCollector` attached by `attach_live`."""

    def __init__(self, version: str = "") -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)  # process_* of the server itself (never the workers)

        info = Gauge("modelmora_build_info", "Always 1; the version in a label", ["version"], registry=r)
        info.labels(version).set(1)

        # -- requests (the service layer: every door, the fast path included) --------------
        self.requests = Counter(
            "modelmora_requests",
            "Inference requests finished, by outcome (status ok|error) and error code",
            ["model", "task", "protocol", "status", "error_code"],
            registry=r,
        )
        self.request_seconds = Histogram(
            "modelmora_request_duration_seconds",
            "Time from receiving an inference request to its result (successful requests)",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "modelmora_request_queue_seconds",
            "Time a request waited: in the queue and in front of the worker",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference_seconds = Histogram(
            "modelmora_request_inference_seconds",
            "Worker compute time of the batch that carried the request",
            ["model", "task"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.rejected = Counter(
            "modelmora_requests_rejected",
            "Requests refused with 429 because a queue was full (jobs: the job store was full)",
            ["model", "queue"],
            registry=r,
        )
        self.expired = Counter(
            "modelmora_requests_expired",
            "Requests that ended with 504: dropped by the batcher (stage=queue) or whose caller's "
            "deadline passed while waiting (stage=wait)",
            ["model", "stage"],
            registry=r,
        )
        self.forwarded = Counter(
            "modelmora_forwarded_requests",
            "Synchronous requests for a model another replica holds (cluster routing): "
            "outcome=forwarded (answered there), fallback (the holder was full or unreachable: "
            "served here), error (the holder's error passed on)",
            ["model", "outcome"],
            registry=r,
        )
        self.slow = Counter(
            "modelmora_requests_slow",
            "Requests slower than telemetry.slow_request_seconds (each also logged as a warning)",
            ["model"],
            registry=r,
        )

        # -- the scheduler ----------------------------------------------------------------
        self.batch_size = Histogram(
            "modelmora_batch_size",
            "Inputs per batch sent to a worker",
            ["model"],
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.worker_seconds = Histogram(
            "modelmora_worker_batch_seconds",
            "Time a worker spent on a batch, by stage (preprocess, forward, postprocess); "
            "measured in the worker, carried back with each batch's result",
            ["model", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.worker_items = Counter(
            "modelmora_worker_items",
            "Inputs a worker processed, by outcome (ok, error, cancelled); from the worker",
            ["model", "outcome"],
            registry=r,
        )

        # -- lifecycle --------------------------------------------------------------------
        self.loads = Counter(
            "modelmora_model_loads",
            "Model loads, by result (success|failure)",
            ["model", "result"],
            registry=r,
        )
        self.load_seconds = Histogram(
            "modelmora_model_load_duration_seconds",
            "Time to start a worker and load a model into it (successful loads)",
            ["model", "task"],
            buckets=LOAD_BUCKETS,
            registry=r,
        )
        self.unloads = Counter(
            "modelmora_model_unloads",
            "Models unloaded, by reason (requested, keep_alive, eviction, shutdown, uninstall)",
            ["model", "reason"],
            registry=r,
        )
        self.evictions = Counter(
            "modelmora_model_evictions", "Models evicted to make room for another", ["model"], registry=r
        )
        self.crashes = Counter(
            "modelmora_worker_crashes", "Worker processes that ended on their own", ["model"], registry=r
        )

        # -- the doors ----------------------------------------------------------------------
        self.http = Counter(
            "modelmora_http_requests",
            "HTTP requests answered, by handler group and status code",
            ["handler", "code"],
            registry=r,
        )
        self.grpc = Counter(
            "modelmora_grpc_requests",
            "gRPC calls finished, by method (the RPC's name) and gRPC status code",
            ["method", "code"],
            registry=r,
        )

        # The last minutes per model, in the server (the console's charts, GET /api/v1/stats).
        self.stats = RequestStats()

        # Children cached by label values: `labels()` takes a lock and hashes every time.
        self._req: dict[tuple[str, str, str], tuple[Counter, Histogram, Histogram, Histogram]] = {}
        self._http: dict[tuple[str, int], Counter] = {}
        self._grpc: dict[tuple[str, str], Counter] = {}

    # -- recording ------------------------------------------------------------------------

    def record_success(
        self,
        model: str,
        task: str,
        protocol: str,
        queue_s: float,
        inference_s: float,
        total_s: float,
        batch_size: int = 0,
    ) -> None:
        key = (model, task, protocol)
        children = self._req.get(key)
        if children is None:
            children = (
                self.requests.labels(model, task, protocol, "ok", ""),
                self.queue_seconds.labels(model, task),
                self.inference_seconds.labels(model, task),
                self.request_seconds.labels(model, task),
            )
            self._req[key] = children
        children[0].inc()
        children[1].observe(queue_s)
        children[2].observe(inference_s)
        children[3].observe(total_s)
        self.stats.record_ok(model, total_s, batch_size)

    def record_error(self, model: str, task: str, protocol: str, code: str) -> None:
        self.requests.labels(model, task, protocol, "error", code).inc()
        if model:  # "" (a model that does not exist) has no series
            self.stats.record_error(model)

    def record_http(self, handler: str, code: int) -> None:
        key = (handler, code)
        child = self._http.get(key)
        if child is None:
            child = self._http[key] = self.http.labels(handler, str(code))
        child.inc()

    def record_grpc(self, method: str, code: str) -> None:
        key = (method, code)
        child = self._grpc.get(key)
        if child is None:
            child = self._grpc[key] = self.grpc.labels(method, code)
        child.inc()

    def attach_live(self, snapshot: Callable[[], Live]) -> None:
        self.registry.register(LiveCollector(snapshot))

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
