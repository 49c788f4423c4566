"""LLMEngine: requests in, a step at a time, outputs out.

`add_request` validates and queues a request (a request that can never run is rejected there, with a clear
error, and the engine goes on serving the others); `step` schedules one batch, runs the model once, samples,
and returns the outputs of the requests that advanced; `abort` cancels a request and frees its blocks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupaged import device as devices
from cupaged.device import HostCopy
from cupaged.checkpoint import dummy_weights, open_checkpoint
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.model_runner import ModelRunner
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.beam_search import beam_step
from cupaged.engine.sequence import PENDING_TOKEN, Logprob, Sequence, SequenceGroup
from cupaged.models.llama import expected_weights
from cupaged.sampler import log_softmax, record_logprobs, sample_on_device
from cupaged.sampling_params import SamplingParams
from cupaged.tokenizer import IncrementalDetokenizer

logger = logging.getLogger(__name__)


@dataclass
class CompletionOutput:
    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None = None
    finish_reason: str | None = None        # "length", "stop", "abort" or None while running
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


@dataclass
class EngineStats:
    """What the engine looked like after its last step."""

    num_running: int = 0
    num_waiting: int = 0
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
    history: list[tuple[int, int]] = field(default_factory=list, repr=False)  # (slots used, allocated) per step


@dataclass
class _Launched:
    """A step queued on the device, whose sampled tokens the host has not read yet."""

    seqs: list[Sequence]               # the sequences that get a token, in the order of `tokens`
    indices: list[int]                 # where each one's token goes in its token_ids (PENDING_TOKEN until then)
    tokens: Any                        # the sampled tokens, on the device
    host: HostCopy | None              # ...and their copy to the host, under way
    rows: dict[int, int]               # seq_id -> row in `tokens`: the next step reads its inputs from there
    beam_groups: dict[str, SequenceGroup]
    run_ahead: bool                    # whether the next step may be launched before this one is processed
    logits: Any = None                 # kept when logprobs must be recorded


def _runs_ahead(seq: Sequence) -> bool:
    """Whether seq's next step can be launched before its sampled token reaches the host: not when that step
    needs the host's view of the token (penalties read the token history, logprobs read this step's logits, the
    samples of n / best_of and beams are chosen on the host)."""
    p = seq.params
    return (p.num_sequences == 1 and p.logprobs is None and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty)


class LLMEngine:
    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 cpu_kv_cache_bytes: int = 2 << 30, num_kv_blocks: int | None = None, seed: int = 0,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, load_format: str = "auto",
                 async_scheduling: bool = True):
        if block_size not in (8, 16, 32):
            raise ValueError(f"block_size must be 8, 16 or 32, got {block_size}")
        if not 0 < gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization}")
        self.device = devices.set_device(device)
        xp = devices.xp()
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.dtype = devices.resolve_dtype(dtype)
        t0 = time.perf_counter()
        self.config, self.tokenizer, read_tensors = open_checkpoint(model)
        if load_format not in ("auto", "dummy"):
            raise ValueError(f"load_format must be 'auto' or 'dummy' (random weights), got {load_format!r}")
        if load_format == "dummy":
            tensors = dummy_weights(expected_weights(self.config), self.dtype, xp, seed)
        else:
            tensors = read_tensors(expected_weights(self.config), self.dtype.name)
        model_len = min(max_model_len or self.config.max_position_embeddings, self.config.max_position_embeddings)
        max_num_batched_tokens = max_num_batched_tokens or max(model_len if self.device == "cpu" else 8192, 1)
        self.runner = ModelRunner(self.config, tensors, self.dtype, self.device, xp, block_size,
                                  max_num_batched_tokens, model_len, max_num_seqs)
        del tensors
        num_blocks = num_kv_blocks or self.runner.profile_num_blocks(gpu_memory_utilization, cpu_kv_cache_bytes)
        if num_blocks * block_size < model_len:
            logger.warning("the KV cache holds %d tokens, fewer than the model's context; max_model_len is now %d",
                           num_blocks * block_size, num_blocks * block_size)
            model_len = num_blocks * block_size
        self.runner.allocate_cache(num_blocks, model_len)
        if self.device == "cuda" and not enforce_eager:
            self.runner.capture_decode_graphs()
        self.max_model_len = model_len
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.rng = np.random.default_rng(seed)
        self.groups: dict[str, SequenceGroup] = {}
        self._aborted: list[SequenceGroup] = []  # reported by the next step
        self.async_scheduling = async_scheduling
        self._in_flight: _Launched | None = None  # launched, not yet processed (async scheduling)
        self.stats = EngineStats(kv_blocks_total=num_blocks)
        logger.info("loaded %s (%s, %d layers) as %s on %s in %.1fs; KV cache: %d blocks of %d tokens (%.2f GiB)",
                    model, self.config.architecture, self.config.num_layers, self.dtype.name, self.device,
                    time.perf_counter() - t0, num_blocks, block_size,
                    num_blocks * self.runner.bytes_per_block() / 2**30)

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError, with the reason, for a request that can never be served."""
        params = params or SamplingParams()
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        if max(ids) >= self.config.vocab_size or min(ids) < 0:
            raise ValueError(f"prompt token ids must be in [0, {self.config.vocab_size})")
        if len(ids) > self.max_model_len:
            raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context of "
                             f"{self.max_model_len} tokens")
        longest = min(len(ids) + (params.max_tokens or self.max_model_len), self.max_model_len)
        if params.num_sequences * self.blocks.blocks_for(longest) > self.blocks.num_blocks:
            raise ValueError(f"{params.num_sequences} sequences of up to {longest} tokens need more KV blocks than "
                             f"the cache has ({self.blocks.num_blocks} of {self.blocks.block_size} tokens)")
        detok = IncrementalDetokenizer(self.tokenizer, ids, params.skip_special_tokens)
        # it stops at `longest` tokens (a prompt that fills the context still gets one token)
        limit = max(longest, len(ids) + 1)
        group = SequenceGroup(request_id, [Sequence(request_id, text, ids, params, detok, token_limit=limit)])
        self.groups[request_id] = group
        self.scheduler.add(group)

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed at once. Returns False if it is unknown or already finished."""
        group = self.groups.get(request_id)
        if group is None or group.is_finished:
            return False
        self.scheduler.finish(group, "abort")
        group.finish_reason = "abort"
        self._aborted.append(group)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one batch. Returns an output for every request that produced text or finished (only the latter for
        requests whose output_kind is "final_only").

        With async scheduling the engine runs one step ahead: this step's batch is scheduled and queued on the
        device before the previous step's tokens are read back and processed (detokenized, stop checks, outputs),
        so that host work overlaps the GPU's. Its outputs are therefore those of the previous step's tokens.
        """
        t0 = time.perf_counter()
        advanced: dict[str, SequenceGroup] = {g.request_id: g for g in self._aborted}
        self._aborted = []
        previous, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        launched = self._launch(batch, previous) if batch.seqs else None
        if previous is not None:
            self._process(previous, advanced)
        if launched is not None:
            # after `previous`: the blocks just computed may hold its tokens, which prefix-cache hashes read
            for seq in batch.seqs:
                if not seq.is_finished:
                    self.blocks.register_full_blocks(seq)
            if launched.run_ahead:
                self._in_flight = launched
                self.stats.num_steps_run_ahead += 1
            else:
                self._process(launched, advanced)
        for group in advanced.values():
            if not group.is_finished and not group.live():
                self.scheduler.finish(group)
        self._update_stats(sum(batch.num_new_tokens), time.perf_counter() - t0)
        outputs = [self._output(g) for g in advanced.values()
                   if g.is_finished or g.params.output_kind == "cumulative"]
        for group in advanced.values():
            if group.is_finished:
                del self.groups[group.request_id]
        return outputs

    def _launch(self, batch: ScheduledBatch, previous: _Launched | None) -> _Launched:
        """Queue the batch's forward and sampling on the device; the sampled tokens stay there (PENDING_TOKEN in
        the sequences' token ids) until `_process` reads them."""
        self.runner.copy_blocks(batch.block_copies)
        pending = (previous.tokens, previous.rows) if previous is not None else None
        logits, rows = self.runner.run(batch.seqs, batch.num_new_tokens, pending)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        sample_seqs, sample_rows, beam_groups = [], [], {}
        for row, i in enumerate(rows):
            seq = batch.seqs[i]
            group = self.groups[seq.request_id]
            if seq.params.beam_width > 1:
                seq.pending_logprobs = log_softmax(logits[row])
                beam_groups[group.request_id] = group
                continue
            if seq.num_output_tokens == 0 and len(group.seqs) < seq.params.num_sequences:
                self._fork(group, seq, seq.params.num_sequences)  # the prompt was computed once for all
                targets = group.seqs
            else:
                targets = [seq]
            sample_seqs += targets
            sample_rows += [row] * len(targets)
        launched = _Launched(seqs=sample_seqs, indices=[], tokens=None, host=None, rows={}, beam_groups=beam_groups,
                             run_ahead=self.async_scheduling and not beam_groups and all(map(_runs_ahead, sample_seqs)))
        if sample_seqs:
            if sample_rows != list(range(len(rows))):
                logits = logits[self.runner.xp.asarray(np.array(sample_rows))]
            launched.tokens = sample_on_device(logits, sample_seqs, self.tokenizer.eos_token_ids, self.rng)
            launched.host = HostCopy(launched.tokens)
            if not launched.run_ahead:
                launched.logits = logits  # for logprobs: read before the next step overwrites them
            for row, seq in enumerate(sample_seqs):
                launched.indices.append(len(seq.token_ids))
                seq.token_ids.append(PENDING_TOKEN)
                launched.rows[seq.seq_id] = row
        return launched

    def _process(self, launched: _Launched, advanced: dict[str, SequenceGroup]) -> None:
        """Read a launched step's tokens back and append them: detokenize, check stops, step beams."""
        if launched.seqs:
            tokens = launched.host.result().tolist()
            if launched.logits is not None:
                record_logprobs(launched.logits, launched.seqs, tokens)
            for seq, index, token in zip(launched.seqs, launched.indices, tokens):
                if seq.is_finished:  # aborted, or ended by its previous token: this one is dropped
                    del seq.token_ids[index:]
                    continue
                later = seq.token_ids[index + 1:]  # the pending token of a step launched since
                del seq.token_ids[index:]
                self._append_token(seq, token)
                if later and not seq.is_finished:
                    seq.token_ids += later
                advanced[seq.request_id] = self.groups[seq.request_id]
        for group in launched.beam_groups.values():
            if all(s.pending_logprobs is not None for s in group.live()):
                self._beam_step(group)
                advanced[group.request_id] = group

    def _fork(self, group: SequenceGroup, seq: Sequence, count: int) -> None:
        """Turn a one-sequence group into `count` sequences sharing seq's blocks."""
        for index in range(len(group.seqs), count):
            child = seq.fork(index)
            self.blocks.fork(seq, child)
            group.seqs.append(child)

    def _beam_step(self, group: SequenceGroup) -> None:
        """Advance a beam-search group by one token: fork, keep or drop beams (see beam_search.py)."""
        eos = group.params.stop_token_ids + ([] if group.params.ignore_eos else self.tokenizer.eos_token_ids)
        live = group.live()
        at_max_length = live[0].num_tokens + 1 >= live[0].token_limit
        choices, done = beam_step(group, eos, at_max_length)
        kids: dict[int, list[tuple[int, float]]] = {}
        for parent, token, score in choices:
            kids.setdefault(parent, []).append((token, score))
        beams = []
        for p, seq in enumerate(live):
            seq.pending_logprobs = None
            for j, (token, score) in enumerate(kids.get(p, [])):
                beam = seq if j == len(kids[p]) - 1 else seq.fork(len(group.seqs) + len(beams))
                if beam is not seq:
                    self.blocks.fork(seq, beam)
                beam.token_ids.append(token)
                beam.cumulative_logprob = score
                beams.append(beam)
            if p not in kids:
                self.scheduler.blocks.free(seq)  # a beam that no candidate continues
        group.seqs = beams
        if done:
            self.scheduler.finish(group, "length")

    def _append_token(self, seq: Sequence, token: int) -> None:
        """Add a sampled token, detokenize it and decide whether the sequence is done."""
        p = seq.params
        seq.token_ids.append(token)
        if seq.first_token_time is None:
            seq.first_token_time = time.monotonic()
        seq.output_text += seq.detokenizer.add(token)
        num_output_tokens = seq.num_output_tokens
        longest_stop = max(map(len, p.stop)) if p.stop else 0
        reason, stop_reason = None, None
        if num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                reason, stop_reason = "stop", token
            elif not p.ignore_eos and token in self.tokenizer.eos_token_ids:
                reason = "stop"
            elif p.stop:
                reason, stop_reason = self._find_stop_string(seq, longest_stop)
        if reason is None and len(seq.token_ids) >= seq.token_limit:
            reason = "length"
        if reason is not None:
            self.scheduler.finish_seq(seq, reason)
            seq.stop_reason = stop_reason
            seq.released_chars = len(seq.output_text)
        else:  # hold back what could be the start of a stop string
            seq.released_chars = max(seq.released_chars, len(seq.output_text) - max(longest_stop - 1, 0))

    @staticmethod
    def _find_stop_string(seq: Sequence, longest: int) -> tuple[str | None, str | None]:
        """If a stop string now appears in the output, cut the text there and return ("stop", the string)."""
        text = seq.output_text
        search_from = max(0, seq.released_chars - longest)
        hits = [(text.find(s, search_from), s) for s in seq.params.stop]
        hits = [(i, s) for i, s in hits if i >= 0]
        if not hits:
            return None, None
        index, stop = min(hits)
        seq.output_text = text[:index + (len(stop) if seq.params.include_stop_str_in_output else 0)]
        return "stop", stop

    def _output(self, group: SequenceGroup) -> RequestOutput:
        params, seqs, finished = group.params, group.seqs, group.is_finished
        if params.beam_width > 1:
            completions = [self._beam_output(group, i, score, beam)
                           for i, (score, beam) in enumerate(group.beam_finished[:params.n])]
        else:
            if finished and len(seqs) > params.n:  # best_of: the n most likely samples
                seqs = sorted(seqs, key=lambda s: -s.cumulative_logprob)[:params.n]
            completions = [self._completion(group, i, s, finished) for i, s in enumerate(seqs[:params.n])]
        if len(group.seqs) == 1:  # the usual case, without a generator per request per step
            first = group.seqs[0].first_token_time or None
        else:
            first = min((s.first_token_time for s in group.seqs if s.first_token_time), default=None)
        return RequestOutput(group.request_id, group.prompt, group.prompt_token_ids, completions,
                             finished, group.num_preemptions, group.arrival_time, first)

    def _completion(self, group: SequenceGroup, index: int, seq: Sequence, finished: bool) -> CompletionOutput:
        streamed = group.streamed_chars.get(seq.index, 0)
        group.streamed_chars[seq.index] = seq.released_chars
        reason = seq.finish_reason or (group.finish_reason if finished else None)
        ids = seq.output_token_ids
        if ids and ids[-1] == PENDING_TOKEN:  # the token of a step still on the device
            ids.pop()
        return CompletionOutput(index, seq.output_text[:seq.released_chars], ids, seq.cumulative_logprob,
                                reason, seq.stop_reason, seq.logprobs if seq.params.logprobs is not None else None,
                                seq.output_text[streamed:seq.released_chars])

    def _beam_output(self, group: SequenceGroup, index: int, score: float, beam: Sequence) -> CompletionOutput:
        ids = beam.output_token_ids
        text = self.tokenizer.decode(ids, skip_special_tokens=group.params.skip_special_tokens)
        ended = bool(ids) and (ids[-1] in group.params.stop_token_ids or
                               ids[-1] in self.tokenizer.eos_token_ids and not group.params.ignore_eos)
        return CompletionOutput(index, text, ids, beam.cumulative_logprob, "stop" if ended else "length",
                                delta=text)

    def _update_stats(self, tokens: int, elapsed: float) -> None:
        s, running = self.stats, [seq for g in self.scheduler.running for seq in g.live()]
        s.num_running = len(running)
        s.num_waiting = self.scheduler.num_waiting_seqs  # kept by the scheduler: the queue can be long
        s.kv_blocks_used = self.blocks.num_used
        s.kv_blocks_unshared = sum(len(seq.block_table) for seq in running)
        s.kv_slots_used = sum(seq.num_computed_tokens for seq in running)
        s.kv_slots_allocated = s.kv_blocks_unshared * self.blocks.block_size
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_cached_tokens = self.scheduler.num_cached_tokens
        s.num_computed_tokens += tokens
        s.step_tokens, s.step_time = tokens, elapsed
        if running:
            s.history.append((s.kv_slots_used, s.kv_slots_allocated))
