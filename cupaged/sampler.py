"""From logits to tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling and logprobs.

All arithmetic runs on the logits' own device (NumPy or CuPy); only the chosen token ids (and the few
logprobs asked for) come back to the host. Each sequence's random draw is one uniform number from its own
generator (seeded per request, or the engine's), so a seeded request samples the same tokens whatever else
shares its batch. Sampling is inverse-CDF on the filtered distribution. The engine core describes a step's rows
as a SamplingMetadata of arrays (built from its sequences: the sampler sees no Sequence object); logprobs are
recorded into the sequences afterwards.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupaged.device import array_module, to_numpy
from cupaged.layers import ops_for
from cupaged.layers.reference import inverse_cdf, tempered_probs
from cupaged.engine.sequence import Sequence

Array = Any


@dataclass
class RowPenalties:
    """What changes one row's logits before sampling: penalties over the tokens seen, and a ban on stop tokens."""

    row: int
    repetition: float = 1.0
    seen: np.ndarray | None = None          # every token of the sequence, prompt included (repetition penalty)
    output_ids: np.ndarray | None = None    # the distinct output tokens ...
    additive: np.ndarray | None = None      # ... and what presence + frequency take off each
    bias_ids: np.ndarray | None = None      # logit_bias: the tokens ...
    bias: np.ndarray | None = None          # ... and what is added to their logits
    allowed: np.ndarray | None = None       # allowed_token_ids and the grammar's: every other token is masked
    banned: list[int] = field(default_factory=list)  # stop tokens before min_tokens, bad words' next tokens


@dataclass
class SamplingMetadata:
    """What the sampler needs of a step's rows, as arrays (one entry per row): no Sequence objects past here."""

    temperature: np.ndarray                 # float32; 0 means greedy
    top_k: np.ndarray                       # int64; 0 disables
    top_p: np.ndarray                       # float32; 1 disables
    min_p: np.ndarray                       # float32; 0 disables
    uniform: np.ndarray                     # float64: each row's draw, taken from its generator in row order
    penalties: list[RowPenalties]           # the rows whose logits change first

    @classmethod
    def from_sequences(cls, seqs: list[Sequence], eos_ids: list[int], rng: np.random.Generator) -> "SamplingMetadata":
        """The metadata of `seqs` (one row each); draws each row's uniform number now."""
        params = [s.params for s in seqs]
        f32 = np.float32
        return cls(temperature=np.array([0.0 if p.greedy else p.temperature for p in params], f32),
                   top_k=np.array([p.top_k for p in params], np.int64),
                   top_p=np.array([p.top_p for p in params], f32),
                   min_p=np.array([p.min_p for p in params], f32),
                   uniform=np.array([(s.rng or rng).random() for s in seqs]),
                   penalties=[_row_penalties(row, s, eos_ids) for row, s in enumerate(seqs) if _needs_penalties(s)])

    @property
    def needs_sort(self) -> bool:
        """Whether a row filters by top-k or top-p (a sort of the whole vocabulary)."""
        return bool((self.top_k > 0).any() or (self.top_p < 1).any())


def _needs_penalties(seq: Sequence) -> bool:
    p = seq.params
    return (p.repetition_penalty != 1.0 or bool(p.presence_penalty or p.frequency_penalty)
            or seq.num_output_tokens < p.min_tokens or bool(p.logit_bias) or p.allowed_token_ids is not None
            or bool(seq.bad_words) or seq.matcher is not None)


def _row_penalties(row: int, seq: Sequence, eos_ids: list[int]) -> RowPenalties:
    p, out = seq.params, RowPenalties(row)
    if p.repetition_penalty != 1.0:
        out.repetition, out.seen = p.repetition_penalty, np.unique(seq.token_ids)
    if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
        out.output_ids, counts = np.unique(seq.output_token_ids, return_counts=True)
        out.additive = p.presence_penalty + p.frequency_penalty * counts.astype(np.float32)
    if seq.num_output_tokens < p.min_tokens:
        out.banned = list(p.stop_token_ids) + ([] if p.ignore_eos else list(eos_ids))
    if p.logit_bias:
        out.bias_ids = np.fromiter(p.logit_bias, np.int64, len(p.logit_bias))
        out.bias = np.fromiter(p.logit_bias.values(), np.float32, len(p.logit_bias))
    if p.allowed_token_ids is not None:
        out.allowed = np.array(p.allowed_token_ids, np.int64)
    if seq.matcher is not None:  # computed on the host: the sequence's tokens so far are all there (no run-ahead)
        grammar = seq.matcher.allowed()
        both = grammar if out.allowed is None else np.intersect1d(out.allowed, grammar)
        out.allowed = both if both.size else grammar  # allowed_token_ids the grammar never allows: it wins
    for word in seq.bad_words:  # its last token is banned where the sequence ends with the rest of it
        if len(word) == 1 or seq.token_ids[len(seq.token_ids) - len(word) + 1:] == word[:-1]:
            out.banned.append(word[-1])
    if out.allowed is not None and out.banned and not np.setdiff1d(out.allowed, out.banned).size:
        # every allowed token is banned (a complete grammar allows only EOS, before min_tokens): a row must keep a
        # token to sample, and the constraint that says what may come wins over the bans
        out.banned = []
    return out


def apply_penalties(logits: Array, penalties: list[RowPenalties]) -> Array:
    """Repetition/presence/frequency penalties, logit_bias, allowed_token_ids, and the bans (stop tokens before
    min_tokens, bad words), row by row (in place)."""
    xp = array_module(logits)
    for r in penalties:
        if r.seen is not None:
            seen = xp.asarray(r.seen)
            vals = logits[r.row, seen]
            logits[r.row, seen] = xp.where(vals > 0, vals / r.repetition, vals * r.repetition)
        if r.additive is not None:
            logits[r.row, xp.asarray(r.output_ids)] -= xp.asarray(r.additive)
        if r.bias_ids is not None:
            logits[r.row, xp.asarray(r.bias_ids)] += xp.asarray(r.bias)
        if r.allowed is not None:
            allowed = xp.asarray(r.allowed)
            kept = logits[r.row, allowed]
            logits[r.row] = -np.inf
            logits[r.row, allowed] = kept
        if r.banned:
            logits[r.row, xp.asarray(r.banned)] = -np.inf
    return logits


def sorted_filtered_probs(logits: Array, temperature: Array, top_k: Array, top_p: Array,
                          min_p: Array) -> tuple[Array, Array]:
    """Probabilities after temperature and the min-p / top-k / top-p filters, each row sorted descending, with
    `order` [B, V] giving the token id at each position. top_k 0, top_p 1 and min_p 0 disable their filters."""
    xp = array_module(logits)
    probs = tempered_probs(logits, temperature, min_p)
    order = xp.argsort(-probs, axis=-1)
    probs = xp.take_along_axis(probs, order, axis=-1)
    rank = xp.arange(probs.shape[-1])[None, :]
    keep = rank < xp.where(top_k > 0, top_k, probs.shape[-1])[:, None]
    # top-p: keep the smallest prefix whose mass reaches top_p (the first token always stays)
    keep &= (xp.cumsum(probs, axis=-1) - probs) < top_p[:, None]
    return xp.where(keep, probs, 0.0), order


def sample(logits: Array, seqs: list[Sequence], eos_ids: list[int], rng: np.random.Generator) -> list[int]:
    """Choose the next token of each sequence from its logits row [B, V] (float32). Records logprobs asked for.

    The engine runs the two halves separately, so that the host can work while the device samples.
    """
    tokens = to_numpy(sample_on_device(logits, SamplingMetadata.from_sequences(seqs, eos_ids, rng))).tolist()
    record_logprobs(logits, seqs, tokens)
    return tokens


def sample_on_device(logits: Array, meta: SamplingMetadata) -> Array:
    """The next token of each row, as an int array on the logits' device (nothing waits for it).

    Rows without top-k / top-p (the common case) go through `ops.sample_rows`, one fused kernel on the GPU; the
    others need a sort of the whole vocabulary and run as array code.
    """
    xp = array_module(logits)
    if meta.penalties:
        logits = apply_penalties(logits.copy(), meta.penalties)
    if not meta.needs_sort:
        return ops_for("cuda" if xp is not np else "cpu").sample_rows(logits, meta.temperature, meta.min_p,
                                                                      meta.uniform)
    temperature = meta.temperature
    probs, order = sorted_filtered_probs(logits, xp.asarray(np.where(temperature > 0, temperature, 1)),
                                         xp.asarray(meta.top_k), xp.asarray(meta.top_p), xp.asarray(meta.min_p))
    sampled = xp.take_along_axis(order, inverse_cdf(probs, xp.asarray(meta.uniform))[:, None], axis=-1)[:, 0]
    return xp.where(xp.asarray(temperature <= 0), xp.argmax(logits, axis=-1), sampled)


def log_softmax(logits: Array) -> Array:
    """log(softmax(logits)) over the last axis, in float32."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))


def _needs_logprobs(seq: Sequence) -> bool:
    return seq.params.logprobs is not None or seq.params.num_sequences > seq.params.n


def record_logprobs(raw: Array, seqs: list[Sequence], tokens: list[int]) -> None:
    """Log-probabilities under the model's raw distribution (before penalties and filters), as vLLM reports.

    Kept for requests that ask for logprobs, and summed for best_of requests, which rank samples by it.
    """
    rows = [i for i, s in enumerate(seqs) if _needs_logprobs(s)]
    if not rows:
        return
    xp = array_module(raw)
    logp = log_softmax(raw[xp.asarray(np.array(rows))])
    width = max(seqs[i].params.logprobs or 0 for i in rows)
    top = to_numpy(xp.argsort(-logp, axis=-1)[:, :width]) if width else np.zeros((len(rows), 0), np.int64)
    logp_host_top = to_numpy(xp.take_along_axis(logp, xp.asarray(top), axis=-1)) if width else top
    chosen_lp = to_numpy(logp[xp.arange(len(rows)), xp.asarray(np.array([tokens[i] for i in rows]))])
    for j, i in enumerate(rows):
        seqs[i].cumulative_logprob += float(chosen_lp[j])
        n = seqs[i].params.logprobs
        if n is not None:
            seqs[i].logprobs.append((tokens[i], float(chosen_lp[j]), top[j, :n].tolist(),
                                     logp_host_top[j, :n].astype(float).tolist()))
