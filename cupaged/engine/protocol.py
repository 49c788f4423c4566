"""What the front and the engine core say to each other: token ids in, token ids out.

The core (engine/core.py) never sees text: a request reaches it as prompt token ids and sampling parameters, and
every step it reports, per request that advanced, each sequence's new token ids, why it finished, and the
logprobs asked for. The front (engine/output_processor.py) turns that into text. The same messages serve the core
in this process (LLMEngine's default) and in a process of its own (engine/core_client.py), where they travel
over ZeroMQ as msgpack: one message per step for every request.
"""

from __future__ import annotations

import msgspec

from cupaged.sampling_params import SamplingParams


class EngineCoreRequest(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    bad_words_token_ids: list[list[int]] = []   # params.bad_words as the front's tokenizer writes them


# (chosen token, its log-probability, the top token ids, their log-probabilities) at one position
TokenLogprobs = tuple[int, float, list[int], list[float]]


class SequenceDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """One sequence's news since its last report."""

    index: int                                   # which of the request's sequences (n / best_of / beams)
    token_ids: list[int]                         # tokens since the last report of this index
    finish_reason: str | None = None             # "stop", "length", "abort" or "error" once it is done
    stop_reason: int | None = None               # the stop token id that ended it
    cumulative_logprob: float = 0.0
    logprobs: list[TokenLogprobs] | None = None  # one entry per new token, when asked for


class RequestDelta(msgspec.Struct, array_like=True, omit_defaults=True, gc=False):
    """A request that advanced (or finished) in a step."""

    request_id: str
    seqs: list[SequenceDelta]
    finished: bool = False
    num_preemptions: int = 0
    error: str | None = None                     # why it ended with finish_reason "error"


class EngineStats(msgspec.Struct, omit_defaults=True, gc=False):
    """What the engine looked like after its last step."""

    num_running: int = 0
    num_waiting: int = 0
    num_running_requests: int = 0
    num_waiting_requests: int = 0
    kv_blocks_used: int = 0
    kv_blocks_total: int = 0
    kv_slots_used: int = 0           # token slots holding K/V
    kv_slots_allocated: int = 0      # slots in allocated blocks (used + the unfilled tail of last blocks)
    num_preemptions: int = 0
    num_cached_tokens: int = 0       # prompt tokens found in the prefix cache instead of computed
    num_computed_tokens: int = 0     # tokens computed by the model
    kv_blocks_unshared: int = 0      # blocks the running sequences would hold if nothing were shared
    num_steps_run_ahead: int = 0     # steps launched before the previous step's tokens were read (async scheduling)
    step_tokens: int = 0
    step_time: float = 0.0


class EngineCoreOutputs(msgspec.Struct, array_like=True, gc=False):
    """Everything one step of the core reports."""

    outputs: list[RequestDelta]
    stats: EngineStats


class CoreInfo(msgspec.Struct, gc=False):
    """What the front learns of the core once the model is loaded."""

    max_model_len: int
    num_kv_blocks: int
    block_size: int
    vocab_size: int
    device: str
    dtype: str                        # of the weights and the KV cache
    max_logprobs: int = 20            # the most logprobs a request may ask for (-1: no limit)
    kv_cache_dtype: str = "auto"      # "auto" (the model dtype) or "fp8_e4m3"; the cache holds num_kv_blocks x block_size tokens
