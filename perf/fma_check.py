"""Does the compiled normalise kernel contract x * scale + shift into an FMA? (FrozenBatchNorm2d's bits)

tritonbn.FrozenBatchNorm2d runs torchvision's ``x * scale + shift`` through the normalise
kernel. torch's eager CUDA rounds the product and the sum separately (two kernels); a Triton
kernel compiled with fp fusion on (the default up to Triton 3.9) computes ``fma(x, scale,
shift)``, one rounding. This compiles the kernel for sm_90 on the CPU (no GPU needed, as
perf/static_checks.py does) with fusion on and off and counts the PTX instructions.

Usage: python perf/fma_check.py
"""

from __future__ import annotations

import importlib
import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from perf import static_checks as sc  # noqa: E402


def main() -> None:
    sc._scrub_interpreter_env()
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant = next(v for v in sc.build_variants(quick=True, amd=False)
                   if v.kernel == "_bn_fwd_normalize_rows" and v.dtype == "float32" and v.target[0] == "cuda"
                   and v.flags == "!FROM_RUNNING HAS_WEIGHT HAS_BIAS !HAS_RESIDUAL")
    jit, _, _ = sc._unwrap(getattr(importlib.import_module(variant.module), variant.kernel))
    for fusion in (True, False):
        options = {**variant.options, "enable_fp_fusion": fusion}
        compiled = triton.compile(ASTSource(fn=jit, signature=variant.signature, constexprs=variant.constexprs,
                                            attrs=variant.attrs), target=GPUTarget(*variant.target), options=options)
        ptx = compiled.asm["ptx"]
        counts = {op: len(re.findall(rf"\b{op}(\.rn)?\.f32", ptx)) for op in ("fma", "mul", "add", "sub")}
        print(f"{variant.kernel} float32 {variant.arch}, enable_fp_fusion={fusion}: {counts}")


if __name__ == "__main__":
    main()
