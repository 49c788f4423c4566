"""The Llama-family transformer (Llama 2/3, Mistral, Qwen2, Qwen3) in one readable file.

The forward pass takes a flattened batch of tokens from many sequences, prefills and decodes mixed, and the
AttentionMetadata that says where each token sits (DESIGN.md). Linear weights stay [out, in] as in the checkpoint
(layers/dense_linear.DenseLinear; FP8 and GGUF ones in their own wrappers) and are fused (q|k|v, gate|up) at load
time so each layer is four GEMMs. `ops` is the op set of the device
(layers.reference on the CPU, layers.cuda_ops on the GPU, whose GEMMs go through a cuBLAS handle of its own so
that CUDA graphs can capture them).

Tensor parallelism (cupaged/parallel/): a rank's model is this same class, built from its shard of the checkpoint
and the config of its shapes, plus a `shard` whose communicator sums the row-parallel outputs (o-proj, down-proj)
and the vocabulary-parallel embedding, and gathers the vocabulary-parallel logits. Without a shard (tp = 1) none
of that runs.
Weights of a GGUF file loaded for the GPU stay in their block formats
(quant.QuantizedLinear, never transposed): `matmul` below sends their products to layers/gguf_ops.py, and a
quantized embedding table dequantizes only the rows a step looks up.
"""

from __future__ import annotations

from types import ModuleType
from typing import TYPE_CHECKING, Any

from cupaged.checkpoint import FiniteCheck
from cupaged.config import ModelConfig, rope_cos_sin
from cupaged.kv_cache import AttentionMetadata, KVCache
from cupaged.layers import dense_linear, fp8_linear, gguf_ops
from cupaged.layers.dense_linear import DenseLinear
from cupaged.layers.fp8_linear import Fp8Linear, Fp8Weight, QuantizeAtLoad
from cupaged.progress import progress
from cupaged.quant import QuantizedLinear, QuantizedWeight

if TYPE_CHECKING:
    from cupaged.parallel.sharding import RankShard

Array = Any


def matmul(ops: ModuleType, x: Array, w: Array | DenseLinear | QuantizedLinear | Fp8Linear, out_dtype: Any = None,
           out: Array | None = None) -> Array:
    """x @ w through dense_linear, gguf_ops or fp8_linear by the weight's kind, or the device's ops ([K, N])."""
    if isinstance(w, DenseLinear):
        return dense_linear.matmul(x, w, out_dtype, out)
    if isinstance(w, QuantizedLinear):
        return gguf_ops.matmul(x, w, out_dtype, out)
    if isinstance(w, Fp8Linear):
        return fp8_linear.matmul(x, w, out_dtype, out)
    return ops.matmul(x, w, out_dtype, out)


def expected_weights(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Hugging Face tensor names and shapes the checkpoint must hold for this config."""
    c = config
    q_out, kv_out = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (c.vocab_size, c.hidden_size),
                                          "model.norm.weight": (c.hidden_size,)}
    if not c.tie_word_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.hidden_size)
    for i in range(c.num_layers):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (c.hidden_size,),
            p + "post_attention_layernorm.weight": (c.hidden_size,),
            p + "self_attn.q_proj.weight": (q_out, c.hidden_size),
            p + "self_attn.k_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.v_proj.weight": (kv_out, c.hidden_size),
            p + "self_attn.o_proj.weight": (c.hidden_size, q_out),
            p + "mlp.gate_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.up_proj.weight": (c.intermediate_size, c.hidden_size),
            p + "mlp.down_proj.weight": (c.hidden_size, c.intermediate_size),
        })
        if c.qkv_bias:
            shapes.update({p + "self_attn.q_proj.bias": (q_out,), p + "self_attn.k_proj.bias": (kv_out,),
                           p + "self_attn.v_proj.bias": (kv_out,)})
        if c.qk_norm:
            shapes.update({p + "self_attn.q_norm.weight": (c.head_dim,), p + "self_attn.k_norm.weight": (c.head_dim,)})
    return shapes


def upload_quantized(name: str, w: QuantizedWeight, xp: ModuleType, check: FiniteCheck | None) -> QuantizedWeight:
    """w with its blocks on the device; its fp16 scales (the only fields that can be NaN or Inf) go to `check`."""
    w = QuantizedWeight(w.format, w.shape, xp.asarray(w.blocks))
    if check is not None:
        check.add(name, w.scales())
    return w


class Layer:
    """One decoder layer's weights, moved to the device, then fused there ([out, in]) for `x @ w`.

    Each tensor is added to `check` (NaN/Inf) as it reaches the device, before fusing loses its name."""

    def __init__(self, t: dict[str, Array], prefix: str, xp: ModuleType, check: FiniteCheck | None = None):
        def get(name: str) -> Array:
            a = xp.asarray(t[prefix + name])
            if check is not None:
                check.add(prefix + name, a)
            return a

        def fused(*names: str) -> DenseLinear | QuantizedLinear | Fp8Linear:  # [sum of outs, in], contiguous
            raw = [t[prefix + n] for n in names]
            if any(isinstance(w, (Fp8Weight, QuantizeAtLoad)) for w in raw):  # FP8: kept [out, in], K-major
                return Fp8Linear.fuse([(prefix + n, w) for n, w in zip(names, raw)], xp,
                                       check.add if check is not None else None)
            quantized = [isinstance(w, QuantizedWeight) for w in raw]
            if all(quantized):  # kept as in the file: the kernels read [out, in] blocks
                return QuantizedLinear.fuse([upload_quantized(prefix + n, w, xp, check)
                                             for n, w in zip(names, raw)], xp)
            if any(quantized):  # a plain part among quantized ones (no such file seen): all plain
                plain = next(w for w in raw if not isinstance(w, QuantizedWeight))
                raw = [w.dequantize().astype(plain.dtype) if isinstance(w, QuantizedWeight) else w for w in raw]
            arrays = []
            for n, w in zip(names, raw):
                arrays.append(xp.asarray(w))
                if check is not None:
                    check.add(prefix + n, arrays[-1])
            return DenseLinear(xp.concatenate(arrays))

        def optional(name: str) -> Array | None:
            return get(name) if prefix + name in t else None

        self.input_norm = get("input_layernorm.weight")
        self.post_norm = get("post_attention_layernorm.weight")
        self.w_qkv = fused("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight")
        self.b_qkv = xp.concatenate([get(f"self_attn.{n}_proj.bias") for n in "qkv"]) \
            if prefix + "self_attn.q_proj.bias" in t else None
        self.w_o = fused("self_attn.o_proj.weight")
        self.w_gate_up = fused("mlp.gate_proj.weight", "mlp.up_proj.weight")
        self.w_down = fused("mlp.down_proj.weight")
        self.q_norm = optional("self_attn.q_norm.weight")  # Qwen3
        self.k_norm = optional("self_attn.k_norm.weight")


class LlamaModel:
    """Weights on the device plus the forward pass."""

    def __init__(self, config: ModelConfig, tensors: dict[str, Array], ops: ModuleType, xp: ModuleType,
                 max_positions: int | None = None, shard: RankShard | None = None):
        """`tensors`: expected_weights' names to NumPy (host) or device arrays, or quant.QuantizedWeight; each is
        read once, so a mapping that reads from the file on access streams the load. Every weight (a quantized
        one's fp16 scales) is checked for NaN and Inf on its way (checkpoint.FiniteCheck: CheckpointError naming
        the tensors).
        With a `shard` (one rank of a tensor-parallel model), `config` and `tensors` are the rank's (shard.config,
        shard.shard_tensors)."""
        self.config, self.ops, self.xp, self.shard = config, ops, xp, shard
        check = FiniteCheck()

        def upload(name: str, host: Any) -> Array:
            a = xp.asarray(host)
            check.add(name, a)
            return a

        def get(name: str) -> Array | QuantizedLinear:  # each tensor is read once: `tensors` may read on access
            w = tensors[name]
            if isinstance(w, QuantizedWeight):
                return QuantizedLinear.fuse([upload_quantized(name, w, xp, check)], xp)
            return upload(name, w)

        self.final_norm = get("model.norm.weight")
        embed = get("model.embed_tokens.weight")
        head = embed if config.tie_word_embeddings else get("lm_head.weight")
        # a quantized table stays so; the rows a step needs are dequantized (and a tied head multiplies by it)
        self.embed = gguf_ops.QuantizedEmbedding(embed, self.final_norm.dtype) \
            if isinstance(embed, QuantizedLinear) else embed
        # [vocab, hidden] as stored: a tied head is the embedding table itself, no copy
        self.lm_head = head if isinstance(head, QuantizedLinear) else DenseLinear(head)
        where = "uploading layers to the GPU" if xp.__name__ == "cupy" else "preparing layers"
        self.layers = []
        with progress(where, config.num_layers) as bar:
            for i in range(config.num_layers):
                self.layers.append(Layer(tensors, f"model.layers.{i}.", xp, check))
                bar.update()
        check.raise_if_any()
        self.cos_sin = xp.asarray(rope_cos_sin(config, max_positions or config.max_position_embeddings))
        self.scale = config.head_dim ** -0.5

    def forward(self, input_ids: Array, meta: AttentionMetadata, cache: KVCache) -> Array:
        """Hidden states [T, hidden] after the final norm, for tokens `input_ids` [T] described by `meta`.

        Writes each token's K/V into `cache` at `meta.slot_mapping` before attending. A layer is its attention
        inputs (norm, q|k|v, rotary, the K/V write), attention over the paged cache, then its attention outputs
        (o-proj, norm, MLP): the halves around attention are what the engine's piecewise CUDA graphs capture.
        """
        hidden, residual = self.embed_tokens(input_ids), None
        for i in range(len(self.layers)):
            q, residual = self.attention_inputs(i, hidden, residual, meta.positions, meta.slot_mapping, cache)
            attn = self.ops.paged_attention(q, cache.k[i], cache.v[i], meta, self.scale, kv_scales=cache.scales(i))
            hidden, residual = self.attention_outputs(i, attn, residual)
        return self.final_norm_of(hidden, residual)

    def embed_tokens(self, input_ids: Array) -> Array:
        """The embedding rows of `input_ids` [T]: [T, hidden]."""
        if self.shard is None:
            return self.embed[input_ids]
        # vocabulary-parallel: each rank looks up the ids in its slice, zeros elsewhere, and the sum has them all
        local = input_ids - self.shard.vocab_start
        mine = (local >= 0) & (local < self.embed.shape[0])
        rows = self.embed[self.xp.where(mine, local, 0)]
        return self.shard.comm.all_reduce(self.xp.where(mine[:, None], rows, 0))

    def all_reduce(self, partial: Array) -> Array:
        """The sum over ranks of a row-parallel projection's partial outputs (itself when there is one rank)."""
        return partial if self.shard is None else self.shard.comm.all_reduce(partial)

    def attention_inputs(self, i: int, hidden: Array, residual: Array | None, positions: Array, slot_mapping: Array,
                         cache: KVCache) -> tuple[Array, Array]:
        """Layer i up to attention: (q [T, Hq, D], the residual stream). K and V go into the cache."""
        c, ops, layer = self.config, self.ops, self.layers[i]
        eps = c.rms_norm_eps
        if residual is None:  # the residual stream is kept in float32: bf16 rounding would accumulate in it
            x, residual = ops.rms_norm(hidden, layer.input_norm, eps), hidden.astype(self.xp.float32)
        else:
            x, residual = ops.add_rms_norm(hidden, residual, layer.input_norm, eps)
        # bias, Qwen3's per-head q/k norms, rotary and the K/V write: one kernel on the GPU (a few tiny ones would
        # cost more in launch and tail latency than in work at small batches)
        q = ops.qkv_rotary_cache(matmul(ops, x, layer.w_qkv), c.num_heads, c.num_kv_heads, positions, self.cos_sin,
                                 cache.k[i], cache.v[i], slot_mapping, bias=layer.b_qkv, q_norm=layer.q_norm,
                                 k_norm=layer.k_norm, eps=eps, kv_scales=cache.scales(i))
        return q, residual

    def attention_outputs(self, i: int, attn: Array, residual: Array) -> tuple[Array, Array]:
        """Layer i after attention: (its output, the residual stream)."""
        c, ops, layer = self.config, self.ops, self.layers[i]
        hidden = self.all_reduce(matmul(ops, attn.reshape(attn.shape[0], c.num_heads * c.head_dim), layer.w_o))
        x, residual = ops.add_rms_norm(hidden, residual, layer.post_norm, c.rms_norm_eps)
        return self.all_reduce(matmul(ops, ops.silu_and_mul(matmul(ops, x, layer.w_gate_up)), layer.w_down)), residual

    def final_norm_of(self, hidden: Array, residual: Array | None) -> Array:
        if residual is None:
            return self.ops.rms_norm(hidden, self.final_norm, self.config.rms_norm_eps)
        return self.ops.add_rms_norm(hidden, residual, self.final_norm, self.config.rms_norm_eps)[0]

    def logits(self, hidden: Array, out: Array | None = None) -> Array:
        """float32 logits [N, vocab] for hidden states [N, hidden] (into `out` if given)."""
        if self.shard is None:
            return matmul(self.ops, hidden, self.lm_head, self.xp.float32, out)
        # vocabulary-parallel: each rank's slice of the logits, gathered, less the padding of the vocabulary
        gathered = self.shard.comm.all_gather(matmul(self.ops, hidden, self.lm_head, self.xp.float32), axis=-1)
        logits = gathered[:, :self.shard.vocab_size]
        if out is not None:
            out[...] = logits
            return out
        return logits if logits.shape == gathered.shape else self.xp.ascontiguousarray(logits)
