"""Registers, spills, shared memory and MMA kind of every Triton kernel, on a machine without a GPU.

    python tools/kernel_resources.py                 # sm_90, the installed triton
    python tools/kernel_resources.py --arch 80 --module ember.kernels.attention._bwd
    python tools/kernel_resources.py --unaligned     # the code the JIT builds for odd sizes

Each ``COMPILE_SPECS`` entry of ``ember.kernels`` (the configurations the GPU compile check
builds) is compiled to PTX for the target and assembled with triton's own ``ptxas -v``; the table
shows what the GPU would run: registers per thread, bytes spilled to local memory, shared memory,
warps/stages, whether the dots became ``wgmma`` (Hopper), ``mma.sync`` or no tensor-core op, and
the global loads by width (bytes per instruction: count; ``cp.async`` included). By default each
kernel is compiled as the JIT compiles it for ordinary tensors (16-aligned pointers and sizes,
``ember.kernels._codegen.aligned_attrs``). A kernel that spills, misses ``wgmma`` on sm_90 or
feeds a matmul through 2-byte loads is a place to look before a GPU session.
Run with another triton (e.g. a venv with the GPU machine's version) to compare codegen.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)  # real JITFunctions, before triton is imported

import triton  # noqa: E402

from ember.kernels._codegen import compile_spec, global_loads, jit_function, mma_kind  # noqa: E402


def _modules(only: str | None):
    import ember.kernels as pkg

    names = ["ember.kernels"] + [i.name for i in pkgutil.walk_packages(pkg.__path__,
                                                                         "ember.kernels.")]
    return [importlib.import_module(n) for n in names if only is None or n == only]


def resources(spec: tuple, arch: int, aligned: bool = True) -> dict:
    from triton.backends.nvidia.compiler import get_ptxas

    k = compile_spec(spec, arch, aligned=aligned)
    ptx = k.asm["ptx"]
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    gpu = f"sm_{arch}a" if arch == 90 else f"sm_{arch}"
    try:
        log = subprocess.run([get_ptxas(arch).path, "--gpu-name", gpu, "-v", f.name, "-o",
                              os.devnull], capture_output=True, text=True, check=True).stderr
    finally:
        os.unlink(f.name)
    num = lambda pat: int(m.group(1)) if (m := re.search(pat, log)) else None  # noqa: E731
    loads = " ".join(f"{b}:{n}" for b, n in global_loads(ptx).items())
    return {"regs": num(r"Used (\d+) registers"), "spill": num(r"(\d+) bytes spill stores"),
            "smem": k.metadata.shared, "warps": k.metadata.num_warps,
            "stages": k.metadata.num_stages, "mma": mma_kind(ptx), "loads": loads or "-"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, choices=(80, 90))
    p.add_argument("--module", default=None, help="one module, e.g. ember.kernels.rms_norm")
    p.add_argument("--unaligned", action="store_true",
                   help="compile without the 16-divisibility the JIT gives ordinary tensors")
    args = p.parse_args()
    variant = "unaligned (odd sizes)" if args.unaligned else "aligned (ordinary tensors)"
    print(f"triton {triton.__version__}, sm_{args.arch}, {variant}")
    print(f"| {'kernel':<40} | regs | spill B | smem B | warps | stages | mma | loads (B:n) |")
    print("|---|---:|---:|---:|---:|---:|---|---|")
    for mod in _modules(args.module):
        for spec in getattr(mod, "COMPILE_SPECS", []):
            name = f"{mod.__name__.removeprefix('ember.kernels.')}.{jit_function(spec[0]).__name__}"
            try:
                r = resources(spec, args.arch, aligned=not args.unaligned)
            except Exception as e:  # noqa: BLE001 - one failing kernel must not end the table
                print(f"| {name:<40} | error: {type(e).__name__}: {str(e).splitlines()[0][:80]}")
                continue
            print(f"| {name:<40} | {r['regs']} | {r['spill']} | {r['smem']} | {r['warps']} | "
                  f"{r['stages']} | {r['mma']} | {r['loads']} |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
