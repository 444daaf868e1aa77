"""Compiling ``COMPILE_SPECS`` entries for a GPU target on a machine without one, and reading
what the generated PTX does with memory. Used by the GPU compile check and the codegen tests
(``tests/kernels/test_compile.py``, ``tests/kernels/test_codegen.py``) and by
``tools/kernel_resources.py``.

A spec is ``(jit_fn, signature, constexprs[, options])`` (see ``tests/kernels/test_compile.py``).
``aligned=True`` compiles it the way the JIT compiles a real launch on ordinary tensors: the JIT
marks every pointer that is 16-byte aligned and every integer argument divisible by 16 with
``tt.divisibility = 16``, and the compiler needs that to prove a load contiguous and aligned
enough for 16-byte vector loads and ``cp.async``. Without it (the compile check's default) the
code is the pessimistic variant the JIT builds for odd sizes.

Needs real ``JITFunction`` objects: call it in a process started without ``TRITON_INTERPRET``.
"""

from __future__ import annotations

import re

# Shared memory per block of the consumer GPUs that build the same code as sm_80 (RTX 30xx sm_86,
# RTX 40xx sm_89: 99 KB, against an A100's 163 KB). A spec whose options say
# ``"shared_max": CONSUMER_SHARED`` is a kernel launched with that one config (not autotuned
# among others that could fit), so the compile check holds its sm_80 build to this limit.
CONSUMER_SHARED = 101376

_LOAD = re.compile(r"\bld\.global(?:\.[\w:]+)*?(?:\.v(\d))?\.[bfsu](\d+)\s")
_CP_ASYNC = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\s*\[[^\]]*\],\s*\[[^\]]*\],\s*(\w+)")


def jit_function(obj):
    """The JITFunction inside obj (unwrapping autotuners and heuristics)."""
    from triton.runtime import JITFunction

    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{obj!r} is not a triton.jit function")
    return obj


def aligned_attrs(signature: dict) -> dict:
    """ASTSource attrs marking every pointer and integer argument divisible by 16."""
    return {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values())
            if t.startswith("*") or t in ("i32", "i64")}


def compile_spec(spec: tuple, arch: int, *, aligned: bool = False):
    """Compile one spec for ``sm_<arch>``; returns triton's compiled kernel (``.asm["ptx"]``,
    ``.metadata``)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constexprs = spec[:3]
    options = {k: v for k, v in (spec[3] if len(spec) == 4 else {}).items() if k != "shared_max"}
    src = ASTSource(fn=jit_function(fn), signature=dict(signature), constexprs=dict(constexprs),
                    attrs=aligned_attrs(signature) if aligned else None)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options or None)


def global_loads(ptx: str) -> dict[int, int]:
    """Bytes moved per global load instruction -> number of such instructions in the PTX
    (``ld.global`` scalar and vector forms, and ``cp.async`` copies to shared memory)."""
    out: dict[int, int] = {}
    for m in _LOAD.finditer(ptx):
        size = int(m.group(1) or 1) * int(m.group(2)) // 8
        out[size] = out.get(size, 0) + 1
    for m in _CP_ASYNC.finditer(ptx):
        size = int(m.group(1), 0)
        out[size] = out.get(size, 0) + 1
    return dict(sorted(out.items()))


def mma_kind(ptx: str) -> str:
    """'wgmma' (Hopper), 'mma.sync', or '-' when the kernel uses no tensor-core instruction."""
    return "wgmma" if "wgmma.mma_async" in ptx else "mma.sync" if "mma.sync" in ptx else "-"
