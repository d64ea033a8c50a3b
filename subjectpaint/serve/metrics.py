"""Prometheus text exposition of the serve process's counters (no client library needed)."""

from __future__ import annotations

import threading
from collections import defaultdict

BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self):
        self.lock = threading.Lock()
        self.requests: dict = defaultdict(int)  # (route, status) -> count
        self.latency = [0] * (len(BUCKETS) + 1)
        self.latency_sum = 0.0
        self.latency_count = 0
        self.queue_depth = 0  # place requests submitted to the workers and not answered yet
        self.batch_rows: dict = defaultdict(int)  # rows of the predict call each answer came from -> answers
        self.worker: dict = {}  # latest stats reported by the inference worker

    def request(self, route: str, status: int) -> None:
        with self.lock:
            self.requests[(route, status)] += 1

    def observe(self, seconds: float, stats: dict | None) -> None:
        with self.lock:
            self.latency_sum += seconds
            self.latency_count += 1
            self.latency[next((i for i, b in enumerate(BUCKETS) if seconds <= b), len(BUCKETS))] += 1
            if stats:
                self.batch_rows[int(stats.get("batch_rows", 0))] += 1
                self.worker = dict(stats)

    def render(self, jobs: dict) -> str:
        with self.lock:
            lines = ["# TYPE subjectpaint_requests_total counter"]
            for (route, status), n in sorted(self.requests.items()):
                lines.append(f'subjectpaint_requests_total{{route="{route}",status="{status}"}} {n}')
            lines += ["# TYPE subjectpaint_queue_depth gauge", f"subjectpaint_queue_depth {self.queue_depth}",
                      "# TYPE subjectpaint_place_latency_seconds histogram"]
            cumulative = 0
            for bound, n in zip(BUCKETS + ("+Inf",), self.latency):
                cumulative += n
                lines.append(f'subjectpaint_place_latency_seconds_bucket{{le="{bound}"}} {cumulative}')
            lines += [f"subjectpaint_place_latency_seconds_sum {self.latency_sum:.6f}",
                      f"subjectpaint_place_latency_seconds_count {self.latency_count}"]
            for key in ("swap_hits", "swap_misses"):  # the worker's adapter RAM tier (laid out for the slots)
                lines += [f"# TYPE subjectpaint_{key}_total counter",
                          f"subjectpaint_{key}_total {self.worker.get(key, 0)}"]
            lines.append("# TYPE subjectpaint_place_answers_by_batch_rows_total counter")
            for rows, n in sorted(self.batch_rows.items()):
                lines.append(f'subjectpaint_place_answers_by_batch_rows_total{{rows="{rows}"}} {n}')
            lines.append("# TYPE subjectpaint_training_jobs gauge")
            for state, n in sorted(jobs.items()):
                lines.append(f'subjectpaint_training_jobs{{state="{state}"}} {n}')
            return "\n".join(lines) + "\n"
