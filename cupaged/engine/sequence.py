"""A request's sequence as the engine core sees it: its tokens, its KV blocks, its state and why it finished.

Text, stop strings and output formatting belong to the front (output_processor.py); a sequence holds only what
scheduling, sampling and reporting token ids need.
"""

from __future__ import annotations

import enum
import itertools

import numpy as np

from cupaged.engine.protocol import TokenLogprobs
from cupaged.sampling_params import SamplingParams
from cupaged.structured import Matcher


class SequenceStatus(enum.Enum):
    WAITING = "waiting"        # not yet scheduled
    RUNNING = "running"        # holds KV blocks, computed each step
    PREEMPTED = "preempted"    # lost its blocks to an older request; waits at the front of the queue to recompute
    FINISHED = "finished"


_ids = itertools.count()

# Stands in token_ids for a token sampled on the device and not yet read back (the engine's async scheduling):
# the next step takes its input from the device, and the engine writes the token in once it is read.
PENDING_TOKEN = -1


class Sequence:
    def __init__(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                 token_limit: int | None = None, bad_words: list[list[int]] | None = None,
                 matcher: Matcher | None = None):
        self.seq_id = next(_ids)
        self.request_id = request_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.token_ids = list(prompt_token_ids)      # prompt then outputs
        # it finishes ("length") once it holds this many tokens: the prompt plus max_tokens, within the context
        if token_limit is None:
            token_limit = len(prompt_token_ids) + (params.max_tokens or 1 << 62)
        self.token_limit = token_limit
        self.params = params
        self.bad_words = bad_words or []             # token sequences never to complete (params.bad_words)
        self.matcher = matcher                       # params.structured_outputs: where its output is in the grammar
        self.status = SequenceStatus.WAITING
        self.block_table: list[int] = []
        self.block_hashes: list[int] = []            # prefix-cache hashes of the full blocks, in order
        self.num_computed_tokens = 0                 # tokens whose K/V is in the cache
        self.finish_reason: str | None = None        # "length", "stop", "abort" or "error"
        self.stop_reason: int | None = None          # the stop token id that ended it
        self.logprobs: list[TokenLogprobs] = []
        self.num_reported = 0                        # output tokens (and logprobs) already reported to the front
        self.finish_reported = False
        self.cumulative_logprob = 0.0                # sum of the chosen tokens' log-probabilities (best_of, beams)
        self.pending_logprobs = None                 # beam search: this beam's next-token log-probs, until all beams have theirs
        self.index = 0                               # which of the request's n / best_of / beam sequences
        self.num_preemptions = 0
        self.rng = np.random.default_rng(params.seed) if params.seed is not None else None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[len(self.prompt_token_ids):]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - len(self.prompt_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def fork(self, index: int) -> "Sequence":
        """A copy that continues independently (its blocks are shared through BlockManager.fork)."""
        child = Sequence(self.request_id, self.prompt_token_ids, self.params, token_limit=self.token_limit,
                         bad_words=self.bad_words, matcher=self.matcher.copy() if self.matcher else None)
        child.token_ids = list(self.token_ids)
        child.num_computed_tokens = self.num_computed_tokens
        child.status = self.status
        child.logprobs = list(self.logprobs)
        child.cumulative_logprob = self.cumulative_logprob
        child.index = index
        if self.params.seed is not None:  # each of the n samples draws its own stream, reproducibly
            child.rng = np.random.default_rng([self.params.seed, index])
        return child

    def __repr__(self) -> str:
        return (f"Sequence({self.request_id!r}, {self.status.value}, tokens={self.num_tokens}, "
                f"computed={self.num_computed_tokens}, blocks={len(self.block_table)})")


class SequenceGroup:
    """One request: its sequences (one, or n / best_of samples, or beams), scheduled and preempted together."""

    def __init__(self, request_id: str, seqs: list[Sequence]):
        self.request_id = request_id
        self.seqs = seqs
        self.prompt_token_ids = seqs[0].prompt_token_ids
        self.params = seqs[0].params
        self.status = SequenceStatus.WAITING
        self.finish_reason: str | None = None
        self.beam_finished: list[tuple[float, Sequence]] = []  # beam search: (length-penalised score, beam)
        self.num_preemptions = 0
        self.error: str | None = None                          # why it finished with finish_reason "error"

    def live(self) -> list[Sequence]:
        # Called several times a step for every running request: test the status directly, not through the
        # is_finished property (a function call per sequence).
        return [s for s in self.seqs if s.status is not SequenceStatus.FINISHED]

    @property
    def is_finished(self) -> bool:
        return self.status == SequenceStatus.FINISHED

    def __repr__(self) -> str:
        return f"SequenceGroup({self.request_id!r}, {self.status.value}, {self.seqs})"
