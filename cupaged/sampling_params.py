"""SamplingParams: what to generate and how, with vLLM's parameter names and meanings."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    `n` completions are returned; with `best_of` > n, best_of are sampled and the n with the highest cumulative
    log-probability returned. `beam_width` > 1 runs beam search instead of sampling, with transformers'
    `length_penalty` and `early_stopping` (True, False or "never"). temperature 0 means greedy. top_k 0 or -1 and top_p 1 disable those filters; min_p 0 disables min-p.
    repetition_penalty (>1 discourages) applies to prompt and output tokens, as in vLLM and transformers;
    presence_penalty and frequency_penalty (OpenAI's, -2..2) to output tokens. `seed` makes the request's
    samples reproducible whatever else is in the batch. `logprobs` = n returns the chosen token's log-probability
    and the n most likely tokens' at each step (0 for the chosen one alone). `output_kind` "cumulative" returns an
    output every step the request advances (for streaming); "final_only" returns one, when it finishes (as
    `LLM.generate` asks, which saves the engine building outputs no one reads).
    """

    n: int = 1
    best_of: int | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16
    min_tokens: int = 0
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    logprobs: int | None = None
    beam_width: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False
    output_kind: str = "cumulative"

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop)
        self.stop_token_ids = list(self.stop_token_ids)
        if self.top_k == -1:
            self.top_k = 0
        checks = [
            (self.n >= 1, f"n must be >= 1, got {self.n}"),
            (self.best_of is None or self.best_of >= self.n,
             f"best_of ({self.best_of}) must be at least n ({self.n})"),
            (self.beam_width >= 1, f"beam_width must be >= 1, got {self.beam_width}"),
            (self.beam_width == 1 or self.n <= self.beam_width,
             f"n ({self.n}) must not exceed beam_width ({self.beam_width})"),
            (self.beam_width == 1 or self.best_of is None, "best_of does not apply to beam search"),
            (self.early_stopping in (True, False, "never"),
             f"early_stopping must be true, false or 'never', got {self.early_stopping!r}"),
            (self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k >= 0, f"top_k must be -1, 0 (disabled) or positive, got {self.top_k}"),
            (0 <= self.min_p <= 1, f"min_p must be in [0, 1], got {self.min_p}"),
            (self.repetition_penalty > 0, f"repetition_penalty must be > 0, got {self.repetition_penalty}"),
            (-2 <= self.presence_penalty <= 2, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}"),
            (-2 <= self.frequency_penalty <= 2,
             f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}"),
            (self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}"),
            (self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}"),
            (self.max_tokens is None or self.min_tokens <= self.max_tokens,
             f"min_tokens ({self.min_tokens}) must not exceed max_tokens ({self.max_tokens})"),
            (all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings"),
            (all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids), "stop_token_ids must be token ids"),
            (self.logprobs is None or self.logprobs >= 0, f"logprobs must be >= 0, got {self.logprobs}"),
            (self.seed is None or isinstance(self.seed, int), f"seed must be an integer, got {self.seed!r}"),
            (self.output_kind in ("cumulative", "final_only"),
             f"output_kind must be 'cumulative' or 'final_only', got {self.output_kind!r}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.beam_width > 1

    @property
    def num_sequences(self) -> int:
        """How many sequences the request runs: best_of samples, or beam_width beams."""
        return self.beam_width if self.beam_width > 1 else (self.best_of or self.n)
