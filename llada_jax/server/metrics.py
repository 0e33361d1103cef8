"""The server's Prometheus metrics (GET /metrics), in a registry of their own per server.

  llada_requests_total{endpoint, status}      answered requests by HTTP status (499: the client went away)
  llada_request_latency_seconds{endpoint}     arrival to the last byte of the answer (histogram)
  llada_queue_depth                           requests waiting for the device
  llada_running_rows                          rows of the sampler call on the device now (0: idle)
  llada_batch_size                            requests' rows per sampler call (histogram; padding rows not counted)
  llada_batch_seconds                         device time per sampler call (histogram)
  llada_generated_tokens_total                completion tokens answered
  llada_generated_tokens_per_second           completion tokens / device seconds of the last call
  llada_dropped_requests_total{reason}        requests dropped before they reached the device
  llada_compiled_programs                     distinct sampler programs so far (options x shapes)
"""

from __future__ import annotations

import prometheus_client as prom

_LATENCY = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300)


class ServerMetrics:

  def __init__(self, max_batch: int):
    self.registry = r = prom.CollectorRegistry()
    self.requests = prom.Counter("llada_requests", "Answered requests by endpoint and HTTP status.",
                                 ["endpoint", "status"], registry=r)
    self.latency = prom.Histogram("llada_request_latency_seconds", "Request latency, arrival to answer.",
                                  ["endpoint"], buckets=_LATENCY, registry=r)
    self.queue_depth = prom.Gauge("llada_queue_depth", "Requests waiting for the device.", registry=r)
    self.running_rows = prom.Gauge("llada_running_rows", "Rows of the sampler call on the device.", registry=r)
    sizes, b = [], 1
    while b < max_batch:
      sizes.append(b)
      b *= 2
    self.batch_size = prom.Histogram("llada_batch_size", "Rows (prompts x n) per sampler call.",
                                     buckets=sizes + [max_batch], registry=r)
    self.batch_seconds = prom.Histogram("llada_batch_seconds", "Device seconds per sampler call.",
                                        buckets=_LATENCY, registry=r)
    self.tokens = prom.Counter("llada_generated_tokens", "Completion tokens answered.", registry=r)
    self.tokens_per_second = prom.Gauge("llada_generated_tokens_per_second",
                                        "Completion tokens per device second, last sampler call.", registry=r)
    self.dropped = prom.Counter("llada_dropped_requests", "Requests dropped before reaching the device.",
                                ["reason"], registry=r)
    self.programs = prom.Gauge("llada_compiled_programs", "Distinct sampler programs compiled.", registry=r)

  def exposition(self) -> tuple[bytes, str]:
    """(body, content type) of GET /metrics."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
