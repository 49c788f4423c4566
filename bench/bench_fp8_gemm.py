"""The FP8 linear layer (quantization="fp8") against the bf16 GEMM, on Llama-3-8B's four projections.

    python -m bench.bench_fp8_gemm [--ms 1,16,256,4096] [--json out.json] [--peers]

For each shape and M (tokens): the bf16 GEMM through cupaged's cuBLAS handle (what the model runs without
quantization), the FP8 GEMM alone (cuBLASLt on e4m3 codes), and the whole FP8 linear (per-token quantization of
the activations + FP8 GEMM + the scaling kernel), all timed from captured CUDA graphs (graph_ms: CUDA events,
median of `repeat`). Figures beside the ceilings measured in the same run: TFLOP/s against the bf16 matmul at
8192^3 (FP8 tensor cores peak at twice that), GB/s (weights + activations + output bytes) against the copy
bandwidth. Small M is bound by the weights' bytes: there FP8 should approach 2x bf16; large M by the tensor
cores. Peer (--peers): torch._scaled_mm with row-wise scales (CUTLASS on sm_90), same operands.
"""

from __future__ import annotations

import json

import click
import numpy as np

from bench.bench_decode_attention import copy_bandwidth, graph_ms

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)


def matmul_ceiling(repeat: int) -> float:
    """bf16 TFLOP/s of cupaged's cuBLAS handle at 8192^3."""
    import cupy

    from cupaged.layers import cublas

    a = cupy.ones((8192, 8192), dtype=cupy.dtype("bfloat16"))
    out = cupy.empty_like(a)
    handle = cublas.handle()

    def run() -> None:
        handle.bind(cupy.cuda.get_current_stream().ptr)
        handle.matmul(a, a, out)

    ms, _ = graph_ms([run], repeat)
    return 2 * 8192 ** 3 / ms / 1e9


def torch_peer(x, w_codes, x_scale, w_scale, repeat: int) -> float | None:
    """ms of torch._scaled_mm (row-wise scales) on the same operands, or None without torch / its support."""
    try:
        import torch

        xt = torch.from_dlpack(x).view(torch.float8_e4m3fn)
        wt = torch.from_dlpack(w_codes).view(torch.float8_e4m3fn)
        sa = torch.from_dlpack(x_scale).reshape(-1, 1)
        sb = torch.from_dlpack(w_scale).reshape(1, -1)
        run = lambda: torch._scaled_mm(xt, wt.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16)  # noqa: E731
        run()
        torch.cuda.synchronize()
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        times = []
        for _ in range(repeat):
            start.record()
            for _ in range(10):
                run()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop) / 10)
        return float(np.median(times))
    except Exception as exc:  # no torch, or no row-wise FP8 there: the peer is left out, with the reason
        print(f"torch peer skipped: {type(exc).__name__}: {exc}")
        return None


def measure(name: str, m: int, repeat: int, peers: bool) -> dict:
    import cupy

    from cupaged.layers import cublas, cublaslt
    from cupaged.layers.fp8_linear import Fp8Linear, QuantizeAtLoad, matmul, quantize_rows

    n, k = SHAPES[name]
    bf16 = cupy.dtype("bfloat16")
    rng = cupy.random.default_rng(m + n)
    x = rng.standard_normal((m, k), dtype=cupy.float32).astype(bf16)
    w = (rng.standard_normal((n, k), dtype=cupy.float32) * k ** -0.5).astype(bf16)
    w_t = cupy.ascontiguousarray(w.T)  # [K, N], as the bf16 model stores it
    linear = Fp8Linear.fuse([(name, QuantizeAtLoad(w))], cupy)
    del w
    out = cupy.empty((m, n), dtype=bf16)
    handle, lt = cublas.handle(), cublaslt.handle()
    xq, xs = quantize_rows(x)

    def bf16_gemm() -> None:
        handle.bind(cupy.cuda.get_current_stream().ptr)
        handle.matmul(x, w_t, out)

    times = {"bf16_ms": graph_ms([bf16_gemm], repeat)[0],
             "fp8_gemm_ms": graph_ms([lambda: lt.matmul_fp8(xq, linear.codes, out)], repeat)[0],
             "fp8_linear_ms": graph_ms([lambda: matmul(x, linear, out=out)], repeat)[0]}
    if peers:
        times["torch_scaled_mm_ms"] = torch_peer(xq, linear.codes, xs, linear.scales, repeat)
    flops = 2 * m * n * k
    row = {"shape": name, "M": m, "N": n, "K": k, **times}
    for key, bytes_ in (("bf16", 2 * (n * k + m * k + m * n)), ("fp8_gemm", n * k + m * k + 2 * m * n),
                        ("fp8_linear", n * k + 3 * m * k + 4 * m * n)):  # quantize reads x, writes codes; scale r+w
        ms = times[f"{key}_ms"]
        row[f"{key}_tflops"] = flops / ms / 1e9
        row[f"{key}_gb_s"] = bytes_ / ms / 1e6
    row["speedup_linear_vs_bf16"] = times["bf16_ms"] / times["fp8_linear_ms"]
    return row


@click.command()
@click.option("--ms", default="1,16,256,4096", show_default=True, help="Token counts (GEMM M).")
@click.option("--shapes", default=",".join(SHAPES), show_default=True)
@click.option("--repeat", default=20, show_default=True)
@click.option("--peers", is_flag=True, help="Also time torch._scaled_mm (row-wise scales).")
@click.option("--json", "json_path", default=None)
def main(ms: str, shapes: str, repeat: int, peers: bool, json_path: str | None) -> None:
    from cupaged import device

    device.set_device("cuda")
    ceilings = {**copy_bandwidth(repeat), "bf16_matmul_tflops": matmul_ceiling(repeat)}
    print(f"ceilings: copy {ceilings['copy_gb_s']:.0f} GB/s, bf16 matmul 8192^3 {ceilings['bf16_matmul_tflops']:.0f} "
          "TFLOP/s (FP8 tensor-core peak ~2x that)", flush=True)
    rows = []
    for name in shapes.split(","):
        for m in ms.split(","):  # each line as it is measured
            rows.append(r := measure(name, int(m), repeat, peers))
            print(f"{r['shape']:8s} M={r['M']:5d}: bf16 {r['bf16_ms'] * 1e3:8.1f} us ({r['bf16_tflops']:6.1f} TFLOP/s, "
                  f"{r['bf16_gb_s'] / ceilings['copy_gb_s']:.2f} of copy) | fp8 GEMM {r['fp8_gemm_ms'] * 1e3:8.1f} us "
                  f"({r['fp8_gemm_tflops']:6.1f} TFLOP/s, {r['fp8_gemm_gb_s'] / ceilings['copy_gb_s']:.2f} of copy) | "
                  f"fp8 linear {r['fp8_linear_ms'] * 1e3:8.1f} us" +
                  (f" | torch _scaled_mm {r['torch_scaled_mm_ms'] * 1e3:.1f} us" if r.get("torch_scaled_mm_ms")
                   else ""), flush=True)
    print("\nshape    M     bf16 us  fp8-linear us  speedup  fp8-GEMM TFLOP/s")
    for r in rows:
        print(f"{r['shape']:8s} {r['M']:5d} {r['bf16_ms'] * 1e3:9.1f} {r['fp8_linear_ms'] * 1e3:13.1f} "
              f"{r['speedup_linear_vs_bf16']:8.2f} {r['fp8_gemm_tflops']:10.1f}")
    if json_path:
        with open(json_path, "w") as f:
            json.dump({"ceilings": ceilings, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
