"""Structured outputs: grammars from StructuredOutputsParams, and the per-sequence matchers that constrain sampling.

llguidance does the work. A request's constraint (a JSON schema, json_object, a regex, a choice among strings or a
Lark grammar) is compiled to an llguidance grammar once, checked without a tokenizer (the fronts refuse a bad one
before it leaves them), and turned into an `LLMatcher` per sequence by the core, which owns the one
`LLTokenizer` built from the model's tokenizer. Before each sampling step the matchers of the step's constrained
rows fill a packed bitmask (llguidance's layout: int32 [rows, ceil(V / 32)], bit t % 32 of word t // 32 set when
token t is allowed), in parallel on llguidance's threads; the sampler masks every other token of those rows (on
the GPU inside the sampling kernel). After a token is appended the matcher consumes it; a stopped matcher ends
its sequence. A matcher only ever consumes tokens the host has processed, never one still on the device, so it
needs no rollback: a token dropped after a stop was never consumed, and a preempted sequence recomputes the KV of
tokens its matcher has already consumed.
"""

from __future__ import annotations

import functools
import logging
import re

import llguidance
import llguidance.numpy
import numpy as np

from cupaged.sampling_params import SamplingParamsError, StructuredOutputsParams
from cupaged.tokenizer import Tokenizer

logger = logging.getLogger(__name__)

# JSON without whitespace between tokens (a schema's "x-guidance" may ask otherwise): a weak model allowed free
# whitespace can spend its whole budget on newlines, and compact JSON is what a client parses anyway.
_JSON_OPTIONS = {"whitespace_flexible": False}


def grammar_for(params: StructuredOutputsParams) -> str:
    """The llguidance grammar of a constraint, checked. Raises SamplingParamsError naming "structured_outputs"
    with llguidance's reason for a schema, regex or grammar that does not compile."""
    kind = params.kind
    try:
        if kind in ("json", "json_object"):
            schema = params.json if kind == "json" else {"type": "object"}
            grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        elif kind == "regex":
            grammar = llguidance.LLMatcher.grammar_from_regex(params.regex)
        elif kind == "choice":
            grammar = llguidance.LLMatcher.grammar_from_regex("|".join(re.escape(c) for c in params.choice))
        else:
            grammar = llguidance.LLMatcher.grammar_from_lark(params.grammar)
    except ValueError as exc:  # a schema that is not a JSON object
        raise SamplingParamsError("structured_outputs", f"structured_outputs.{kind} is not valid: {exc}") from None
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error:
        raise SamplingParamsError("structured_outputs", f"structured_outputs.{kind} is not valid: {error}")
    return grammar


def build_tokenizer(tokenizer: Tokenizer, vocab_size: int) -> llguidance.LLTokenizer:
    """llguidance's view of the model's tokenizer (its tokenizer.json), with the model's vocabulary size (the
    logits' width, which may exceed the tokenizer's) and its EOS tokens (which end a finished grammar)."""
    return llguidance.LLTokenizer(tokenizer.tokenizer.to_str(), n_vocab=vocab_size,
                                  eos_token=list(tokenizer.eos_token_ids))


class Matcher:
    """One sequence's place in its grammar: which tokens may come next, and whether the grammar is done."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size  # the logits' width: a mask row has ceil(vocab_size / 32) words

    @classmethod
    def create(cls, tokenizer: llguidance.LLTokenizer, grammar: str) -> "Matcher":
        """A matcher at the start of `grammar` (from grammar_for). Raises SamplingParamsError if the grammar does
        not fit the tokenizer."""
        matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
        if matcher.is_error():
            raise SamplingParamsError("structured_outputs", f"structured_outputs: {matcher.get_error()}")
        return cls(matcher, tokenizer.vocab_size)

    def consume(self, token: int) -> bool:
        """Advance past a sampled token; False (logged) if the grammar does not allow it, which masking prevents
        unless something else (a stop token id) chose it."""
        ok = self._matcher.consume_token(token)
        if not ok:
            logger.warning("the grammar refused token %d: %s", token, self._matcher.get_error())
        return ok

    def is_stopped(self) -> bool:
        """Whether nothing more may be generated (the grammar is complete, or the matcher failed)."""
        return self._matcher.is_stopped() or self._matcher.is_error()

    def is_accepting(self) -> bool:
        """Whether the output so far is a complete match (it may still go on, as a regex `a+` does)."""
        return self._matcher.is_accepting()

    def copy(self) -> "Matcher":
        """An independent copy at the same place, for a forked sequence (n > 1, beams)."""
        return Matcher(self._matcher.deep_copy(), self.vocab_size)



@functools.cache
def _executor() -> llguidance.LLExecutor:
    """llguidance's thread pool, which fills many matchers' masks at once without holding the GIL."""
    return llguidance.LLExecutor()


_buffer = np.zeros((0, 0), np.int32)  # fill_bitmasks' rows, kept between steps


def fill_bitmasks(matchers: list[Matcher]) -> np.ndarray:
    """The packed masks of the tokens each matcher allows next: int32 [len(matchers), ceil(V / 32)], row i for
    matchers[i] (a complete grammar allows EOS alone). llguidance writes every word of a row, so the rows live in a
    buffer kept from call to call (128 rows of a 151,936-token vocabulary are 2.4 MB: not allocated and cleared each
    step): they hold until the next call, which the engine's single thread reaches only after using them."""
    global _buffer
    words = -(-matchers[0].vocab_size // 32)
    if _buffer.shape[0] < len(matchers) or _buffer.shape[1] != words:
        _buffer = np.empty((max(len(matchers), 2 * _buffer.shape[0]), words), np.int32)
    bitmask = _buffer[:len(matchers)]
    llguidance.numpy.fill_next_token_bitmask_par(_executor(), [(m._matcher, i) for i, m in enumerate(matchers)],
                                                 bitmask)
    return bitmask


def allowed_ids(bitmask_row: np.ndarray, vocab_size: int) -> np.ndarray:
    """The token ids set in one packed mask row (int64, sorted)."""
    return np.flatnonzero(np.unpackbits(bitmask_row.view(np.uint8), bitorder="little")[:vocab_size])
