"""SamplingParams: what to generate and how, with vLLM's parameter names and meanings, validated.

Validation is in two parts. Constructing a SamplingParams (and `dataclasses.replace` of one) checks the type and
range of every field and normalises them (NumPy scalars to int / float / bool, `stop` to a list, top_k -1 to 0).
`verify_for_model` checks what needs the model and engine (stop token ids within the vocabulary, logprobs within
max_logprobs, no logprobs with beam search); the engine's `add_request` calls it. Every error is a
`SamplingParamsError`, a ValueError whose `field` names the parameter and whose message names it and the bad value.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

_F32_MAX = float(np.finfo(np.float32).max)  # the sampler casts temperature to float32: above this it becomes inf

# Integer fields: (lowest, highest + 1, what they must be). Floats are refused, even integral ones (2.0): vLLM's
# SamplingParams refuses a float n too, the server's JSON checks refuse 2.0, and a float count is usually an
# unrounded computation. Counts stay below 2**63 because the sampler and engine keep them in int64 arrays.
_INTS: dict[str, tuple[int, int, str]] = {
    "n": (1, 2**63, "an integer in [1, 2**63)"),
    "best_of": (1, 2**63, "None or an integer in [1, 2**63)"),
    "top_k": (-1, 2**63, "an integer in [-1, 2**63) (-1 and 0 disable top-k)"),
    "seed": (0, 2**64, "None or an integer in [0, 2**64)"),  # NumPy's generators refuse negative seeds
    "max_tokens": (1, 2**63, "None or an integer in [1, 2**63)"),
    "min_tokens": (0, 2**63, "an integer in [0, 2**63)"),
    "logprobs": (0, 2**63, "None or an integer in [0, 2**63)"),
    "beam_width": (1, 2**63, "an integer in [1, 2**63)"),
}
_OPTIONAL = frozenset({"best_of", "seed", "max_tokens", "logprobs"})  # fields that may be None

# Float fields (int or float, finite, stored as float): (test of the value, what they must be).
_FLOATS: dict[str, tuple[Callable[[float], bool], str]] = {
    "temperature": (lambda v: 0 <= v <= _F32_MAX, "a number in [0, 3.4e38] (float32's range)"),
    "top_p": (lambda v: 0 < v <= 1, "a number in (0, 1]"),
    "min_p": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "repetition_penalty": (lambda v: v > 0, "a finite number > 0"),
    "presence_penalty": (lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "frequency_penalty": (lambda v: -2 <= v <= 2, "a number in [-2, 2]"),
    "length_penalty": (lambda v: True, "a finite number"),
}

_BOOLS = ("ignore_eos", "include_stop_str_in_output", "skip_special_tokens")


class SamplingParamsError(ValueError):
    """A request parameter of the wrong type or value. `field` names it (a SamplingParams field, or "prompt")."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _show(value: Any) -> str:
    """The bad value for a message: its repr (cut at 80 characters) and its type."""
    try:
        text = repr(value)
    except Exception:  # an int too long to print (Python's 4300-digit limit), or a repr that fails
        text = f"<an int of {value.bit_length()} bits>" if isinstance(value, int) else "<unprintable>"
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _integer(name: str, value: Any, lo: int, hi: int, words: str) -> int:
    """`value` as a Python int in [lo, hi): an int or NumPy integer, not a bool or a float."""
    if type(value) is not int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
            raise SamplingParamsError(name, f"{name} must be {words}, got {_show(value)}")
        value = int(value)
    if not lo <= value < hi:
        raise SamplingParamsError(name, f"{name} must be {words}, got {_show(value)}")
    return value


def _number(name: str, value: Any, ok: Callable[[float], bool], words: str) -> float:
    """`value` as a finite Python float for which ok(value) holds: an int or float (NumPy's too), not a bool."""
    if type(value) is not float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise SamplingParamsError(name, f"{name} must be {words}, got {_show(value)}")
        try:
            value = float(value)
        except OverflowError:  # an int too large for a float
            raise SamplingParamsError(name, f"{name} must be {words}, got {_show(value)}") from None
    if not math.isfinite(value) or not ok(value):
        raise SamplingParamsError(name, f"{name} must be {words}, got {_show(value)}")
    return value


def check_token_ids(name: str, ids: Any, vocab_size: int | None = None) -> list[int]:
    """`ids` (a list, tuple or 1-D NumPy integer array) as a list of Python ints, each an integer (not a bool or a
    float) in [0, vocab_size), or in [0, 2**63) without a vocab_size. Raises SamplingParamsError naming `name`."""
    hi = 2**63 if vocab_size is None else vocab_size
    words = f"a token id (an integer in [0, {'2**63' if vocab_size is None else vocab_size}))"
    if isinstance(ids, np.ndarray) and ids.ndim == 1 and ids.dtype.kind in "iu":
        ids = ids.tolist()  # Python ints, checked below (fast: they all pass the type test)
    elif not isinstance(ids, (list, tuple)):
        raise SamplingParamsError(name, f"{name} must be a list of token ids, got {_show(ids)}")
    if not all(type(t) is int for t in ids):  # NumPy integers to convert, or wrong types
        for i, t in enumerate(ids):
            if isinstance(t, (bool, np.bool_)) or not isinstance(t, numbers.Integral):
                raise SamplingParamsError(name, f"{name}[{i}] must be {words}, got {_show(t)}")
        ids = [int(t) for t in ids]
    if ids and not (0 <= min(ids) and max(ids) < hi):
        i = next(i for i, t in enumerate(ids) if not 0 <= t < hi)
        raise SamplingParamsError(name, f"{name}[{i}] must be {words}, got {_show(ids[i])}")
    return list(ids)


_STRUCTURED_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    """A constraint on the output (vLLM's names): a JSON schema (`json`, as a dict or its JSON text), any JSON
    object (`json_object`), a `regex` the whole output matches, a `choice` among strings, or a Lark `grammar`.
    Exactly one is set. Construction checks each one's type (SamplingParamsError naming "structured_outputs");
    whether a schema, regex or grammar compiles is checked by cupaged.structured.grammar_for."""

    json: str | dict | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool = False

    def __post_init__(self) -> None:
        name = "structured_outputs"
        if self.json is not None and not isinstance(self.json, (str, dict)):
            raise SamplingParamsError(name, f"structured_outputs.json must be a JSON schema (an object or its JSON "
                                            f"text), got {_show(self.json)}")
        for key in ("regex", "grammar"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not value):
                raise SamplingParamsError(name, f"structured_outputs.{key} must be a non-empty string, got "
                                                f"{_show(value)}")
        choice = self.choice
        if choice is not None:
            if not isinstance(choice, (list, tuple)) or not choice or \
                    not all(isinstance(c, str) and c for c in choice):
                raise SamplingParamsError(name, f"structured_outputs.choice must be a non-empty list of non-empty "
                                                f"strings, got {_show(choice)}")
            self.choice = list(choice)
        if type(self.json_object) is not bool:
            raise SamplingParamsError(name, f"structured_outputs.json_object must be True or False, got "
                                            f"{_show(self.json_object)}")
        given = [k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise SamplingParamsError(name, f"structured_outputs must set exactly one of json, regex, choice, "
                                            f"grammar and json_object, got {given or 'none'}")

    @property
    def kind(self) -> str:
        """Which constraint is set: "json", "regex", "choice", "grammar" or "json_object"."""
        return next(k for k in _STRUCTURED_KINDS if getattr(self, k) not in (None, False))


OUTPUT_KINDS = ("cumulative", "delta", "final_only")


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    `n` completions are returned; with `best_of` > n, best_of are sampled and the n with the highest cumulative
    log-probability returned. `beam_width` > 1 runs beam search instead of sampling, with transformers'
    `length_penalty` and `early_stopping` (True, False or "never"). temperature 0 means greedy. top_k 0 or -1 and
    top_p 1 disable those filters; min_p 0 disables min-p. repetition_penalty (>1 discourages) applies to prompt
    and output tokens, as in vLLM and transformers; presence_penalty and frequency_penalty (OpenAI's, -2..2) to
    output tokens. `seed` makes the request's samples reproducible whatever else is in the batch. `logprobs` = n
    returns the chosen token's log-probability and the n most likely tokens' at each step (0 for the chosen one
    alone). `output_kind` "cumulative" returns an output with everything so far every step the request advances;
    "delta" returns only what is new each time (text and token ids: what a server streams); "final_only" returns
    one, when it finishes (as `LLM.generate` asks, which saves decoding text no one reads before the end).

    Construction checks every field (see the module docstring) and raises SamplingParamsError (a ValueError) naming
    the field. Types accepted: integers are int or NumPy integers, never bool or float (2.0 included); numbers are
    int or float, finite, never bool; flags are bool; `stop` is a string or a list / tuple of non-empty strings;
    `stop_token_ids` a list, tuple or 1-D NumPy integer array of integers in [0, 2**63). After construction every
    field holds exactly the type annotated below (int, float, bool, list[str], list[int]). Fields assigned later
    are not checked.
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
    logit_bias: dict[int, float] | None = None      # token id -> added to its logit, in [-100, 100] (OpenAI's)
    allowed_token_ids: list[int] | None = None      # only these may be sampled
    bad_words: list[str] = field(default_factory=list)  # never generated (as the tokenizer writes them, with or
                                                        # without a leading space)
    structured_outputs: StructuredOutputsParams | None = None  # a grammar the output must follow

    def __post_init__(self) -> None:
        fields = self.__dict__
        for name, (lo, hi, words) in _INTS.items():
            value = fields[name]
            if type(value) is not int or not lo <= value < hi:
                if value is not None or name not in _OPTIONAL:
                    fields[name] = _integer(name, value, lo, hi, words)
        for name, (ok, words) in _FLOATS.items():
            value = fields[name]
            if type(value) is not float or not ok(value) or not math.isfinite(value):
                fields[name] = _number(name, value, ok, words)
        for name in _BOOLS:
            value = fields[name]
            if type(value) is not bool:
                if not isinstance(value, np.bool_):
                    raise SamplingParamsError(name, f"{name} must be True or False, got {_show(value)}")
                fields[name] = bool(value)
        stop = self.stop
        if isinstance(stop, str):
            stop = [stop]
        elif not isinstance(stop, (list, tuple)):
            raise SamplingParamsError("stop", f"stop must be a string or a list of strings, got {_show(stop)}")
        for i, s in enumerate(stop):
            if not isinstance(s, str) or not s:
                raise SamplingParamsError("stop", f"stop[{i}] must be a non-empty string, got {_show(s)}")
        self.stop = list(stop)
        self.stop_token_ids = check_token_ids("stop_token_ids", self.stop_token_ids)
        es = self.early_stopping
        if type(es) is not bool:
            if isinstance(es, np.bool_):
                self.early_stopping = bool(es)
            elif not isinstance(es, str) or es != "never":
                raise SamplingParamsError("early_stopping",
                                          f"early_stopping must be True, False or 'never', got {_show(es)}")
        if not isinstance(self.output_kind, str) or self.output_kind not in OUTPUT_KINDS:
            raise SamplingParamsError("output_kind", f"output_kind must be 'cumulative', 'delta' or 'final_only', "
                                                     f"got {_show(self.output_kind)}")
        if self.top_k == -1:
            self.top_k = 0
        self._check_masks()
        self._check_together()

    def _check_masks(self) -> None:
        """logit_bias, allowed_token_ids and bad_words: their types and ranges (the vocabulary is checked by
        verify_for_model)."""
        bias = self.logit_bias
        if bias is not None:
            if not isinstance(bias, dict):
                raise SamplingParamsError("logit_bias", f"logit_bias must be a dict of token id -> number, got "
                                                        f"{_show(bias)}")
            ids = check_token_ids("logit_bias", list(bias))
            values = [_number("logit_bias", v, lambda v: -100 <= v <= 100, "a number in [-100, 100]")
                      for v in bias.values()]
            self.logit_bias = dict(zip(ids, values))
        if self.allowed_token_ids is not None:
            self.allowed_token_ids = check_token_ids("allowed_token_ids", self.allowed_token_ids)
            if not self.allowed_token_ids:
                raise SamplingParamsError("allowed_token_ids", "allowed_token_ids must not be empty (None: all)")
        words = self.bad_words
        if not isinstance(words, (list, tuple)):
            raise SamplingParamsError("bad_words", f"bad_words must be a list of strings, got {_show(words)}")
        for i, w in enumerate(words):
            if not isinstance(w, str) or not w:
                raise SamplingParamsError("bad_words", f"bad_words[{i}] must be a non-empty string, got {_show(w)}")
        self.bad_words = list(words)
        so = self.structured_outputs
        if so is not None and not isinstance(so, StructuredOutputsParams):
            raise SamplingParamsError("structured_outputs", f"structured_outputs must be a StructuredOutputsParams, "
                                                            f"got {_show(so)}")

    def _check_together(self) -> None:
        """The checks between fields (each field's own type and range are already checked)."""
        n, best_of, beam_width = self.n, self.best_of, self.beam_width
        if best_of is not None and best_of < n:
            raise SamplingParamsError("best_of", f"best_of ({best_of}) must be at least n ({n})")
        if beam_width > 1:
            if n > beam_width:
                raise SamplingParamsError("n", f"n ({n}) must not exceed beam_width ({beam_width})")
            if best_of is not None:
                raise SamplingParamsError("best_of", "best_of does not apply to beam search (beam_width > 1)")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise SamplingParamsError("min_tokens", f"min_tokens ({self.min_tokens}) must not exceed max_tokens "
                                                    f"({self.max_tokens})")

    def verify_for_model(self, vocab_size: int, max_logprobs: int = 20) -> None:
        """The checks that need the model and engine, for `add_request`: stop_token_ids, logit_bias's keys and
        allowed_token_ids within [0, vocab_size);
        logprobs at most `max_logprobs` (the engine's option, 20 by default as in vLLM; -1: no limit) and at most
        vocab_size; no logprobs with beam search (the engine does not compute them for beams). Raises
        SamplingParamsError naming the field."""
        check_token_ids("stop_token_ids", self.stop_token_ids, vocab_size)
        if self.logit_bias:
            check_token_ids("logit_bias", list(self.logit_bias), vocab_size)
        if self.allowed_token_ids is not None:
            check_token_ids("allowed_token_ids", self.allowed_token_ids, vocab_size)
        lp = self.logprobs
        if lp is None:
            return
        if self.beam_width > 1:
            raise SamplingParamsError("logprobs", f"logprobs are not available with beam search (beam_width="
                                                  f"{self.beam_width}): leave logprobs unset (None)")
        if 0 <= max_logprobs < lp:
            raise SamplingParamsError("logprobs", f"logprobs ({lp}) must not exceed the engine's max_logprobs "
                                                  f"({max_logprobs}); start the engine with a larger max_logprobs "
                                                  f"(-1: no limit) to ask for more")
        if lp > vocab_size:
            raise SamplingParamsError("logprobs", f"logprobs ({lp}) must not exceed the vocabulary size "
                                                  f"({vocab_size})")

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-5 or self.beam_width > 1

    @property
    def num_sequences(self) -> int:
        """How many sequences the request runs: best_of samples, or beam_width beams."""
        return self.beam_width if self.beam_width > 1 else (self.best_of or self.n)
