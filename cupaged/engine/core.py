"""EngineCore: token ids in, token ids out, one step at a time.

The core owns the model runner, the KV block manager, the scheduler and the sampler. A request reaches it as an
`EngineCoreRequest` (prompt token ids and sampling parameters); `step()` schedules one batch, runs the model,
samples, and returns an `EngineCoreOutputs`: for every request that advanced, each sequence's new token ids, its
finish reason (stop token, EOS, length) and the logprobs asked for. Text, stop strings and output formatting are
the front's (output_processor.py), so the core's critical path holds no tokenizer work.

Async scheduling (DESIGN.md): `step()` launches step n+1 before it reads back step n's tokens, so the host's work
on step n overlaps the GPU's on step n+1; the tokens still on the device are private to the core.

A step that raises (a kernel error, out of memory, a bug) fails the requests it held with finish reason
"error" and frees their blocks; the core goes on with the requests that wait and those that come.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupaged import device as devices
from cupaged.checkpoint import dummy_weights, open_checkpoint, quantize_at_load
from cupaged.config import check_runnable, resolve_max_model_len
from cupaged.device import HostCopy
from cupaged.engine.beam_search import beam_step
from cupaged.engine.block_manager import BlockManager
from cupaged.engine.model_runner import ModelRunner
from cupaged.engine.protocol import (CoreInfo, EngineCoreOutputs, EngineCoreRequest, EngineStats, RequestDelta,
                                     SequenceDelta)
from cupaged.engine.scheduler import ScheduledBatch, Scheduler
from cupaged.engine.sequence import PENDING_TOKEN, Sequence, SequenceGroup
from cupaged.models.llama import expected_weights
from cupaged.parallel.sharding import check_tp, gpu_count
from cupaged.parallel.tp_runner import TensorParallelRunner
from cupaged.engine.sampling import GrammarMasks, grammar_masks, record_logprobs, sampling_metadata
from cupaged.sampler import log_softmax, mask_tokens, sample_on_device
from cupaged.kv_cache import resolve_kv_cache_dtype
from cupaged.layers import fp8_linear
from cupaged.sampling_params import SamplingParams, check_token_ids
from cupaged.structured import Matcher, build_tokenizer, grammar_for

logger = logging.getLogger(__name__)


@dataclass
class _Launched:
    """A step queued on the device: its forward, then its sampling (`_sample`), whose tokens the host has not read
    yet."""

    seqs: list[Sequence]               # the sequences that get a token, in the order of `tokens`
    logits: Any                        # the forward's logits, until sampled; then kept when logprobs must be recorded
    sample_rows: list[int]             # each sequence's row in `logits` (n > 1 samples share their prompt's row)
    beam_rows: list[tuple[Sequence, int]]  # beams and their row in `logits`
    beam_groups: dict[str, SequenceGroup]
    run_ahead: bool                    # whether the next step may be launched before this one is processed
    constrained: bool                  # a row has a grammar: its mask needs every token before this step's
    indices: list[int] = field(default_factory=list)  # where each one's token goes in token_ids (PENDING_TOKEN)
    tokens: Any = None                 # the sampled tokens, on the device
    host: HostCopy | None = None       # ...and their copy to the host, under way
    rows: dict[int, int] = field(default_factory=dict)  # seq_id -> row in `tokens`: the next step's inputs


def _runs_ahead(seq: Sequence) -> bool:
    """Whether seq's next step can be launched before its sampled token reaches the host: not when that step
    needs the host's view of the token (penalties and bad words of several tokens read the token history, logprobs
    read this step's logits, the samples of n / best_of and beams are chosen on the host). A grammar's next mask
    does too, but only for sampling: its step's forward runs ahead, its sampling waits (see `_step`)."""
    p = seq.params
    return (p.num_sequences == 1 and p.logprobs is None and p.repetition_penalty == 1.0
            and not p.presence_penalty and not p.frequency_penalty and all(len(w) == 1 for w in seq.bad_words))


def _reports_every_step(params: Any) -> bool:
    """Whether the front needs a request's tokens as they come: not for final_only requests without stop strings
    (the front then reads the whole output once, when it finishes)."""
    return params.output_kind != "final_only" or bool(params.stop)


class EngineCore:
    def __init__(self, model: str, *, dtype: str = "auto", device: str | None = None, block_size: int = 16,
                 max_num_seqs: int = 256, max_num_batched_tokens: int | None = None,
                 max_model_len: int | None = None, gpu_memory_utilization: float = 0.9,
                 cpu_kv_cache_bytes: int = 2 << 30, num_kv_blocks: int | None = None, seed: int = 0,
                 enable_prefix_caching: bool = True, enforce_eager: bool = False, load_format: str = "auto",
                 async_scheduling: bool = True, max_logprobs: int = 20, tensor_parallel_size: int = 1,
                 gguf_dequantize: bool = False, kv_cache_dtype: str = "auto", quantization: str | None = None):
        check_engine_options(block_size=block_size, max_num_seqs=max_num_seqs,
                             max_num_batched_tokens=max_num_batched_tokens, gpu_memory_utilization=gpu_memory_utilization,
                             cpu_kv_cache_bytes=cpu_kv_cache_bytes, num_kv_blocks=num_kv_blocks, seed=seed,
                             load_format=load_format, max_logprobs=max_logprobs, gguf_dequantize=gguf_dequantize)
        self.kv_cache_dtype = resolve_kv_cache_dtype(kv_cache_dtype)  # ValueError naming the option
        quantization = fp8_linear.resolve_quantization(quantization)
        self.device = devices.set_device(device)
        xp = devices.xp()
        if dtype == "auto":
            dtype = "bfloat16" if self.device == "cuda" else "float32"
        self.dtype = devices.resolve_dtype(dtype)
        t0 = time.perf_counter()
        self.config, self.tokenizer, read_tensors = open_checkpoint(model)
        check_runnable(self.config, self.device, self.dtype, cuda_graphs=not enforce_eager)
        check_tp(self.config, tensor_parallel_size, gpu_count(self.device), quantization)
        if quantization and str(model).endswith(".gguf"):
            raise ValueError(f"quantization={quantization!r} applies to safetensors checkpoints; a GGUF file's "
                             "weights are quantized already")
        self.quantization = quantization or self.config.quantization  # a checkpoint in FP8 is read as such
        if self.quantization:
            fp8_linear.check_device(self.device, self.dtype)
        model_len = resolve_max_model_len(self.config, max_model_len)
        if load_format == "dummy":
            tensors = dummy_weights(expected_weights(self.config), self.dtype, xp, seed)
        else:
            # on the GPU a GGUF's block-quantized weights stay quantized unless asked (layers/gguf_ops.py)
            tensors = read_tensors(expected_weights(self.config), self.dtype.name,
                                   dequantize=gguf_dequantize or self.device != "cuda")
        if quantization:  # linear layers quantized to FP8 on the device they are uploaded to
            tensors = quantize_at_load(tensors)
        max_num_batched_tokens = max_num_batched_tokens or max(model_len if self.device == "cpu" else 8192, 1)
        runner_args = (self.config, tensors, self.dtype, self.device, xp, block_size, max_num_batched_tokens,
                       model_len, max_num_seqs, self.kv_cache_dtype)
        self.runner = ModelRunner(*runner_args) if tensor_parallel_size == 1 else \
            TensorParallelRunner(tensor_parallel_size, *runner_args)
        del tensors
        num_blocks = num_kv_blocks or self.runner.profile_num_blocks(gpu_memory_utilization, cpu_kv_cache_bytes)
        if num_blocks * block_size < model_len:
            if max_model_len is not None:
                raise ValueError(f"max_model_len={max_model_len} does not fit the KV cache, which holds "
                                 f"{num_blocks * block_size} tokens: lower max_model_len or give the cache more "
                                 "memory (gpu_memory_utilization, cpu_kv_cache_bytes, num_kv_blocks)")
            logger.warning("the KV cache holds %d tokens, fewer than the model's context; max_model_len is now %d",
                           num_blocks * block_size, num_blocks * block_size)
            model_len = num_blocks * block_size
        self.runner.allocate_cache(num_blocks, model_len)
        if self.device == "cuda":
            self.runner.prepare_graphs(capture=not enforce_eager)
        self.max_model_len = model_len
        self.max_logprobs = max_logprobs  # the most logprobs a request may ask for (vLLM's option; -1: no limit)
        self.eos_token_ids = self.tokenizer.eos_token_ids
        self._grammar_tokenizer = None  # llguidance's tokenizer, built when a request first asks for a grammar
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching)
        self.scheduler = Scheduler(self.blocks, max_num_seqs, max_num_batched_tokens)
        self.rng = np.random.default_rng(seed)
        self.groups: dict[str, SequenceGroup] = {}
        self._aborted: list[SequenceGroup] = []  # reported by the next step
        self.async_scheduling = async_scheduling
        self._in_flight: _Launched | None = None  # launched, not yet processed (async scheduling)
        self.stats = EngineStats(kv_blocks_total=num_blocks)
        # Host seconds per phase of a step, summed (benchmarks read them): scheduling, launching the step, and
        # processing the sampled tokens, of which waiting for the GPU to deliver them is counted again apart; the
        # grammars' masks (part of launching), over num_masked_steps steps.
        self.timings = {"schedule": 0.0, "launch": 0.0, "process": 0.0, "wait_for_tokens": 0.0, "masks": 0.0}
        self.num_masked_steps = 0  # steps with a constrained row
        # Set to a list to record each step's (query lens, context lens, rows sampled): bench/floor.py's input.
        # On the GPU each step's work is also bracketed by two CUDA events, in trace_events.
        self.trace: list[tuple[np.ndarray, np.ndarray, int]] | None = None
        self.trace_events: list[tuple[Any, Any]] = []
        # Set to a list to record each step's (KV slots used, slots allocated): bench/bench_kv_waste.py's input.
        self.kv_history: list[tuple[int, int]] | None = None
        logger.info("loaded %s (%s, %d layers) as %s%s on %s in %.1fs; KV cache (%s): %d blocks of %d tokens, "
                    "%d tokens at most (%.2f GiB)", model, self.config.architecture, self.config.num_layers,
                    self.dtype.name, f" (linear layers {self.quantization})" if self.quantization else "",
                    self.device, time.perf_counter() - t0, self.kv_cache_dtype, num_blocks,
                    block_size, num_blocks * block_size, num_blocks * self.runner.bytes_per_block() / 2**30)

    def info(self) -> CoreInfo:
        return CoreInfo(self.max_model_len, self.blocks.num_blocks, self.blocks.block_size, self.config.vocab_size,
                        self.device, self.dtype.name, self.max_logprobs, self.kv_cache_dtype)

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request: EngineCoreRequest) -> None:
        """Queue a request. Raises ValueError, with the reason, for a request that can never be served."""
        request_id, ids, params = request.request_id, request.prompt_token_ids, request.params
        if request_id in self.groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        longest = check_request(ids, params, self.info())
        # it stops at `longest` tokens (a prompt that fills the context still gets one token)
        limit = max(longest, len(ids) + 1)
        matcher = self._matcher(params.structured_outputs) if params.structured_outputs is not None else None
        group = SequenceGroup(request_id, [Sequence(request_id, ids, params, token_limit=limit,
                                                    bad_words=request.bad_words_token_ids, matcher=matcher)])
        self.groups[request_id] = group
        self.scheduler.add(group)

    def _matcher(self, structured: Any) -> Matcher:
        """A matcher at the start of a request's grammar (its forks copy it). Builds llguidance's tokenizer the
        first time: engines that never constrain output never pay for it."""
        if self._grammar_tokenizer is None:
            t0 = time.perf_counter()
            self._grammar_tokenizer = build_tokenizer(self.tokenizer, self.config.vocab_size)
            logger.info("built the structured-output tokenizer in %.2fs", time.perf_counter() - t0)
        return Matcher.create(self._grammar_tokenizer, grammar_for(structured))

    def abort(self, request_id: str, index: int | None = None) -> bool:
        """Cancel a request (or only its sequence `index`: the front found a stop string in it); its blocks are
        freed at once. Returns False if it is unknown or already finished."""
        group = self.groups.get(request_id)
        if group is None or group.is_finished:
            return False
        if index is not None:
            seq = next((s for s in group.live() if s.index == index), None)
            if seq is None:
                return False
            if len(group.live()) > 1:
                self.scheduler.finish_seq(seq, "abort")
                self._count()
                return True
        self.scheduler.finish(group, "abort")
        group.finish_reason = "abort"
        self._aborted.append(group)
        self._count()
        return True

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished() or bool(self._aborted) or self._in_flight is not None

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> EngineCoreOutputs:
        """Run one batch; report the requests that advanced (with async scheduling: in the previous step).

        A step that raises fails the requests it held (finish reason "error") and the core goes on, unless the
        error says the device is lost (a CUDA error: the context is unusable from then on), which is raised after
        those requests are failed: a core process then exits, and its front reports the core's death."""
        try:
            return self._step()
        except Exception as exc:  # noqa: BLE001 - fail the step's requests, keep serving the others
            logger.exception("an engine step failed")
            failed = self._fail_running(f"the engine step failed: {type(exc).__name__}: {exc}")
            if device_lost(exc):
                raise DeviceLost(f"the GPU failed ({type(exc).__name__}: {exc}); the engine cannot go on") from exc
            return failed

    def _step(self) -> EngineCoreOutputs:
        t0 = time.perf_counter()
        advanced: dict[str, SequenceGroup] = {g.request_id: g for g in self._aborted}
        self._aborted = []
        previous, self._in_flight = self._in_flight, None
        batch = self.scheduler.schedule()
        t1 = time.perf_counter()
        self.timings["schedule"] += t1 - t0
        launched = self._launch(batch, previous) if batch.seqs else None
        if launched is not None and not launched.constrained:
            self._sample(launched)
        self.timings["launch"] += time.perf_counter() - t1
        if previous is not None:
            self._process(previous, advanced)
        if launched is not None:
            if launched.constrained:
                # A grammar's mask follows from every token before: its step's sampling is queued only now that the
                # matchers have consumed the previous step's, while the GPU runs this step's forward.
                t2 = time.perf_counter()
                self._sample(launched)
                self.timings["launch"] += time.perf_counter() - t2
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
        outputs = [delta for g in advanced.values() if (delta := self._report(g)) is not None]
        for group in advanced.values():
            if group.is_finished:
                del self.groups[group.request_id]
        return EngineCoreOutputs(outputs, self.stats)

    def _launch(self, batch: ScheduledBatch, previous: _Launched | None) -> _Launched:
        """Queue the batch's forward on the device, and say which sequences sample from which logits row (`_sample`
        queues that)."""
        self.runner.copy_blocks(batch.block_copies)
        pending = (previous.tokens, previous.rows) if previous is not None else None
        if self.trace is not None:
            self.trace.append((np.array(batch.num_new_tokens, np.int32),
                               np.array([s.num_computed_tokens + n for s, n in zip(batch.seqs, batch.num_new_tokens)],
                                        np.int32), 0))
            if self.device == "cuda":
                import cupy

                self.trace_events.append((cupy.cuda.Event(), cupy.cuda.Event()))
                self.trace_events[-1][0].record()
        logits, rows = self.runner.run(batch.seqs, batch.num_new_tokens, pending)
        if self.trace is not None:
            self.trace[-1] = self.trace[-1][:2] + (len(rows),)
        for seq, n in zip(batch.seqs, batch.num_new_tokens):
            seq.num_computed_tokens += n
        sample_seqs, sample_rows, beam_rows, beam_groups = [], [], [], {}
        for row, i in enumerate(rows):
            seq = batch.seqs[i]
            group = self.groups[seq.request_id]
            if seq.params.beam_width > 1:
                beam_rows.append((seq, row))
                beam_groups[group.request_id] = group
                continue
            if seq.num_output_tokens == 0 and len(group.seqs) < seq.params.num_sequences:
                self._fork(group, seq, seq.params.num_sequences)  # the prompt was computed once for all
                targets = group.seqs
            else:
                targets = [seq]
            sample_seqs += targets
            sample_rows += [row] * len(targets)
        return _Launched(seqs=sample_seqs, logits=logits, sample_rows=sample_rows, beam_rows=beam_rows,
                         beam_groups=beam_groups,
                         run_ahead=self.async_scheduling and not beam_groups and all(map(_runs_ahead, sample_seqs)),
                         constrained=any(s.matcher is not None for s in sample_seqs + [s for s, _ in beam_rows]))

    def _sample(self, launched: _Launched) -> None:
        """Queue a launched step's sampling, with its grammars' masks, and the copy of its tokens to the host; the
        tokens stay on the device (PENDING_TOKEN in the sequences' token ids) until `_process` reads them. Beams get
        their (masked) log-probabilities, which `_process` steps."""
        logits, xp = launched.logits, self.runner.xp
        launched.logits = None
        self.num_masked_steps += launched.constrained
        if launched.beam_rows:
            beams = [seq for seq, _ in launched.beam_rows]
            logprobs = log_softmax(logits[xp.asarray(np.array([row for _, row in launched.beam_rows]))])
            masks = self._grammar_masks(beams) if launched.constrained else None
            if masks is not None:  # a beam's candidates are only the tokens its grammar allows
                mask_tokens(logprobs, *masks)
            for j, seq in enumerate(beams):
                seq.pending_logprobs = logprobs[j]
        seqs = launched.seqs
        if seqs:
            if launched.sample_rows != list(range(len(logits))):
                logits = logits[xp.asarray(np.array(launched.sample_rows))]
            masks = self._grammar_masks(seqs) if launched.constrained else None
            meta = sampling_metadata(seqs, self.eos_token_ids, self.rng, masks)
            launched.tokens = sample_on_device(logits, meta)
            launched.host = HostCopy(launched.tokens)
            if not launched.run_ahead:
                launched.logits = logits  # for logprobs: read before the next step overwrites them
            for row, seq in enumerate(seqs):
                launched.indices.append(len(seq.token_ids))
                seq.token_ids.append(PENDING_TOKEN)
                launched.rows[seq.seq_id] = row
        if self.trace is not None and self.device == "cuda":
            self.trace_events[-1][1].record()  # after the sampling kernel and the copy of its tokens

    def _grammar_masks(self, seqs: list[Sequence]) -> GrammarMasks | None:
        """grammar_masks(seqs), its host time counted in timings["masks"]."""
        t0 = time.perf_counter()
        masks = grammar_masks(seqs)
        self.timings["masks"] += time.perf_counter() - t0
        return masks

    def _process(self, launched: _Launched, advanced: dict[str, SequenceGroup]) -> None:
        """Read a launched step's tokens back and append them: check stops, step beams."""
        t0 = time.perf_counter()
        if launched.seqs:
            tokens = launched.host.result().tolist()
            t1 = time.perf_counter()
            self.timings["wait_for_tokens"] += t1 - t0
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
        self.timings["process"] += time.perf_counter() - t0

    def _fork(self, group: SequenceGroup, seq: Sequence, count: int) -> None:
        """Turn a one-sequence group into `count` sequences sharing seq's blocks."""
        for index in range(len(group.seqs), count):
            child = seq.fork(index)
            self.blocks.fork(seq, child)
            group.seqs.append(child)

    def _beam_step(self, group: SequenceGroup) -> None:
        """Advance a beam-search group by one token: fork, keep or drop beams (see beam_search.py)."""
        eos = group.params.stop_token_ids + ([] if group.params.ignore_eos else self.eos_token_ids)
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
                if beam.matcher is not None:
                    beam.matcher.consume(token)
                beam.cumulative_logprob = score
                beams.append(beam)
            if p not in kids:
                self.scheduler.blocks.free(seq)  # a beam that no candidate continues
        group.seqs = beams
        if done:
            self.scheduler.finish(group, "length")

    def _append_token(self, seq: Sequence, token: int) -> None:
        """Add a sampled token and decide whether the sequence is done (stop token, EOS, a complete grammar,
        length; stop strings are the front's)."""
        p = seq.params
        seq.token_ids.append(token)
        reason = None
        if seq.num_output_tokens >= p.min_tokens:
            if token in p.stop_token_ids:
                reason, seq.stop_reason = "stop", token
            elif not p.ignore_eos and token in self.eos_token_ids:
                reason = "stop"
        if seq.matcher is not None and reason is None:
            seq.matcher.consume(token)
            if seq.matcher.is_stopped():  # the grammar is complete: only EOS could follow
                reason = "stop"
        if reason is None and len(seq.token_ids) >= seq.token_limit:
            reason = "length"
        if reason is not None:
            self.scheduler.finish_seq(seq, reason)

    # -- reports ----------------------------------------------------------------------------------------------
    def _report(self, group: SequenceGroup) -> RequestDelta | None:
        """What the front has not heard of a request yet; None when there is nothing it needs now."""
        finished = group.is_finished
        if not finished and not _reports_every_step(group.params):
            return None
        if group.params.beam_width > 1:
            if not finished:
                return None
            seqs = [self._beam_delta(group, i, beam) for i, (_, beam) in enumerate(group.beam_finished[:group.params.n])]
        else:
            seqs = [d for s in group.seqs if (d := self._seq_delta(s, group, finished)) is not None]
        return RequestDelta(group.request_id, seqs, finished, group.num_preemptions, group.error)

    @staticmethod
    def _seq_delta(seq: Sequence, group: SequenceGroup, finished: bool) -> SequenceDelta | None:
        end = len(seq.token_ids)
        if end and seq.token_ids[-1] == PENDING_TOKEN:  # the token of a step still on the device
            end -= 1
        start = seq.num_prompt_tokens + seq.num_reported
        reason = seq.finish_reason or (group.finish_reason if finished else None)
        if end <= start and (reason is None or seq.finish_reported):
            return None
        delta = SequenceDelta(seq.index, seq.token_ids[start:end], reason, seq.stop_reason, seq.cumulative_logprob)
        if seq.params.logprobs is not None:
            delta.logprobs = seq.logprobs[seq.num_reported:end - seq.num_prompt_tokens]
        seq.num_reported = end - seq.num_prompt_tokens
        seq.finish_reported = reason is not None
        return delta

    def _beam_delta(self, group: SequenceGroup, index: int, beam: Sequence) -> SequenceDelta:
        ids = beam.output_token_ids
        p = group.params
        ended = bool(ids) and (ids[-1] in p.stop_token_ids or ids[-1] in self.eos_token_ids and not p.ignore_eos)
        return SequenceDelta(index, ids, "stop" if ended else "length", None, beam.cumulative_logprob)

    def _fail_running(self, message: str) -> EngineCoreOutputs:
        """After a step raised: end every request that was running or in flight with finish reason "error" (their
        state is not to be trusted), free their blocks, and report them. Waiting requests stay queued."""
        self._in_flight = None
        failed = list(self.scheduler.running) + self._aborted
        self._aborted = []
        outputs = []
        for group in failed:
            for seq in group.seqs:
                if seq.token_ids and seq.token_ids[-1] == PENDING_TOKEN:
                    seq.token_ids = [t for t in seq.token_ids if t != PENDING_TOKEN]
            if not group.is_finished:
                self.scheduler.finish(group, "error")
                group.finish_reason, group.error = "error", message
            outputs.append(RequestDelta(group.request_id, [SequenceDelta(s.index, [], group.finish_reason)
                                                           for s in group.seqs], True, group.num_preemptions,
                                        group.error))
            self.groups.pop(group.request_id, None)
        self._update_stats(0, 0.0)
        return EngineCoreOutputs(outputs, self.stats)

    def _update_stats(self, tokens: int, elapsed: float) -> None:
        s = self.stats
        s.num_computed_tokens += tokens
        s.step_tokens, s.step_time = tokens, elapsed
        running = self._count()
        if running and self.kv_history is not None:
            self.kv_history.append((s.kv_slots_used, s.kv_slots_allocated))

    def _count(self) -> list[Sequence]:
        """Refresh the stats' counts of sequences, requests, blocks and slots; returns the running sequences."""
        s, running = self.stats, [seq for g in self.scheduler.running for seq in g.live()]
        s.num_running = len(running)
        s.num_waiting = self.scheduler.num_waiting_seqs  # kept by the scheduler: the queue can be long
        s.num_running_requests = len(self.scheduler.running)
        s.num_waiting_requests = len(self.scheduler.waiting)
        s.kv_blocks_used = self.blocks.num_used
        s.kv_blocks_unshared = sum(len(seq.block_table) for seq in running)
        s.kv_slots_used = sum(seq.num_computed_tokens for seq in running)
        s.kv_slots_allocated = s.kv_blocks_unshared * self.blocks.block_size
        s.num_preemptions = self.scheduler.num_preemptions
        s.num_cached_tokens = self.scheduler.num_cached_tokens
        return running


class DeviceLost(RuntimeError):
    """A CUDA error left the device unusable: no further step can run in this process."""


def device_lost(exc: BaseException) -> bool:
    """Whether `exc` is a CUDA runtime or driver error (an illegal address, a launch failure, an ECC error...):
    those are sticky, every later call fails too. Out-of-memory is not one of them: it fails a step, not the device."""
    return type(exc).__name__ in ("CUDARuntimeError", "CUDADriverError") and \
        type(exc).__module__.startswith("cupy_backends")


def check_engine_options(*, block_size: int, max_num_seqs: int, max_num_batched_tokens: int | None,
                         gpu_memory_utilization: float, cpu_kv_cache_bytes: int, num_kv_blocks: int | None,
                         seed: int, load_format: str, max_logprobs: int, gguf_dequantize: bool = False) -> None:
    """Refuse, naming it, an engine option that cannot work (rather than change it silently, or hang on it)."""
    def integer(value: object, low: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and value >= low

    checks = [
        (block_size in (8, 16, 32), f"block_size must be 8, 16 or 32, got {block_size!r}"),
        (integer(max_num_seqs, 1), f"max_num_seqs must be an integer >= 1, got {max_num_seqs!r}"),
        (max_num_batched_tokens is None or integer(max_num_batched_tokens, 1),
         f"max_num_batched_tokens must be an integer >= 1, got {max_num_batched_tokens!r}"),
        (isinstance(gpu_memory_utilization, (int, float)) and 0 < gpu_memory_utilization <= 1,
         f"gpu_memory_utilization must be in (0, 1], got {gpu_memory_utilization!r}"),
        (integer(cpu_kv_cache_bytes, 1), f"cpu_kv_cache_bytes must be an integer >= 1, got {cpu_kv_cache_bytes!r}"),
        (num_kv_blocks is None or integer(num_kv_blocks, 1),
         f"num_kv_blocks must be an integer >= 1, got {num_kv_blocks!r}"),
        (integer(seed, 0), f"seed must be an integer >= 0, got {seed!r}"),
        (load_format in ("auto", "dummy"), f"load_format must be 'auto' or 'dummy' (random weights), got "
                                           f"{load_format!r}"),
        (integer(max_logprobs, -1), f"max_logprobs must be an integer >= -1 (-1: no limit), got {max_logprobs!r}"),
        (isinstance(gguf_dequantize, bool), f"gguf_dequantize must be True or False, got {gguf_dequantize!r}"),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(message)


def check_request(ids: list[int], params: SamplingParams, info: CoreInfo) -> int:
    """Raise ValueError unless the core can serve this request: a non-empty prompt of token ids within the
    vocabulary, no longer than the context, whose sequences fit the KV cache at their longest, with sampling
    parameters that fit the model (SamplingParams.verify_for_model). Returns that longest
    length (prompt plus max_tokens, within the context). The fronts call it before sending a request; the core
    calls it again."""
    if not ids:
        raise ValueError("the prompt is empty")
    check_token_ids("prompt", ids, info.vocab_size)
    params.verify_for_model(info.vocab_size, info.max_logprobs)
    if params.structured_outputs is not None:
        grammar_for(params.structured_outputs)  # refuses a schema, regex or grammar that does not compile
    if len(ids) > info.max_model_len:
        raise ValueError(f"the prompt has {len(ids)} tokens, more than the model's context of {info.max_model_len} "
                         "tokens")
    longest = min(len(ids) + (params.max_tokens or info.max_model_len), info.max_model_len)
    if params.num_sequences * -(-longest // info.block_size) > info.num_kv_blocks:
        raise ValueError(f"{params.num_sequences} sequences of up to {longest} tokens need more KV blocks than "
                         f"the cache has ({info.num_kv_blocks} of {info.block_size} tokens)")
    return longest
