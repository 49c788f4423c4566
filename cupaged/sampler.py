"""From logits to tokens: penalties, temperature, top-k, top-p, min-p, seeded sampling and logprobs.

All arithmetic runs on the logits' own device (NumPy or CuPy); only the chosen token ids (and the few
logprobs asked for) come back to the host. Each sequence's random draw is one uniform number from its own
generator (seeded per request, or the engine's), so a seeded request samples the same tokens whatever else
shares its batch. Sampling is inverse-CDF on the filtered distribution. A step's rows come as a SamplingMetadata
of arrays: the engine core builds it from its sequences (engine/sampling.py), the sampler sees no Sequence.

Structured outputs come as packed bitmasks (llguidance's layout, structured.py): on the GPU the fused sampling
kernel reads them as it reads the logits (a masked token counts as -inf), so nothing [B, V] is copied or written;
rows filtered by top-k / top-p are masked in place by a small kernel before their sort. On the CPU the NumPy twin
`apply_token_bitmask` masks the logits first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cupaged.device import array_module
from cupaged.layers import ops_for
from cupaged.layers.reference import inverse_cdf, tempered_probs

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
    # Structured outputs: the constrained rows' packed masks (int32 [M, ceil(V / 32)]) and each row's mask in it
    # (int32 [B], -1: unconstrained). None when no row is constrained: such steps sample exactly as before.
    bitmask: np.ndarray | None = None
    mask_rows: np.ndarray | None = None

    @property
    def sorted_rows(self) -> np.ndarray:
        """Which rows filter by top-k or top-p (a sort of the whole vocabulary), as booleans."""
        return (self.top_k > 0) | (self.top_p < 1)


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


def apply_token_bitmask(logits: Array, bitmask: np.ndarray, mask_rows: np.ndarray) -> Array:
    """-inf, in place, at every token of a constrained row that its mask does not allow; returns logits. Row b uses
    bitmask[mask_rows[b]] (bit t % 32 of word t // 32 allows token t); rows with mask_rows[b] < 0 are untouched.
    The array code of the GPU's masking, and its test oracle; runs on any xp."""
    xp = array_module(logits)
    rows = np.flatnonzero(mask_rows >= 0)
    if rows.size:
        bits = np.unpackbits(np.ascontiguousarray(bitmask[mask_rows[rows]]).view(np.uint8), axis=-1,
                             bitorder="little")[:, :logits.shape[-1]]
        where = xp.asarray(rows)
        logits[where] = xp.where(xp.asarray(bits.astype(bool)), logits[where], -np.inf)
    return logits


def mask_tokens(logits: Array, bitmask: np.ndarray, mask_rows: np.ndarray) -> Array:
    """apply_token_bitmask on the logits' device: a kernel on the GPU (the bitmask goes up in stream order)."""
    if array_module(logits) is np:
        return apply_token_bitmask(logits, bitmask, mask_rows)
    return ops_for("cuda").mask_logits(logits, bitmask, mask_rows)


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


def sample_on_device(logits: Array, meta: SamplingMetadata) -> Array:
    """The next token of each row (int32), as an array on the logits' device (nothing waits for it).

    Rows without top-k / top-p (the common case) go through `ops.sample_rows`, one fused kernel on the GPU that
    also applies the structured-output masks; the others need a sort of the whole vocabulary and run as array code,
    on their rows alone: a row's token never depends on which path its neighbours need (seeded requests).
    The logits are never changed in place: the engine may still read them for logprobs (the raw distribution).
    """
    xp = array_module(logits)
    copied = bool(meta.penalties)
    if copied:
        logits = apply_penalties(logits.copy(), meta.penalties)
    masked = meta.bitmask is not None
    if masked and xp is np:
        logits = apply_token_bitmask(logits if copied else logits.copy(), meta.bitmask, meta.mask_rows)
        copied, masked = True, False
    sort = meta.sorted_rows
    tokens = None
    if not sort.all():
        masks = dict(bitmask=meta.bitmask, mask_rows=meta.mask_rows) if masked else {}
        tokens = ops_for("cuda" if xp is not np else "cpu").sample_rows(logits, meta.temperature, meta.min_p,
                                                                        meta.uniform, **masks)
    if not sort.any():
        return tokens
    rows = np.flatnonzero(sort)
    if not sort.all():
        logits, copied = logits[xp.asarray(rows)], True  # a gather: a copy
    if masked:  # in place before the sort (the fused kernel's masking is for the rows it samples)
        logits = mask_tokens(logits if copied else logits.copy(), meta.bitmask, meta.mask_rows[rows])
    temperature = meta.temperature[rows]
    probs, order = sorted_filtered_probs(logits, xp.asarray(np.where(temperature > 0, temperature, 1)),
                                         xp.asarray(meta.top_k[rows]), xp.asarray(meta.top_p[rows]),
                                         xp.asarray(meta.min_p[rows]))
    sampled = xp.take_along_axis(order, inverse_cdf(probs, xp.asarray(meta.uniform[rows]))[:, None], axis=-1)[:, 0]
    chosen = xp.where(xp.asarray(temperature <= 0), xp.argmax(logits, axis=-1), sampled).astype(xp.int32)
    if tokens is None:
        return chosen
    tokens[xp.asarray(rows)] = chosen
    return tokens


def log_softmax(logits: Array) -> Array:
    """log(softmax(logits)) over the last axis, in float32."""
    xp = array_module(logits)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - xp.log(xp.exp(shifted).sum(axis=-1, keepdims=True))
