"""How a checkpoint is split over the ranks of a tensor-parallel model (Megatron-style).

Rank r of tp gets a checkpoint of its own, under the same Hugging Face names, and a ModelConfig of the shapes it
holds (`RankShard.config`), so the one LlamaModel loads and runs it unchanged:
- column-parallel (outputs split): q_proj by query heads, k_proj / v_proj by key/value heads, gate_proj and
  up_proj by intermediate rows; q/k/v biases split with their rows. Each is split first and then fused per rank
  (Layer fuses q|k|v and gate|up), so a rank's fused matrix is [its q | its k | its v].
- row-parallel (inputs split, outputs summed by an all-reduce): o_proj by query heads, down_proj by
  intermediate columns.
- vocabulary-parallel: embed_tokens and lm_head by vocabulary rows. A vocabulary that tp does not divide is
  padded with zero rows up to a multiple of tp (the padded logits are cut after the all-gather), rather than
  refused, as vLLM pads it: a vocabulary of odd size (the tiny test models' 1031, a fine-tune's added tokens)
  would otherwise run at no tp > 1.
- replicated: every norm (Qwen3's per-head q/k norms included).
Key/value heads: with at least tp of them, each rank holds num_kv_heads / tp. With fewer, each rank holds the
one its query heads attend with (replicated over tp / num_kv_heads ranks), which needs tp to be a multiple of
num_kv_heads: a rank's query heads must then all belong to one key/value head.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Any

from cupaged.config import ModelConfig
from cupaged.device import array_module
from cupaged.parallel.comm import Communicator

Array = Any


class TensorParallelError(ValueError):
    """A tensor-parallel size this model or machine cannot run."""


def check_tp(config: ModelConfig, tp: object, num_gpus: int | None, quantization: str | None = None) -> None:
    """Refuse, naming the shape, a tensor_parallel_size the model's shapes or the machine cannot take.

    `num_gpus`: the GPUs visible on the CUDA path; None on the CPU, where ranks are threads of this process.
    `quantization`: the engine's (or the checkpoint's) weight quantization.
    """
    if not isinstance(tp, int) or isinstance(tp, bool) or tp < 1:
        raise TensorParallelError(f"tensor_parallel_size must be an integer >= 1, got {tp!r}")
    if tp == 1:
        return
    if quantization or config.quantization:  # the shards would have to split FP8 codes and their scales
        raise TensorParallelError(f"tensor_parallel_size={tp} with quantization="
                                  f"{quantization or config.quantization!r} is not supported: FP8 weights are "
                                  "not split over ranks yet; run with tensor_parallel_size=1")
    if config.num_heads % tp:
        raise TensorParallelError(f"tensor_parallel_size={tp} does not divide the {config.num_heads} attention "
                                  "heads (num_attention_heads)")
    if config.num_kv_heads >= tp and config.num_kv_heads % tp:
        raise TensorParallelError(f"tensor_parallel_size={tp} does not divide the {config.num_kv_heads} key/value "
                                  "heads (num_key_value_heads)")
    if config.num_kv_heads < tp and tp % config.num_kv_heads:
        raise TensorParallelError(
            f"tensor_parallel_size={tp} is not a multiple of the {config.num_kv_heads} key/value heads "
            "(num_key_value_heads): with fewer key/value heads than ranks each one is replicated, and every rank's "
            "query heads must belong to one of them")
    if config.intermediate_size % tp:
        raise TensorParallelError(f"tensor_parallel_size={tp} does not divide the MLP's intermediate_size "
                                  f"{config.intermediate_size}")
    if num_gpus is not None:
        if tp > num_gpus:
            raise TensorParallelError(f"tensor_parallel_size={tp} needs {tp} GPUs, one per rank, but "
                                      f"{num_gpus} {'is' if num_gpus == 1 else 'are'} visible")
        raise TensorParallelError(
            f"tensor_parallel_size={tp} on the GPU needs NCCL and one worker process per GPU, which cupaged does "
            "not have yet: run with tensor_parallel_size=1, or on the CPU (--device cpu)")


def gpu_count(device: str) -> int | None:
    """The CUDA devices visible on device 'cuda' (check_tp's num_gpus); None on the CPU."""
    if device != "cuda":
        return None
    import cupy

    return cupy.cuda.runtime.getDeviceCount()


def padded_vocab_size(vocab_size: int, tp: int) -> int:
    """The vocabulary rounded up to a multiple of tp (each rank holds an equal slice)."""
    return -(-vocab_size // tp) * tp


@dataclass(frozen=True)
class RankShard:
    """What one rank holds (the config of its shapes, its slice of the vocabulary) and how it talks to the others.
    The model runs the sharded forward pass when it is given one (models/llama.py)."""

    comm: Communicator
    config: ModelConfig      # heads, key/value heads, intermediate size and vocabulary of this rank's slices
    vocab_start: int         # the first vocabulary row this rank holds
    vocab_size: int          # the model's whole vocabulary: gathered logits are cut to it

    @classmethod
    def of(cls, config: ModelConfig, comm: Communicator) -> "RankShard":
        """The share of `config` of rank comm.rank of comm.world_size (check_tp must have accepted them)."""
        tp = comm.world_size
        vocab_per_rank = padded_vocab_size(config.vocab_size, tp) // tp
        local = replace(config, num_heads=config.num_heads // tp, num_kv_heads=max(config.num_kv_heads // tp, 1),
                        intermediate_size=config.intermediate_size // tp, vocab_size=vocab_per_rank)
        return cls(comm, local, comm.rank * vocab_per_rank, config.vocab_size)

    def shard_tensors(self, tensors: dict[str, Array], full: ModelConfig) -> dict[str, Array]:
        """This rank's tensors, under the names of `tensors` (a checkpoint of `full`'s shapes): slices (views where
        the slice is contiguous) and, for a padded vocabulary, padded copies."""
        c, d, rank = self.config, full.head_dim, self.comm.rank
        q_heads = _range(rank * c.num_heads, c.num_heads, d)
        group = full.num_heads // full.num_kv_heads  # query heads per key/value head
        kv_heads = _range(rank * c.num_heads // group, c.num_kv_heads, d)  # from its first query head's
        inter = _range(rank * c.intermediate_size, c.intermediate_size, 1)
        vocab = slice(self.vocab_start, self.vocab_start + c.vocab_size)
        rows = {"self_attn.q_proj.weight": q_heads, "self_attn.q_proj.bias": q_heads,
                "self_attn.k_proj.weight": kv_heads, "self_attn.k_proj.bias": kv_heads,
                "self_attn.v_proj.weight": kv_heads, "self_attn.v_proj.bias": kv_heads,
                "mlp.gate_proj.weight": inter, "mlp.up_proj.weight": inter}
        columns = {"self_attn.o_proj.weight": q_heads, "mlp.down_proj.weight": inter}
        out = {}
        for name, t in tensors.items():
            suffix = _LAYER_PREFIX.sub("", name)  # model.layers.0.self_attn.q_proj.weight -> self_attn.q_proj.weight
            if suffix in ("model.embed_tokens.weight", "lm_head.weight"):
                out[name] = _vocab_rows(t, vocab)
            elif suffix in rows:
                out[name] = t[rows[suffix]]
            elif suffix in columns:
                out[name] = t[:, columns[suffix]]
            elif suffix in _REPLICATED:
                out[name] = t
            else:  # a tensor this file does not know would otherwise be replicated, silently wrong if it is not
                raise TensorParallelError(f"tensor {name} has no tensor-parallel split: cupaged/parallel/sharding.py "
                                          "must say how it is split")
        return out


_LAYER_PREFIX = re.compile(r"^model\.layers\.\d+\.")
_REPLICATED = {"model.norm.weight", "input_layernorm.weight", "post_attention_layernorm.weight",
               "self_attn.q_norm.weight", "self_attn.k_norm.weight"}


def _range(first: int, count: int, width: int) -> slice:
    """Rows of `count` items of `width` rows each, from item `first`."""
    return slice(first * width, (first + count) * width)


def _vocab_rows(t: Array, rows: slice) -> Array:
    """Rows `rows` of a [vocab, hidden] matrix, with zero rows past the vocabulary's end."""
    part = t[rows]
    missing = rows.stop - rows.start - part.shape[0]
    if missing == 0:
        return part
    xp = array_module(t)
    return xp.concatenate([part, xp.zeros((missing,) + t.shape[1:], dtype=part.dtype)])
