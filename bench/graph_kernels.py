"""Kernels per decode step: the nodes of the captured batch-1 decode CUDA graph, by type and by kernel, and the GPU
time of one replay, with the fused q|k|v kernel (cuda_ops.FUSED_QKV) and with the separate kernels it replaces.

    python -m bench.graph_kernels [--shape qwen3-0.6b] [--replays 200] [--json graph_kernels.json]

At batch 1 a step is a few hundred tiny kernels, each paying launch and tail latency even inside a graph, so the
node count is what fusing cuts. The nodes are read from the graph CuPy captured through the driver API
(cuGraphGetNodes, cuGraphNodeGetType, and the kernel's name from its node parameters). The replay time is the
median over `replays` replays of CUDA events around each, after warm-up; beside it, the time reading every weight
once takes at the copy bandwidth measured in the same run (bench_decode_attention.copy_bandwidth).
"""

from __future__ import annotations

import ctypes
import gc
import json
import re
import sys
import tempfile
from collections import Counter

import click
import numpy as np

from bench.bench_decode_attention import copy_bandwidth
from bench.bench_latency import weight_bytes
from cupaged import LLMEngine, SamplingParams
from tools.make_checkpoint import make_checkpoint

# CUgraphNodeType (cuda.h)
NODE_TYPES = {0: "kernel", 1: "memcpy", 2: "memset", 3: "host", 4: "child graph", 5: "empty", 6: "event wait",
              7: "event record", 8: "semaphore signal", 9: "semaphore wait", 10: "mem alloc", 11: "mem free",
              12: "batch mem op", 13: "conditional"}
KERNEL_NODE_PARAMS_BYTES = 128  # CUDA_KERNEL_NODE_PARAMS_v2 is 72 bytes: func at 0, kern (a CUkernel) at 56


class Driver:
    """The few driver API calls that read a captured graph."""

    def __init__(self) -> None:
        self.lib = ctypes.CDLL("libcuda.so.1")
        vp, pp = ctypes.c_void_p, ctypes.POINTER
        self.lib.cuGraphGetNodes.argtypes = [vp, pp(vp), pp(ctypes.c_size_t)]
        self.lib.cuGraphNodeGetType.argtypes = [vp, pp(ctypes.c_int)]
        self.lib.cuGraphKernelNodeGetParams_v2.argtypes = [vp, ctypes.c_char_p]
        self.lib.cuFuncGetName.argtypes = [pp(ctypes.c_char_p), vp]
        self.lib.cuKernelGetName.argtypes = [pp(ctypes.c_char_p), vp]

    def check(self, result: int, what: str) -> None:
        if result != 0:
            raise RuntimeError(f"{what} failed with CUresult {result}")

    def nodes(self, graph: int) -> list[int]:
        count = ctypes.c_size_t(0)
        self.check(self.lib.cuGraphGetNodes(graph, None, ctypes.byref(count)), "cuGraphGetNodes")
        nodes = (ctypes.c_void_p * count.value)()
        self.check(self.lib.cuGraphGetNodes(graph, nodes, ctypes.byref(count)), "cuGraphGetNodes")
        return [n or 0 for n in nodes[:count.value]]

    def node_type(self, node: int) -> str:
        t = ctypes.c_int(-1)
        self.check(self.lib.cuGraphNodeGetType(node, ctypes.byref(t)), "cuGraphNodeGetType")
        return NODE_TYPES.get(t.value, f"type {t.value}")

    def kernel_name(self, node: int) -> str:
        params = ctypes.create_string_buffer(KERNEL_NODE_PARAMS_BYTES)
        if self.lib.cuGraphKernelNodeGetParams_v2(node, params) != 0:
            return "?"
        func, kern = (ctypes.c_void_p.from_buffer(params, offset).value for offset in (0, 56))
        name = ctypes.c_char_p()
        if func and self.lib.cuFuncGetName(ctypes.byref(name), func) == 0 or \
                kern and self.lib.cuKernelGetName(ctypes.byref(name), kern) == 0:
            return short_name(name.value.decode())
        return "?"


def short_name(mangled: str) -> str:
    """A kernel's identifier from its Itanium-mangled name (`_Z8rms_normI...` -> rms_norm); others as they are."""
    m = re.match(r"_ZN?(\d+)", mangled)  # a nested name gives its outermost scope
    if m:
        length = int(m.group(1))
        return mangled[m.end():m.end() + length]
    return mangled[:48]


def graph_nodes(graph) -> tuple[Counter, Counter]:
    """(nodes by type, kernel nodes by kernel name) of a captured cupy.cuda.graph.Graph."""
    handle = getattr(graph, "graph", 0)
    if not handle:
        raise RuntimeError("this CuPy does not keep the captured cudaGraph_t (Graph.graph is 0)")
    driver = Driver()
    types, kernels = Counter(), Counter()
    for node in driver.nodes(handle):
        kind = driver.node_type(node)
        types[kind] += 1
        if kind == "kernel":
            kernels[driver.kernel_name(node)] += 1
    return types, kernels


def replay_us(graphs, replays: int) -> float:
    """Median GPU time of one replay of the batch-1 graph, in microseconds (CUDA events around each)."""
    import cupy

    max_seq_len = 256  # the plan's partition for a context of this length; the inputs hold the last real step
    for _ in range(10):
        graphs.replay(1, max_seq_len)
    times = []
    for _ in range(replays):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        graphs.replay(1, max_seq_len)
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return float(np.median(times))


def measure(path: str, fused: bool, replays: int) -> tuple[dict, object]:
    """The batch-1 decode graph of an engine on `path`, with the fused q|k|v kernel or without it; and the
    engine's config."""
    import cupy

    from cupaged.layers import cuda_ops

    cuda_ops.FUSED_QKV = fused
    try:
        # small token and context limits: fewer piecewise graphs and a shorter decode plan to capture
        engine = LLMEngine(path, device="cuda", dtype="bfloat16", load_format="dummy", max_num_seqs=1,
                           max_num_batched_tokens=256, max_model_len=1024, gpu_memory_utilization=0.45)
        engine.add_request("warmup", list(range(1, 129)), SamplingParams(temperature=0, max_tokens=8,
                                                                         ignore_eos=True))
        while engine.has_unfinished_requests():
            engine.step()
        graphs = engine.core.runner.graphs
        types, kernels = graph_nodes(graphs.graphs[1][0])
        result = {"fused": fused, "nodes": sum(types.values()), "kernels": types.get("kernel", 0),
                  "by_type": dict(types), "by_kernel": dict(kernels.most_common()),
                  "replay_us": replay_us(graphs, replays)}
        config = engine.config
        del engine, graphs
    finally:
        cuda_ops.FUSED_QKV = True
    gc.collect()
    cupy.get_default_memory_pool().free_all_blocks()
    return result, config


@click.command()
@click.option("--shape", default="qwen3-0.6b", show_default=True, help="A preset of tools/make_checkpoint.py.")
@click.option("--replays", default=200, show_default=True)
@click.option("--json", "json_path", default=None)
def main(shape: str, replays: int, json_path: str | None) -> None:
    from cupaged import device

    device.set_device("cuda")
    copy_gbs = copy_bandwidth(10)["copy_gb_s"]
    with tempfile.TemporaryDirectory() as tmp:
        path = str(make_checkpoint(f"{tmp}/{shape}", shape, dtype="bfloat16", weights=False))
        (separate, config), (fused, _) = (measure(path, f, replays) for f in (False, True))
    rows = [separate, fused]
    limit_us = weight_bytes(config) / (copy_gbs * 1e9) * 1e6
    for r in rows:
        r.update(shape=shape, weights_at_copy_bandwidth_us=limit_us, copy_gb_s=copy_gbs)
    if json_path:
        with open(json_path, "w") as f:
            json.dump(rows, f, indent=2)
    for r in rows:
        click.echo(f"{'fused' if r['fused'] else 'separate'} q|k|v kernels, kernel nodes by name:", file=sys.stderr)
        for name, n in r["by_kernel"].items():
            click.echo(f"  {n:5d}  {name}", file=sys.stderr)
    click.echo(f"copy bandwidth {copy_gbs:.0f} GB/s; {shape} weights read once at it: {limit_us:.0f} us")
    click.echo(f"{'q|k|v path':<10} {'graph nodes':>11} {'kernels':>8} {'replay us':>9} {'limit us':>8} "
               f"{'of limit':>8}")
    for r in rows:
        click.echo(f"{'fused' if r['fused'] else 'separate':<10} {r['nodes']:>11} {r['kernels']:>8} "
                   f"{r['replay_us']:>9.0f} {limit_us:>8.0f} {limit_us / r['replay_us']:>8.2f}")


if __name__ == "__main__":
    main()
