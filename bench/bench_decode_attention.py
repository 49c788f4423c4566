"""Paged decode attention: achieved bandwidth against the device's copy bandwidth, with torch SDPA as peer.

    python -m bench.bench_decode_attention --json decode.json

Llama-3-8B heads (32 query, 8 KV, head_dim 128), bf16, block size 16, random block tables (a shuffled
permutation of physical blocks), batch x context over a grid (cells whose K/V exceeds --max-gb are skipped).
Bytes moved = K and V of every sequence read once + q read + output written. The copy bandwidth is a large
device-to-device copy (bytes read + written) measured in the same run.

Timing: GPU time per call, from CUDA events around a CUDA graph of several calls (median of --repeat graph
launches, after warm-up), so that Python's launch overhead is not counted, for us or for the peer. Cells whose
K/V fits in L2 rotate over enough independent K/V sets to exceed it (~256 MB), so that DRAM is measured.
The peer is torch's scaled_dot_product_attention (flash and cuDNN backends, enable_gqa) on the same K/V made
contiguous per sequence ([B, Hkv, L, D]; no paging to pay for), timed the same way, where torch is installed.
--sweep also times partitions of 128..4096 tokens in each cell (tuning the split heuristic).
--kv-cache-dtype fp8 also times the same kernel over an FP8 (e4m3) copy of each cell's K/V (codes and per-row
scales written by the cache-write kernel) and prints its time beside bf16's, with the speed-up (bf16 time / fp8).
"""

from __future__ import annotations

import json
import math
import sys

import click
import numpy as np

HEADS, KV_HEADS, HEAD_DIM, BLOCK = 32, 8, 128, 16
ROTATE_BYTES = 256e6  # cells smaller than this rotate over several K/V sets (the L2 is 50 MB)


def graph_ms(fns, repeat: int, warmup: int = 3, min_ms: float = 1.0) -> tuple[float, int]:
    """GPU ms per call of fns (called in turn) from a captured CUDA graph; (median, calls per graph)."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        for f in fns:  # compile, allocate workspaces
            f()
        stream.synchronize()
        start, stop = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(stream)
        for f in fns:
            f()
        stop.record(stream)
        stop.synchronize()
        per_call = max(cupy.cuda.get_elapsed_time(start, stop) / len(fns), 1e-3)
        rounds = max(1, math.ceil(min_ms / (per_call * len(fns))))
        rounds = min(rounds, max(1, 400 // len(fns)))
        stream.begin_capture()
        for _ in range(rounds):
            for f in fns:
                f()
        graph = stream.end_capture()
        calls = rounds * len(fns)
        for _ in range(warmup):
            graph.launch(stream)
        times = []
        for _ in range(repeat):
            start.record(stream)
            graph.launch(stream)
            stop.record(stream)
            stop.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, stop) / calls)
    return float(np.median(times)), calls


_COPY_KERNEL = r"""
extern "C" __global__ void copy16(const int4* __restrict__ src, int4* __restrict__ dst, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        dst[i] = src[i];
}
"""


def copy_bandwidth(repeat: int) -> dict:
    """Device-to-device copy of 1 GiB, bytes read + written per second (GB/s): a kernel of 16-byte loads and
    stores, and cudaMemcpyAsync; the ceiling is the faster of the two. (cudaMemcpyAsync, and CuPy's copyto,
    which calls it, run on the copy engines: on an H200 they reach ~2.8 TB/s where a kernel reaches ~4.2.)"""
    import cupy

    n = 1 << 30
    src = cupy.ones(n // 16, dtype=cupy.complex128)
    dst = cupy.empty_like(src)
    rt = cupy.cuda.runtime
    kernel = cupy.RawKernel(_COPY_KERNEL, "copy16")
    blocks = 8 * cupy.cuda.Device().attributes["MultiProcessorCount"]
    kernel_ms, _ = graph_ms([lambda: kernel((blocks,), (256,), (src, dst, np.int64(src.size)))], repeat)
    memcpy_ms, _ = graph_ms([lambda: rt.memcpyAsync(dst.data.ptr, src.data.ptr, n, rt.memcpyDeviceToDevice,
                                                    cupy.cuda.get_current_stream().ptr)], repeat)
    result = {"copy_kernel_gb_s": 2 * n / kernel_ms / 1e6, "copy_memcpy_gb_s": 2 * n / memcpy_ms / 1e6}
    result["copy_gb_s"] = max(result.values())
    return result


def random_bf16(shape, dtype, rng_seed: int):
    """A bf16 array of standard normals, filled in chunks (no full-size float32 temporary)."""
    import cupy

    out = cupy.empty(shape, dtype=dtype)
    flat = out.reshape(-1)
    rs = cupy.random.RandomState(rng_seed)
    step = 1 << 28
    for i in range(0, flat.size, step):
        n = min(step, flat.size - i)
        flat[i:i + n] = rs.standard_normal(n, dtype=cupy.float32).astype(dtype)
    return out


def contiguous_kv(cache, tables: np.ndarray, batch: int, blocks_per_seq: int):
    """[B, Hkv, L, D] copy of a paged cache [num_blocks, Hkv, bs, D], built a few sequences at a time."""
    import cupy

    out = cupy.empty((batch, KV_HEADS, blocks_per_seq * BLOCK, HEAD_DIM), dtype=cache.dtype)
    per = max(1, (1 << 30) // (blocks_per_seq * KV_HEADS * BLOCK * HEAD_DIM * cache.itemsize))
    for b0 in range(0, batch, per):
        b1 = min(batch, b0 + per)
        idx = cupy.asarray(tables[b0:b1].reshape(-1))
        tiles = cache[idx].reshape(b1 - b0, blocks_per_seq, KV_HEADS, BLOCK, HEAD_DIM)
        out[b0:b1] = tiles.transpose(0, 2, 1, 3, 4).reshape(b1 - b0, KV_HEADS, -1, HEAD_DIM)
        del tiles
    return out


def fp8_copy(k_cache, v_cache):
    """An FP8 cache (codes, (k_scale, v_scale)) of the same K/V, quantized by write_kv a chunk of blocks at a time."""
    import cupy

    from cupaged.layers import cuda_ops

    num_blocks = k_cache.shape[0]
    k8, v8 = (cupy.empty(k_cache.shape, dtype=cupy.uint8) for _ in range(2))
    scales = tuple(cupy.empty(k_cache.shape[:3], dtype=cupy.uint8) for _ in range(2))
    per = max(1, (1 << 28) // (KV_HEADS * BLOCK * HEAD_DIM))
    for b0 in range(0, num_blocks, per):
        b1 = min(num_blocks, b0 + per)
        tokens = [c[b0:b1].transpose(0, 2, 1, 3).reshape(-1, KV_HEADS, HEAD_DIM) for c in (k_cache, v_cache)]
        slots = cupy.arange(b0 * BLOCK, b1 * BLOCK, dtype=cupy.int32)
        cuda_ops.write_kv(tokens[0], tokens[1], k8, v8, slots, kv_scales=scales)
        del tokens
    return k8, v8, scales


def torch_peer(sets, batch: int, ctx: int, repeat: int) -> dict:
    """GPU ms per call of torch SDPA (flash, cuDNN) over the contiguous sets [(q, k, v)], from a CUDA graph."""
    try:
        import torch
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    import cupy

    tsets = [(torch.from_dlpack(q).view(batch, HEADS, 1, HEAD_DIM), torch.from_dlpack(k), torch.from_dlpack(v))
             for q, k, v in sets]
    results = {}
    for name, backend in (("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION)):
        def call(i):
            q, k, v = tsets[i]
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True)

        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        try:
            with sdpa_kernel(backend):
                for i in range(len(tsets)):  # warm-up outside the graph (kernel selection, workspaces)
                    call(i)
                torch.cuda.synchronize()
                start.record()
                for i in range(len(tsets)):
                    call(i)
                stop.record()
                stop.synchronize()
                est = start.elapsed_time(stop) / len(tsets)
        except Exception as exc:  # a backend that does not take these shapes
            results[name] = None
            print(f"torch {name} {batch}x{ctx}: {type(exc).__name__}: {str(exc)[:200]}", file=sys.stderr)
            continue
        try:
            with sdpa_kernel(backend):
                rounds = min(max(1, math.ceil(1.0 / max(est, 1e-3) / len(tsets))), max(1, 400 // len(tsets)))
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for _ in range(rounds):
                        for i in range(len(tsets)):
                            call(i)
                calls = rounds * len(tsets)
                for _ in range(3):
                    graph.replay()
                torch.cuda.synchronize()
                times = []
                for _ in range(repeat):
                    start.record()
                    graph.replay()
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) / calls)
                del graph
        except Exception as exc:  # capture refused: time eager launches back to back instead
            print(f"torch {name} {batch}x{ctx}: no graph ({type(exc).__name__}: {str(exc)[:160]}), eager timing",
                  file=sys.stderr)
            name += "_eager"
            torch.cuda.synchronize()
            times = []
            with sdpa_kernel(backend):
                for _ in range(repeat):
                    start.record()
                    for i in range(len(tsets)):
                        call(i)
                    stop.record()
                    stop.synchronize()
                    times.append(start.elapsed_time(stop) / len(tsets))
        results[name] = float(np.median(times))
        torch.cuda.synchronize()
    tsets.clear()
    torch.cuda.empty_cache()
    cupy.cuda.Device().synchronize()
    return results


@click.command()
@click.option("--batches", default="1,8,64,256", show_default=True)
@click.option("--contexts", default="512,2048,8192,32768", show_default=True)
@click.option("--max-gb", default=40.0, show_default=True, help="Skip cells whose K/V exceeds this many GB.")
@click.option("--repeat", default=20, show_default=True, help="Timed graph launches per measurement (median).")
@click.option("--peers/--no-peers", default=True, show_default=True, help="Time torch SDPA on the same K/V.")
@click.option("--sweep/--no-sweep", default=False, show_default=True, help="Also time every partition size.")
@click.option("--kv-cache-dtype", type=click.Choice(["auto", "fp8"]), default="auto", show_default=True,
              help="fp8: also time an FP8 (e4m3) cache of the same K/V, beside bf16.")
@click.option("--json", "json_path", default=None)
def main(batches: str, contexts: str, max_gb: float, repeat: int, peers: bool, sweep: bool, kv_cache_dtype: str,
         json_path: str | None) -> None:
    import cupy

    from cupaged import device
    from cupaged.device import resolve_dtype
    from cupaged.kv_cache import AttentionMetadata
    from cupaged.layers import cuda_ops

    device.set_device("cuda")
    bf16 = resolve_dtype("bfloat16")
    props = cupy.cuda.runtime.getDeviceProperties(0)
    copy = copy_bandwidth(repeat)
    copy_gbs = copy["copy_gb_s"]
    kv_gb = lambda b, c: 2 * b * c * KV_HEADS * HEAD_DIM * 2 / 1e9  # noqa: E731
    cells = [(b, c) for b in map(int, batches.split(",")) for c in map(int, contexts.split(","))
             if kv_gb(b, c) <= max_gb]
    rows = []
    result = {"device": props["name"].decode(), "sms": props["multiProcessorCount"], **copy,
              "heads": HEADS, "kv_heads": KV_HEADS, "head_dim": HEAD_DIM, "block_size": BLOCK, "dtype": "bfloat16",
              "kv_cache_dtype": kv_cache_dtype,
              "timing": "GPU ms per call from CUDA events around a CUDA graph of calls; median of "
                        f"{repeat} graph launches", "rows": rows}
    rng = np.random.default_rng(0)
    with click.progressbar(cells, label="decode attention", file=sys.stderr) as bar:
        for batch, ctx in bar:
            blocks_per_seq = ctx // BLOCK
            num_blocks = batch * blocks_per_seq
            kv_bytes = 2 * num_blocks * KV_HEADS * BLOCK * HEAD_DIM * 2
            nsets = max(1, math.ceil(ROTATE_BYTES / kv_bytes))
            sets = []
            for s in range(nsets):
                k_cache = random_bf16((num_blocks, KV_HEADS, BLOCK, HEAD_DIM), bf16, 2 * s + 1)
                v_cache = random_bf16((num_blocks, KV_HEADS, BLOCK, HEAD_DIM), bf16, 2 * s + 2)
                tables = rng.permutation(num_blocks).reshape(batch, blocks_per_seq).astype(np.int32)
                meta = AttentionMetadata.build([1] * batch, [ctx] * batch, tables.tolist(), BLOCK, cupy)
                q = random_bf16((batch, HEADS, HEAD_DIM), bf16, 1000 + s)
                sets.append({"k": k_cache, "v": v_cache, "tables": tables, "meta": meta, "q": q,
                             "out": cupy.empty_like(q)})

            def ours(partition=None):
                def make(st):
                    return lambda: cuda_ops.paged_decode_attention(
                        st["out"], st["q"], st["k"], st["v"], st["meta"].block_tables, st["meta"].seq_lens, ctx,
                        HEAD_DIM ** -0.5, partition=partition)
                return [make(st) for st in sets]

            ms, calls = graph_ms(ours(), repeat)
            nbytes = kv_bytes + 2 * sets[0]["q"].nbytes
            fp8_ms = None
            if kv_cache_dtype == "fp8":
                def fp8_calls():
                    def make(st, k8, v8, scales):
                        return lambda: cuda_ops.paged_decode_attention(
                            st["out"], st["q"], k8, v8, st["meta"].block_tables, st["meta"].seq_lens, ctx,
                            HEAD_DIM ** -0.5, kv_scales=scales)
                    return [make(st, *st["fp8"]) for st in sets]

                for st in sets:
                    st["fp8"] = fp8_copy(st["k"], st["v"])
                fp8_ms = graph_ms(fp8_calls(), repeat)[0]
                for st in sets:
                    del st["fp8"]
                cupy.get_default_memory_pool().free_all_blocks()
            work = batch * KV_HEADS
            name = f"paged_decode_tc<__nv_bfloat16, __nv_bfloat16, {HEAD_DIM}, {HEADS // KV_HEADS}>"
            occupancy = cuda_ops._ctas_per_sm(name, cuda_ops._tc_smem(cuda_ops.TC_PARTITION_MAX, 8))
            partition = cuda_ops.decode_partition(work, ctx, occupancy)
            row = {"batch": batch, "context": ctx, "kv_gb": kv_bytes / 1e9, "sets": nsets, "calls_per_graph": calls,
                   "partition": partition, "splits": math.ceil(ctx / partition), "ctas_per_sm": occupancy,
                   "ms": ms, "gb_s": nbytes / ms / 1e6, "fraction_of_copy": nbytes / ms / 1e6 / copy_gbs}
            if fp8_ms is not None:
                fp8_bytes = kv_bytes // 2 + kv_bytes // HEAD_DIM // 2 + 2 * sets[0]["q"].nbytes  # codes + scales
                row.update(fp8_ms=fp8_ms, fp8_speedup=ms / fp8_ms, fp8_gb_s=fp8_bytes / fp8_ms / 1e6)
            if sweep:
                row["sweep_ms"] = {}
                for p in (128, 256, 512, 1024, 2048, 4096):
                    if p <= max(128, ctx):
                        row["sweep_ms"][p] = graph_ms(ours(p), max(5, repeat // 2))[0]
            if peers:
                # the peer reads the same K/V laid out contiguously per sequence; ours is done with the paged copy
                peer_sets = []
                for st in sets:
                    k_contig = contiguous_kv(st["k"], st["tables"], batch, blocks_per_seq)
                    del st["k"]
                    v_contig = contiguous_kv(st["v"], st["tables"], batch, blocks_per_seq)
                    del st["v"]
                    cupy.get_default_memory_pool().free_all_blocks()
                    peer_sets.append((st["q"], k_contig, v_contig))
                for name_, t in torch_peer(peer_sets, batch, ctx, repeat).items():
                    row[f"torch_{name_}_ms"] = t
                    row[f"torch_{name_}_fraction"] = nbytes / t / 1e6 / copy_gbs if t else None
                del peer_sets
            rows.append(row)
            if json_path:  # after every cell: a run cut short by a time limit keeps the cells it measured
                with open(json_path, "w") as f:
                    json.dump(result, f, indent=2)
            sets.clear()
            cupy.get_default_memory_pool().free_all_blocks()
    click.echo(f"{result['device']}: device-to-device copy {copy_gbs:.0f} GB/s (read + write; elementwise "
               f"{copy['copy_kernel_gb_s']:.0f}, cudaMemcpy {copy['copy_memcpy_gb_s']:.0f})")
    fmt = lambda x: "-" if x is None else f"{x:.2f}"  # noqa: E731
    fp8 = kv_cache_dtype == "fp8"
    click.echo(f"{'batch':>5} {'ctx':>6} {'KV GB':>7} {'us':>9} {'GB/s':>6} {'of copy':>7} {'part':>5} "
               f"{'flash':>6} {'cudnn':>6}" + (f" {'fp8 us':>9} {'fp8 GB/s':>8} {'x bf16':>6}" if fp8 else ""))
    for r in rows:
        click.echo(f"{r['batch']:>5} {r['context']:>6} {r['kv_gb']:>7.3f} {r['ms'] * 1e3:>9.1f} {r['gb_s']:>6.0f} "
                   f"{r['fraction_of_copy']:>7.2f} {r['partition']:>5} {fmt(r.get('torch_flash_fraction')):>6} "
                   f"{fmt(r.get('torch_cudnn_fraction')):>6}"
                   + (f" {r['fp8_ms'] * 1e3:>9.1f} {r['fp8_gb_s']:>8.0f} {r['fp8_speedup']:>6.2f}" if fp8 else ""))
    if sweep:
        click.echo("sweep (us per call by partition size):")
        for r in rows:
            best = min(r["sweep_ms"], key=r["sweep_ms"].get)
            click.echo(f"{r['batch']:>5} {r['context']:>6} heuristic {r['partition']:>5}: {r['ms'] * 1e3:.1f}  best "
                       f"{best}: {r['sweep_ms'][best] * 1e3:.1f}  | "
                       + " ".join(f"{p}:{t * 1e3:.1f}" for p, t in r["sweep_ms"].items()))


if __name__ == "__main__":
    main()
