"""The Triton kernels compile for an H100 (sm_90) without one: Triton's compiler and ptxas need no GPU.

The interpreter runs the kernels' arithmetic on CPU but never compiles them; this compiles the autotune
configs the GPU would choose among, as the JIT would specialise them (16-byte aligned pointers and
strides), in a process without TRITON_INTERPRET, and checks what the interpreter cannot: they lower at
all, fit the H100's shared memory, pipeline their K loops (cp.async) and, for fp16/bf16, run on the
tensor cores (wgmma, or mma.sync for a 32-row tile). It does not run them: speed and results on a GPU
need one (test_lora_triton.py runs there on CUDA, bf16 included).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

H100_SHARED_BYTES = 232448  # 227 KiB per block
CASES = [("fp16", 64, "all"), ("bf16", 64, "first"), ("fp16", 16, "first"), ("fp32", 16, "smallest")]


def _compile(dtype: str, rank: int, which: str) -> list[dict]:
    """Compile both kernels' configs for sm_90; one record per (kernel, config). Run without TRITON_INTERPRET."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from distillery.kernels import lora_triton as L

    torch_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    const = {"R": rank, "PRECISION": L.dot_precision(torch_dtype), "HAS_BIAS": True,
             "stride_xk": 1, "stride_ak": 1, "stride_wk": 1, "stride_br": 1, "stride_yn": 1}  # contiguous last dims
    records = []
    for name, kernel, configs in (("shrink", L._shrink_kernel, L.SHRINK_CONFIGS),
                                  ("expand", L._expand_kernel, L.EXPAND_CONFIGS)):
        fn = kernel.fn
        chosen = {"all": configs, "first": configs[:1], "smallest": configs[-1:]}[which]
        for config in chosen:
            consts = {k: v for k, v in {**const, **config.kwargs}.items() if k in fn.arg_names}
            signature = {n: "constexpr" if n in consts else "*fp32" if n in ("t_ptr", "scale_ptr")
                         else "*i32" if n.startswith("run_") else f"*{dtype}" if n.endswith("_ptr") else "i32"
                         for n in fn.arg_names}
            aligned = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names)
                       if n not in consts and (n.endswith("_ptr") or n.startswith("stride") or n in ("K", "N"))}
            compiled = triton.compile(ASTSource(fn, signature, constexprs=consts, attrs=aligned),
                                      target=GPUTarget("cuda", 90, 32),
                                      options={"num_warps": config.num_warps, "num_stages": config.num_stages})
            ptx = compiled.asm["ptx"]
            records.append({"kernel": name, "config": str(config.kwargs), "shared": compiled.metadata.shared,
                            "pipelined": "cp.async" in ptx, "tensor_cores": "wgmma" in ptx or "mma.sync" in ptx})
    return records


@pytest.mark.parametrize("dtype, rank, which", CASES)
def test_kernels_compile_for_sm90(dtype, rank, which):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__, dtype, str(rank), which], capture_output=True, text=True,
                          check=False, env=env, timeout=300, cwd=Path(__file__).resolve().parents[2])
    assert proc.returncode == 0, proc.stderr[-3000:]  # the locked triton wheel ships ptxas: none is a failure
    records = json.loads(proc.stdout.strip().splitlines()[-1])
    assert records and all(r["shared"] <= H100_SHARED_BYTES and r["pipelined"] for r in records), records
    assert all(r["tensor_cores"] == (dtype != "fp32") for r in records), records  # fp32 "ieee" products: FMA


if __name__ == "__main__":
    print(json.dumps(_compile(sys.argv[1], int(sys.argv[2]), sys.argv[3])))
