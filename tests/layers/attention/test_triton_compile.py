"""The Triton kernels compile for real NVIDIA targets (Ampere sm_80, Hopper sm_90), no GPU needed.

The interpreter tests check what the kernels compute but not that Triton's compiler accepts them (the
interpreter runs the Python body with NumPy). This compiles each kernel ahead of time to a cubin with
the ptxas bundled in the triton wheel, in a subprocess, since this process runs kernels interpreted.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton", reason="triton is not installed (pip install triton, or the [test] extra)")

SCRIPT = textwrap.dedent('''
    import sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from llmserve.layers.attention import triton_kernels as K
    from llmserve.layers.attention.triton_kernels import cache_write, decode, prefill

    arch, dtype, head_dim, group = int(sys.argv[1]), sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    # A layer with a sliding window and a logit soft-cap (Gemma 2), with ALiBi (BLOOM, Falcon), or a plain one.
    use_window, soft_cap, use_alibi = sys.argv[5] == "1", float(sys.argv[6]), sys.argv[7] == "1"
    kv_format = int(sys.argv[8])   # the cache's entries: the model's dtype, int8, float8 e4m3 / e5m2 bytes
    cache_type = {0: "*" + dtype, 1: "*i8", 2: "*u8", 3: "*u8"}[kv_format]
    INT32 = {"block_tables_ptr", "query_start_ptr", "query_lens_ptr", "context_lens_ptr", "seq_lens_ptr"}

    def signature(fn, constexprs):
        sig = {}
        for name in fn.arg_names:
            if name in constexprs:
                sig[name] = "constexpr"
            elif name == "slot_ptr":
                sig[name] = "*i64"
            elif name in INT32:
                sig[name] = "*i32"
            elif name.startswith("part_") or name in ("alibi_ptr", "kv_scales_ptr"):
                sig[name] = "*fp32"
            elif name in ("k_cache_ptr", "v_cache_ptr"):
                sig[name] = cache_type
            elif name.endswith("_ptr"):
                sig[name] = "*" + dtype
            else:
                sig[name] = "fp32" if name == "scale_log2" else "i32"
        return sig

    precision = "ieee" if dtype == "fp32" else "tf32"
    block_d = max(16, triton.next_power_of_2(head_dim))
    rows, _ = K.prefill_tile(group)
    # (kernel, constexprs, num_warps as launched)
    kernels = [
        (cache_write._store_kv_kernel, dict(NUM_KV_HEADS=8, HEAD_DIM=head_dim, BLOCK_H=8, BLOCK_D=block_d), 4),
        (prefill._prefill_attention_kernel, dict(GROUP=group, BLOCK_SIZE=16, HEAD_DIM=head_dim, BLOCK_D=block_d,
                                           BLOCK_M=rows, BLOCK_N=K.PREFILL_BLOCK_N,
                                           PRECISION=precision, UPCAST=False, USE_WINDOW=use_window,
                                           SOFT_CAP=soft_cap, USE_ALIBI=use_alibi, KV_FORMAT=kv_format),
         K.PREFILL_NUM_WARPS),
        (decode._decode_attention_kernel, dict(NUM_HEADS=8 * group, GROUP=group, BLOCK_G=max(16, group),
                                          BLOCK_SIZE=16, HEAD_DIM=head_dim, BLOCK_D=block_d,
                                          BLOCK_N=K.DECODE_BLOCK_N, PRECISION=precision, UPCAST=False,
                                          USE_WINDOW=use_window, SOFT_CAP=soft_cap, USE_ALIBI=use_alibi,
                                          KV_FORMAT=kv_format), 4),
        (decode._decode_reduce_kernel, dict(NUM_HEADS=8 * group, HEAD_DIM=head_dim, BLOCK_S=16, BLOCK_D=block_d), 4),
    ]
    for fn, constexprs, num_warps in kernels:
        compiled = triton.compile(ASTSource(fn=fn, signature=signature(fn, constexprs), constexprs=constexprs),
                                  target=GPUTarget("cuda", arch, 32), options=dict(num_warps=num_warps))
        assert compiled.asm["cubin"], fn.__name__
        print(fn.__name__, "ok")
''')


@pytest.mark.parametrize("arch,dtype,head_dim,group,use_window,soft_cap,use_alibi,kv_format", [
    (90, "bf16", 128, 4, 0, 0.0, 0, 0), (90, "fp16", 64, 1, 0, 0.0, 0, 0), (90, "fp32", 128, 2, 0, 0.0, 0, 0),
    (80, "bf16", 64, 4, 0, 0.0, 0, 0), (80, "fp16", 128, 3, 0, 0.0, 0, 0),
    (90, "bf16", 256, 2, 1, 72.13475204444817, 0, 0), (80, "bf16", 128, 4, 1, 0.0, 0, 0),   # Gemma 2's; Mistral's
    (90, "bf16", 128, 1, 0, 0.0, 1, 0), (80, "fp16", 64, 8, 0, 0.0, 1, 0),   # BLOOM's; a grouped ALiBi Falcon
    (90, "bf16", 128, 4, 0, 0.0, 0, 1), (80, "fp16", 128, 2, 1, 0.0, 0, 2), (90, "bf16", 64, 1, 0, 0.0, 1, 3)])
def test_kernels_compile_for_nvidia_targets(arch, dtype, head_dim, group, use_window, soft_cap, use_alibi,
                                            kv_format):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(arch), dtype, str(head_dim), str(group),
                             str(use_window), str(soft_cap), str(use_alibi), str(kv_format)],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    if result.returncode and "ptxas" in result.stderr and "not found" in result.stderr.lower():
        pytest.skip("triton's bundled ptxas is not available on this platform")
    assert result.returncode == 0, result.stderr[-4000:]
    assert result.stdout.count(" ok") == 4
