"""Counters and histograms of the server, written by hand in Prometheus' text format."""

from __future__ import annotations

import time
from collections import deque

from cupaged.engine.protocol import EngineStats


class Histogram:
    def __init__(self, buckets: list[float]):
        self.buckets = buckets
        self.counts = [0] * len(buckets)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.sum += value
        self.count += 1
        for i, bound in enumerate(self.buckets):
            if value <= bound:
                self.counts[i] += 1
                break

    def render(self, name: str, help_text: str) -> list[str]:
        lines = [f"# HELP {name} {help_text}", f"# TYPE {name} histogram"]
        total = 0
        for bound, n in zip(self.buckets, self.counts):
            total += n
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        lines += [f'{name}_bucket{{le="+Inf"}} {self.count}', f"{name}_sum {self.sum:.6f}",
                  f"{name}_count {self.count}"]
        return lines


class Metrics:
    """The server's counters and histograms (all updated from the event loop)."""

    WINDOW = 10.0  # seconds of history behind the tokens/s gauge

    def __init__(self) -> None:
        self.start = time.monotonic()
        self.ttft = Histogram([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60])
        self.itl = Histogram([0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 1, 2.5])
        self.generation_tokens = 0
        self.prompt_tokens = 0
        self.aborted = 0
        self.accepted = 0
        self.finished: dict[str, int] = {}
        self.rejected: dict[str, int] = {}
        self.recent: deque[tuple[float, int]] = deque()  # (time, tokens) per step that produced tokens

    def on_tokens(self, arrival: float, last_token_time: float | None, num_prompt_tokens: int, n: int,
                  now: float) -> None:
        """A request produced n tokens at `now` (its first ones when last_token_time is None)."""
        self.generation_tokens += n
        if last_token_time is None:
            self.ttft.observe(now - arrival)
            self.prompt_tokens += num_prompt_tokens
        else:  # n tokens since the last ones: n gaps of equal length
            for _ in range(n):
                self.itl.observe((now - last_token_time) / n)

    def on_tokens_of_step(self, tokens: int, now: float) -> None:
        """Tokens delivered at `now`, for the tokens/s gauge."""
        if tokens:
            self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()

    def on_finish(self, reason: str) -> None:
        self.finished[reason] = self.finished.get(reason, 0) + 1
        if reason == "abort":
            self.aborted += 1

    def on_reject(self, reason: str) -> None:
        self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def render(self, stats: EngineStats, waiting: int) -> str:
        now = time.monotonic()
        while self.recent and self.recent[0][0] < now - self.WINDOW:
            self.recent.popleft()
        span = max(min(self.WINDOW, now - self.start), 1e-3)
        rate = sum(n for _, n in self.recent) / span
        lines = []

        def metric(name: str, kind: str, help_text: str, value: float | dict, label: str = "") -> None:
            lines.extend([f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"])
            if isinstance(value, dict):
                for key, v in sorted(value.items()):
                    lines.append(f'{name}{{{label}="{key}"}} {v}')
            else:
                lines.append(f"{name} {value}")

        metric("cupaged_num_requests_running", "gauge", "Requests whose sequences hold KV blocks.",
               stats.num_running_requests)
        metric("cupaged_num_requests_waiting", "gauge", "Requests accepted but not yet running.", waiting)
        metric("cupaged_kv_blocks_used", "gauge", "KV-cache blocks in use.", stats.kv_blocks_used)
        metric("cupaged_kv_blocks_total", "gauge", "KV-cache blocks in all.", stats.kv_blocks_total)
        metric("cupaged_kv_cache_usage_ratio", "gauge", "Fraction of the KV-cache blocks in use.",
               round(stats.kv_blocks_used / max(stats.kv_blocks_total, 1), 6))
        metric("cupaged_num_preemptions_total", "counter", "Requests preempted to free KV blocks.",
               stats.num_preemptions)
        metric("cupaged_generation_tokens_total", "counter", "Tokens generated.", self.generation_tokens)
        metric("cupaged_prompt_tokens_total", "counter", "Prompt tokens of requests that produced a token.",
               self.prompt_tokens)
        metric("cupaged_generation_tokens_per_second", "gauge",
               f"Tokens generated per second over the last {self.WINDOW:g} s.", round(rate, 3))
        lines += self.ttft.render("cupaged_time_to_first_token_seconds",
                                  "Time from a request's arrival to its first token.")
        lines += self.itl.render("cupaged_inter_token_latency_seconds", "Time between a request's tokens.")
        metric("cupaged_requests_accepted_total", "counter", "Requests accepted by the engine.", self.accepted)
        metric("cupaged_requests_finished_total", "counter", "Requests finished, by finish reason.",
               dict(self.finished) or {"stop": 0}, "finish_reason")
        metric("cupaged_requests_aborted_total", "counter",
               "Requests aborted (client disconnected or server shutting down).", self.aborted)
        metric("cupaged_requests_rejected_total", "counter", "Requests refused before running, by reason.",
               dict(self.rejected) or {"invalid": 0}, "reason")
        return "\n".join(lines) + "\n"
