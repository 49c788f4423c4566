"""OutputProcessor: the front's half of a request, from the core's token ids to what the user reads.

For every request it keeps each sequence's tokens, its incremental detokenizer and text, and turns each step's
`EngineCoreOutputs` into `RequestOutput`s: text deltas, stop strings (a hit cuts the text and sends an abort of
that sequence back to the core), logprobs as `Logprob` objects, best_of's choice of the n most likely samples,
and the output kinds:
- "delta": each output holds only what is new since the last one (text and token ids), as a server streams;
- "cumulative": each output holds everything so far, with the new text in `.delta`;
- "final_only": one output, when the request finishes (nothing is decoded before then unless stop strings need
  it: `LLM.generate` asks for this).
It runs wherever the front runs (LLMEngine's thread, the server's event loop), never on the core's critical path
when the core has a process of its own.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from cupaged.engine.protocol import EngineCoreOutputs, RequestDelta, SequenceDelta
from cupaged.sampling_params import SamplingParams
from cupaged.tokenizer import IncrementalDetokenizer, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class Logprob:
    """Log-probability of the chosen token and of the top-n candidates at one step."""

    token_id: int
    logprob: float
    top: dict[int, float] = field(default_factory=dict)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    finish_reason: str | None = None        # "length", "stop", "abort", "error" or None while running
    stop_reason: int | str | None = None    # the stop token id or stop string that ended it
    logprobs: list[Logprob] | None = None
    delta: str = ""                         # text released since the previous output of this request


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool
    num_preemptions: int = 0
    arrival_time: float = 0.0
    first_token_time: float | None = None
    error: str | None = None                # why it finished with finish_reason "error"


class _SequenceState:
    """One sequence of a request as the front sees it."""

    def __init__(self, index: int, detokenizer: IncrementalDetokenizer):
        self.index = index
        self.token_ids: list[int] = []
        self.detokenizer = detokenizer
        self.text = ""
        self.released = 0            # text[:released] can be shown (the rest may be the start of a stop string)
        self.sent_chars = 0          # ...and this much of it was returned already
        self.sent_tokens = 0         # token ids returned already ("delta" outputs)
        self.logprobs: list[Logprob] = []
        self.sent_logprobs = 0
        self.cumulative_logprob = 0.0
        self.finish_reason: str | None = None
        self.stop_reason: int | str | None = None


class RequestState:
    def __init__(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                 tokenizer: Tokenizer, arrival_time: float):
        self.request_id = request_id
        self.prompt = prompt
        self.prompt_token_ids = prompt_token_ids
        self.params = params
        self.tokenizer = tokenizer
        self.arrival_time = arrival_time
        self.first_token_time: float | None = None
        self.seqs: dict[int, _SequenceState] = {}
        self.num_preemptions = 0
        self.finished = False
        self.error: str | None = None
        # the text is decoded as tokens come only when someone reads it before the end, or stop strings need it
        self.incremental = params.output_kind != "final_only" or bool(params.stop)
        self.longest_stop = max(map(len, params.stop)) if params.stop else 0

    def seq(self, index: int) -> _SequenceState:
        state = self.seqs.get(index)
        if state is None:
            detok = IncrementalDetokenizer(self.tokenizer, self.prompt_token_ids, self.params.skip_special_tokens)
            state = self.seqs[index] = _SequenceState(index, detok)
        return state


class OutputProcessor:
    def __init__(self, tokenizer: Tokenizer):
        self.tokenizer = tokenizer
        self.requests: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []   # outputs of requests ended here (aborted, failed), for the next call

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int], params: SamplingParams,
                    arrival_time: float | None = None) -> None:
        if request_id in self.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        self.requests[request_id] = RequestState(request_id, prompt, prompt_token_ids, params, self.tokenizer,
                                                 time.monotonic() if arrival_time is None else arrival_time)

    def has_unfinished(self) -> bool:
        return bool(self.requests) or bool(self._pending)

    def abort(self, request_id: str) -> bool:
        """End a request as the user asked; its final output comes with the next `process` call."""
        state = self.requests.pop(request_id, None)
        if state is None:
            return False
        for s in state.seqs.values() or [state.seq(0)]:
            s.finish_reason = s.finish_reason or "abort"
        state.finished = True
        self._pending.append(self._output(state))
        return True

    def fail_all(self, message: str) -> None:
        """Every unfinished request ends with finish reason "error" (the core is gone); their outputs come with the
        next `process` call."""
        for state in self.requests.values():
            for s in state.seqs.values() or [state.seq(0)]:
                s.finish_reason = s.finish_reason or "error"
            state.finished, state.error = True, message
            self._pending.append(self._output(state))
        self.requests.clear()

    def process(self, core: EngineCoreOutputs) -> tuple[list[RequestOutput], list[tuple[str, int | None]]]:
        """The outputs for one step of the core, and the aborts to send back to it: (request id, sequence index
        or None for the whole request) for sequences that hit a stop string."""
        outputs, self._pending = self._pending, []
        aborts: list[tuple[str, int | None]] = []
        now = time.monotonic()
        touched: dict[str, RequestState] = {}  # one output per request, however many steps `core` holds
        for delta in core.outputs:
            state = self.requests.get(delta.request_id)
            if state is None or state.finished:  # ended here already: what the core computed since is dropped
                continue
            try:
                self._update(state, delta, now, aborts)
            except Exception as exc:  # noqa: BLE001 - this request's output (its tokens, its text): end it alone
                self._fail(state, exc, aborts)
            touched[state.request_id] = state
        for state in touched.values():
            if not state.finished and state.params.output_kind == "final_only":
                continue
            try:
                output = self._output(state)
            except Exception as exc:  # noqa: BLE001 - likewise
                self._fail(state, exc, aborts)
                output = self._output(state)
            if state.finished:
                del self.requests[state.request_id]
            outputs.append(output)
        return outputs, aborts

    @staticmethod
    def _fail(state: RequestState, exc: Exception, aborts: list[tuple[str, int | None]]) -> None:
        """A request whose output could not be made ends with finish reason "error"; the core drops it too."""
        logger.exception("request %s failed in the output processor", state.request_id)
        state.finished, state.error = True, f"its output could not be processed: {type(exc).__name__}: {exc}"
        for s in state.seqs.values() or [state.seq(0)]:
            s.finish_reason = "error"
            s.released = s.sent_chars  # nothing more of its text is shown
        aborts[:] = [a for a in aborts if a[0] != state.request_id] + [(state.request_id, None)]

    # -- one request ------------------------------------------------------------------------------------------
    def _update(self, state: RequestState, delta: RequestDelta, now: float,
                aborts: list[tuple[str, int | None]]) -> None:
        state.num_preemptions = delta.num_preemptions
        for d in delta.seqs:
            s = state.seq(d.index)
            if s.finish_reason is not None:  # stopped here by a stop string: later tokens are dropped
                continue
            if d.token_ids and state.first_token_time is None:
                state.first_token_time = now
            self._append(state, s, d)
            if s.finish_reason is not None and d.finish_reason is None:
                aborts.append((state.request_id, d.index))
        if delta.finished:
            state.error = delta.error
            for s in state.seqs.values():
                s.finish_reason = s.finish_reason or "abort"
        width = state.params.num_sequences if state.params.beam_width == 1 else state.params.n
        done = delta.finished or (len(state.seqs) >= width and all(s.finish_reason for s in state.seqs.values()))
        if done and not delta.finished:  # every sequence hit a stop string: the core ends the whole request
            aborts[:] = [a for a in aborts if a[0] != state.request_id] + [(state.request_id, None)]
        state.finished = done

    def _append(self, state: RequestState, s: _SequenceState, d: SequenceDelta) -> None:
        """Add a sequence's new tokens: logprobs, text, stop strings, finish reason."""
        first_new = len(s.token_ids)
        s.token_ids += d.token_ids
        s.cumulative_logprob = d.cumulative_logprob
        if d.logprobs:
            s.logprobs += [Logprob(t, lp, dict(zip(ids, lps))) for t, lp, ids, lps in d.logprobs]
        if state.incremental:
            self._detokenize(state, s, first_new, d.finish_reason == "stop")
        elif d.finish_reason is not None:  # read once, at the end
            self._detokenize(state, s, 0, d.finish_reason == "stop")
        if s.finish_reason is None and d.finish_reason is not None:
            s.finish_reason, s.stop_reason = d.finish_reason, d.stop_reason
            s.released = len(s.text)

    def _detokenize(self, state: RequestState, s: _SequenceState, first_new: int, stopped_by_token: bool) -> None:
        """Decode the tokens from first_new on; with stop strings, token by token, so that a hit cuts the tokens
        there too. Stop strings count from min_tokens on, and not in a last token that was itself a stop token or
        EOS (`stopped_by_token`: the core's stop came first)."""
        p = state.params
        if not p.stop:
            s.text += s.detokenizer.add_many(s.token_ids[first_new:])
            s.released = len(s.text)
            return
        last = len(s.token_ids) - 1
        for i in range(first_new, len(s.token_ids)):
            s.text += s.detokenizer.add_many(s.token_ids[i:i + 1])
            if i + 1 >= p.min_tokens and not (stopped_by_token and i == last):
                hit = self._find_stop_string(s, p)
                if hit is not None:
                    del s.token_ids[i + 1:]
                    if p.logprobs is not None:
                        del s.logprobs[i + 1:]
                    s.finish_reason, s.stop_reason = "stop", hit
                    s.released = len(s.text)
                    return
            # hold back what could be the start of a stop string
            s.released = max(s.released, len(s.text) - max(state.longest_stop - 1, 0))

    @staticmethod
    def _find_stop_string(s: _SequenceState, p: SamplingParams) -> str | None:
        """If a stop string now appears in the text, cut the text there and return the string."""
        longest = max(map(len, p.stop))
        search_from = max(0, s.released - longest)
        hits = [(i, stop) for stop in p.stop if (i := s.text.find(stop, search_from)) >= 0]
        if not hits:
            return None
        index, stop = min(hits)
        s.text = s.text[:index + (len(stop) if p.include_stop_str_in_output else 0)]
        return stop

    def _output(self, state: RequestState) -> RequestOutput:
        p = state.params
        seqs = [state.seqs[i] for i in sorted(state.seqs)]
        if state.finished and len(seqs) > p.n:  # best_of: the n most likely samples
            seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)
        completions = [self._completion(state, i, s) for i, s in enumerate(seqs[:p.n])]
        return RequestOutput(state.request_id, state.prompt, state.prompt_token_ids, completions, state.finished,
                             state.num_preemptions, state.arrival_time, state.first_token_time, state.error)

    @staticmethod
    def _completion(state: RequestState, index: int, s: _SequenceState) -> CompletionOutput:
        p = state.params
        delta_text = s.text[s.sent_chars:s.released]
        s.sent_chars = s.released
        logprobs = s.logprobs if p.logprobs is not None else None
        if p.output_kind == "delta":
            ids, s.sent_tokens = s.token_ids[s.sent_tokens:], len(s.token_ids)
            if logprobs is not None:
                logprobs, s.sent_logprobs = logprobs[s.sent_logprobs:], len(logprobs)
            return CompletionOutput(index, delta_text, ids, s.cumulative_logprob, s.finish_reason, s.stop_reason,
                                    logprobs, delta_text)
        return CompletionOutput(index, s.text[:s.released], list(s.token_ids), s.cumulative_logprob, s.finish_reason,
                                s.stop_reason, logprobs, delta_text)
