"""LLMEngine: the in-process, single-threaded front of the engine core.

`add_request` tokenizes and queues a request (one that can never run is rejected there, with a clear error, and
the engine goes on serving the others); `step` runs one step of the core and turns its token ids into outputs
(output_processor.py: text, stop strings, logprobs, output kinds); `abort` cancels a request and frees its blocks.

The core runs in this process (`engine.core` is the EngineCore) unless `engine_core_process=True`, which starts it
in a process of its own (core_client.py); `step` then returns whatever the core has finished since the last call,
waiting for at least one step of it.
"""

from __future__ import annotations

import logging
import time

from cupaged.device import resolve_dtype
from cupaged.engine.core import EngineCore, check_request
from cupaged.engine.core_client import CoreDied, CoreProcess
from cupaged.engine.output_processor import CompletionOutput, Logprob, OutputProcessor, RequestOutput
from cupaged.engine.protocol import EngineCoreOutputs, EngineCoreRequest, EngineStats
from cupaged.sampling_params import SamplingParams, check_token_ids

logger = logging.getLogger(__name__)

__all__ = ["LLMEngine", "RequestOutput", "CompletionOutput", "Logprob", "EngineStats"]


class LLMEngine:
    """Engine options are EngineCore's (model, dtype, device, block_size, max_num_seqs, tensor_parallel_size, ...)."""

    def __init__(self, model: str, *, engine_core_process: bool = False, **options: object):
        if not isinstance(engine_core_process, bool):
            raise ValueError(f"engine_core_process must be True or False, got {engine_core_process!r}")
        if engine_core_process:
            self.core: EngineCore | CoreProcess = CoreProcess(model, options)
            info = self.core.info
            self.config, self.tokenizer = self.core.config, self.core.tokenizer
            self.max_model_len = info.max_model_len
            self.device, self.dtype = info.device, resolve_dtype(info.dtype)
            self._stats = EngineStats(kv_blocks_total=info.num_kv_blocks)
        else:
            self.core = EngineCore(model, **options)
            self.config, self.tokenizer = self.core.config, self.core.tokenizer
            self.max_model_len, self.device, self.dtype = self.core.max_model_len, self.core.device, self.core.dtype
        self.in_process = not engine_core_process
        self.processor = OutputProcessor(self.tokenizer)
        self._dead: str | None = None

    @property
    def stats(self) -> EngineStats:
        """The core's statistics after its last step (reported by the core's process when it has one)."""
        return self.core.stats if self.in_process else self._stats

    # -- requests ---------------------------------------------------------------------------------------------
    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None) -> None:
        """Queue a request. Raises ValueError, with the reason, for a request that can never be served."""
        if self._dead:
            raise RuntimeError(self._dead)
        params = params or SamplingParams()
        if request_id in self.processor.requests:
            raise ValueError(f"request id {request_id!r} is already in use")
        text = prompt if isinstance(prompt, str) else None
        ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else check_token_ids("prompt", prompt)
        request = EngineCoreRequest(request_id, ids, params, self.tokenizer.bad_words_token_ids(params.bad_words))
        if self.in_process:
            self.core.add_request(request)  # checks everything, raises ValueError
        else:
            check_request(ids, params, self.core.info)
            self.core.add_request(request)
        self.processor.add_request(request_id, text, ids, params, time.monotonic())

    def abort(self, request_id: str) -> bool:
        """Cancel a request; its blocks are freed at once. Returns False if it is unknown or already finished.
        Its last output (finish reason "abort") comes with the next step."""
        if not self.processor.abort(request_id):
            return False
        self.core.abort(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return self.processor.has_unfinished()

    # -- one step ---------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Run one step of the core. Returns an output for every request that produced text or finished (only
        the latter for requests whose output_kind is "final_only").

        With async scheduling the core runs one step ahead: its outputs are those of the previous step's tokens.
        """
        core_out = self._core_step()
        outputs, aborts = self.processor.process(core_out)
        for request_id, index in aborts:
            self.core.abort(request_id, index)
        return outputs

    def _core_step(self) -> EngineCoreOutputs:
        if self._dead:
            return EngineCoreOutputs([], self.stats)
        if self.in_process:
            if self.core.has_unfinished():
                return self.core.step()
            if self.processor.requests:  # a bug guard: never loop forever on requests the core does not have
                logger.error("the engine core lost %d request(s)", len(self.processor.requests))
                self.processor.fail_all("the engine core lost this request")
            return EngineCoreOutputs([], self.core.stats)
        try:
            out = self.core.get_outputs(block=bool(self.processor.requests))
        except CoreDied as exc:
            self._dead = str(exc)
            self.processor.fail_all(self._dead)
            return EngineCoreOutputs([], self._stats)
        if out is None:
            return EngineCoreOutputs([], self._stats)
        self._stats = out.stats
        return out

    def close(self) -> None:
        """Stop the core's process, if it has one (a no-op in process)."""
        if not self.in_process:
            self.core.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass
