"""LLM: offline batch generation on top of LLMEngine, with a progress bar."""

from __future__ import annotations

import dataclasses
import sys
from typing import Sequence as Seq

import click

from cupaged.engine.llm_engine import LLMEngine, RequestOutput
from cupaged.sampling_params import SamplingParams


class LLM:
    """`LLM("path/or/hub-id").generate(["Hello"], SamplingParams(max_tokens=32))`; engine options as keywords."""

    def __init__(self, model: str, **engine_options: object):
        self.engine = LLMEngine(model, **engine_options)
        self.tokenizer = self.engine.tokenizer
        self._counter = 0

    def generate(self, prompts: str | Seq[str] | Seq[Seq[int]],
                 sampling_params: SamplingParams | Seq[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for every prompt (text or token ids); outputs come back in the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        params_list = list(params) if isinstance(params, (list, tuple)) else [params] * len(prompts)
        if len(params_list) != len(prompts):
            raise ValueError(f"{len(prompts)} prompts but {len(params_list)} sampling parameters")
        ids = []
        for prompt, p in zip(prompts, params_list):
            request_id = f"offline-{self._counter}"
            self._counter += 1
            self.engine.add_request(request_id, prompt, dataclasses.replace(p, output_kind="final_only"))
            ids.append(request_id)
        finished: dict[str, RequestOutput] = {}
        show = use_tqdm and sys.stderr.isatty()
        with click.progressbar(length=len(ids), label="generating", file=sys.stderr,
                               show_pos=True) if show else _NoBar() as bar:
            while self.engine.has_unfinished_requests():
                for out in self.engine.step():
                    if out.finished:
                        finished[out.request_id] = out
                        bar.update(1)
        return [finished[i] for i in ids]

    def chat(self, messages: list[dict[str, str]], sampling_params: SamplingParams | None = None) -> RequestOutput:
        """One reply to a conversation, through the checkpoint's chat template."""
        return self.generate([self.tokenizer.encode_chat(messages)], sampling_params, use_tqdm=False)[0]


class _NoBar:
    def __enter__(self) -> "_NoBar":
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def update(self, n: int) -> None:
        return None
