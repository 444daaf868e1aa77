"""GPU compile check on a CPU machine: every Triton kernel in ember.kernels compiles for sm_80
and sm_90 (ttir -> ttgir -> llir -> ptx -> cubin with the ptxas that ships with triton), so a
kernel that only fails in the real GPU compiler is caught without a GPU.

Convention (see the kernel files): a module of ember.kernels that defines ``@triton.jit`` functions
exposes ``COMPILE_SPECS = [(jit_fn, signature, constexprs[, options]), ...]``, e.g.
``(_k, {"X": "*bf16", "N": "i32", "BLOCK": "constexpr"}, {"BLOCK": 1024}, {"num_warps": 8})``
(``options`` is optional: ``num_warps``/``num_stages`` passed to ``triton.compile``). Every jit
function defined in the module must be covered: by a spec, or by being called from a covered
kernel (a ``@triton.jit`` helper cannot be compiled on its own; it is compiled inside its caller).
New modules and subpackages are discovered with ``pkgutil.walk_packages``.

Why a subprocess: tests run with ``TRITON_INTERPRET=1``, under which ``@triton.jit`` returns an
``InterpretedFunction`` that ``triton.compile`` cannot take (no ``cache_key``; its callees are
interpreter objects too). The compiles therefore run in one child process started without
``TRITON_INTERPRET``, where the decorators give real ``JITFunction``s; this process only discovers
kernels and checks coverage. One test per (module, kernel, arch) keeps failures readable.
"""

from __future__ import annotations

import importlib
import json
import os
import pkgutil
import queue
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import types

import pytest

# Targets: sm_80 and sm_90 as the pessimistic code the JIT builds for odd sizes, and sm_90 as it
# builds for ordinary tensors (16-aligned pointers and sizes, see ember.kernels._codegen), whose
# PTX is also checked for how it loads memory (test_tensor_core_operands_load_in_vectors).
ARCHS = ("sm80", "sm90", "sm90-aligned")
# A case (a kernel's specs for one arch) that gives no result this long is hung: its worker is
# killed and a fresh one goes on with the cases after it. Per case, not for all compiles together:
# on a loaded machine the ~100 cases together took past any fixed budget, while one takes seconds.
CASE_TIMEOUT_S = 300
# Shared memory one block may use (CUDA's opt-in maximum): a kernel compiled past it fails with
# OutOfResources at launch, which the compile alone does not report. A100 163 KB, H100 227 KB; a
# spec with options ``shared_max`` (ember.kernels._codegen.CONSUMER_SHARED) is held to that on
# sm_80 as well.
SHARED_LIMIT = {80: 166912, 90: 232448}


def _underlying(obj):
    """The Python function behind a jit/interpreted/autotuned kernel, or None for anything else."""
    from triton.runtime import KernelInterface

    seen = 0
    while isinstance(obj, KernelInterface) and seen < 8:
        obj = getattr(obj, "fn", None)
        seen += 1
    return obj if seen and isinstance(obj, types.FunctionType) else None


def _modules():
    """(name, module or the import error text) for every module under ember.kernels."""
    import ember.kernels as pkg

    out = [("ember.kernels", pkg)]
    for info in pkgutil.walk_packages(pkg.__path__, "ember.kernels.",
                                      onerror=lambda name: out.append((name, "walk failed"))):
        try:
            out.append((info.name, importlib.import_module(info.name)))
        except Exception:  # noqa: BLE001 - reported by test_module_imports
            out.append((info.name, traceback.format_exc(limit=3)))
    return out


def _jit_functions(module) -> dict[str, types.FunctionType]:
    """name -> Python function of every jit function defined (not imported) in module."""
    found = {}
    for obj in vars(module).values():
        fn = _underlying(obj)
        if fn is not None and fn.__module__ == module.__name__:
            found[fn.__name__] = fn
    return found


def _specs(module) -> list[tuple]:
    return list(getattr(module, "COMPILE_SPECS", []))


def _callees(fn: types.FunctionType) -> list[types.FunctionType]:
    """jit functions that fn's body refers to by global name or as ``some_module.name``."""
    out = []
    for name in fn.__code__.co_names:
        obj = fn.__globals__.get(name)
        if isinstance(obj, types.ModuleType):
            out += [f for n in fn.__code__.co_names if (f := _underlying(getattr(obj, n, None)))]
        elif (f := _underlying(obj)) is not None:
            out.append(f)
    return out


def _coverage():
    """(modules, {(module, kernel)}: spec'd kernels, {(module, fn)}: covered through a caller)."""
    modules = _modules()
    spec_keys, problems = set(), []
    for name, mod in modules:
        if isinstance(mod, str):
            continue
        for i, spec in enumerate(_specs(mod)):
            fn = _underlying(spec[0]) if isinstance(spec, tuple) and spec else None
            if fn is None or len(spec) not in (3, 4):
                problems.append(f"{name}.COMPILE_SPECS[{i}] is not (jit_fn, signature, "
                                f"constexprs[, options]): {spec!r:.200}")
                continue
            spec_keys.add((fn.__module__, fn.__name__))
    # Helpers reached from a spec'd kernel (transitively) are compiled as part of it.
    by_key = {(n, f): fn for n, m in modules if not isinstance(m, str)
              for f, fn in _jit_functions(m).items()}
    stack = [by_key[k] for k in spec_keys if k in by_key]
    reached: set = set()
    while stack:
        for callee in _callees(stack.pop()):
            key = (callee.__module__, callee.__name__)
            if key not in reached and key not in spec_keys:
                reached.add(key)
                stack.append(callee)
    return modules, spec_keys, reached, problems


if __name__ == "__main__":  # the compile worker needs none of the discovery
    _MODULES, _SPEC_KEYS, _REACHED, _SPEC_PROBLEMS, _CASES = [], set(), set(), [], []
else:
    _MODULES, _SPEC_KEYS, _REACHED, _SPEC_PROBLEMS = _coverage()
    _CASES = sorted({(mod, kern, arch) for mod, kern in _SPEC_KEYS for arch in ARCHS})
_ALIGNED = [(m, k) for m, k, a in _CASES if a == "sm90-aligned"]


@pytest.mark.parametrize("module", [n for n, _ in _MODULES])
def test_module_imports_and_every_jit_function_is_covered(module):
    mod = dict(_MODULES)[module]
    assert not isinstance(mod, str), f"{module} failed to import:\n{mod}"
    bad = [p for p in _SPEC_PROBLEMS if p.startswith(module + ".COMPILE_SPECS")]
    assert not bad, "\n".join(bad)
    missing = [f for f in _jit_functions(mod)
               if (module, f) not in _SPEC_KEYS and (module, f) not in _REACHED]
    assert not missing, (
        f"{module}: @triton.jit functions {missing} are in no COMPILE_SPECS entry and are not "
        "called by any covered kernel; add (fn, signature, constexprs) entries to "
        f"{module}.COMPILE_SPECS")


@pytest.fixture(scope="module")
def compile_results(request):
    """Compile the selected (module, kernel, arch) cases in child processes started without the
    interpreter (one per CPU, at most 2); returns {"module::kernel::arch": {"ok", "error",
    "seconds", "cpu_seconds"}}. Results stream back one JSON line per case (_compile_cases)."""
    wanted = sorted({tuple(item.callspec.params[k] for k in ("module", "kernel", "arch"))
                     for item in request.session.items
                     if getattr(item, "originalname", None) == "test_compiles"}
                    | {(*item.callspec.params["case"], "sm90-aligned")
                       for item in request.session.items
                       if getattr(item, "originalname", None)
                       == "test_tensor_core_operands_load_in_vectors"})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset
    n = max(1, min(2, os.cpu_count() or 1, len(wanted)))
    results: dict = {}
    threads = [threading.Thread(target=_compile_cases, args=(wanted[i::n], env, results))
               for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _key(case) -> str:
    return "::".join(map(str, case))


def _compile_cases(cases: list, env: dict, results: dict,
                   worker: tuple[str, ...] = (sys.executable, __file__, "--worker")) -> None:
    """Compile ``cases`` in a worker process (``worker`` + the cases as JSON), one JSON line back
    per case. A case with no result within CASE_TIMEOUT_S fails as hung (the worker is killed, a
    new one takes the cases after it); a worker that dies fails the cases it left."""
    todo = list(cases)
    while todo:
        log = tempfile.TemporaryFile("w+")
        # Cases go in argv (not stdin) so every worker starts compiling at once.
        proc = subprocess.Popen([*worker, json.dumps(todo)],
                                stdout=subprocess.PIPE, stderr=log, text=True, env=env)
        lines: queue.Queue = queue.Queue()

        def pump(out=proc.stdout, lines=lines) -> None:
            for line in out:
                lines.put(line)
            lines.put(None)

        threading.Thread(target=pump, daemon=True).start()
        hung = False
        while True:
            try:
                line = lines.get(timeout=CASE_TIMEOUT_S)
            except queue.Empty:
                hung = True
                proc.kill()
                break
            if line is None:
                break
            if line.startswith("{"):
                results.update(json.loads(line))
        proc.wait()
        log.seek(0)
        err = log.read()[-4000:]
        log.close()
        todo = [c for c in todo if _key(c) not in results]
        if not todo:
            return
        if hung:  # the case in progress: failed, the rest go to a fresh worker
            results[_key(todo[0])] = {
                "ok": False, "seconds": float(CASE_TIMEOUT_S), "cpu_seconds": 0.0,
                "error": f"no result within {CASE_TIMEOUT_S}s (a hung compile?):\n{err}"}
            todo = todo[1:]
            continue
        for case in todo:
            results[_key(case)] = {
                "ok": False, "seconds": 0.0, "cpu_seconds": 0.0,
                "error": f"no result from the compile worker (rc {proc.returncode}):\n{err}"}
        return


@pytest.mark.parametrize("module,kernel,arch", _CASES,
                         ids=[f"{m}::{k}::{a}" for m, k, a in _CASES])
def test_compiles(module, kernel, arch, compile_results):
    res = compile_results[f"{module}::{kernel}::{arch}"]
    assert res["ok"], f"{module}.{kernel} failed to compile for {arch}:\n{res['error']}"
    for i, (shared, shared_max) in enumerate(res["shared"]):
        limit = SHARED_LIMIT[int(arch[2:4])]
        if arch == "sm80" and shared_max:  # one fixed config: must fit RTX 30xx/40xx too
            limit = min(limit, shared_max)
        assert shared <= limit, (
            f"{module}.{kernel} (COMPILE_SPECS entry {i} of this kernel) needs {shared} bytes of "
            f"shared memory on {arch}, more than the GPU has ({limit}): it would fail with "
            "OutOfResources at launch; use smaller tiles or fewer stages")


@pytest.mark.parametrize("case", _ALIGNED, ids=[f"{m}::{k}" for m, k in _ALIGNED])
def test_tensor_core_operands_load_in_vectors(case, compile_results):
    """A kernel that feeds tensor cores must not read 16-bit elements one at a time: that is what
    a clamped (``tl.minimum``) or otherwise opaque offset along a tile's contiguous dim produces,
    and it made the fused cross-entropy's dhidden matmul several times slower on the H100 with
    no test failing. Checked on the sm_90 PTX built as for ordinary (16-aligned) tensors."""
    res = compile_results[f"{case[0]}::{case[1]}::sm90-aligned"]
    assert res["ok"], res["error"]
    for i, (loads, mma) in enumerate(res["ptx"]):
        if mma != "-":
            assert "2" not in loads, (
                f"{case[0]}.{case[1]} (COMPILE_SPECS entry {i}, {mma}) loads 2-byte elements one "
                f"at a time ({loads['2']} ld.global.b16); global loads by bytes: {loads}")


_FAKE_WORKER = """
import json, sys, time
for case in json.loads(sys.argv[-1]):
    if case[0] == "hang":
        time.sleep(60)
    if case[0] == "crash":
        sys.exit(3)
    print(json.dumps({"::".join(case): {"ok": True}}), flush=True)
"""


def test_a_hung_compile_fails_alone_and_the_others_go_on(monkeypatch):
    """The time limit is per case: a case with no result within CASE_TIMEOUT_S fails as hung and
    a fresh worker compiles the cases after it; a worker that dies fails the cases it left."""
    monkeypatch.setattr(sys.modules[__name__], "CASE_TIMEOUT_S", 2)
    cases = [("a", "k", "sm80"), ("hang", "k", "sm80"), ("b", "k", "sm80"),
             ("crash", "k", "sm80"), ("c", "k", "sm80")]
    results: dict = {}
    t0 = time.monotonic()
    _compile_cases(cases, dict(os.environ), results, (sys.executable, "-c", _FAKE_WORKER))
    assert time.monotonic() - t0 < 30  # the sleeping worker was killed
    assert results.keys() == {_key(c) for c in cases}
    assert results["a::k::sm80"]["ok"] and results["b::k::sm80"]["ok"]
    assert "no result within 2s" in results["hang::k::sm80"]["error"]
    for name in ("crash", "c"):
        assert "rc 3" in results[f"{name}::k::sm80"]["error"]


def _cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas runs as a child)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def _worker() -> None:
    """Child process: compile the requested cases, printing one JSON line per case."""
    from ember.kernels._codegen import compile_spec, global_loads, mma_kind

    wanted = json.loads(sys.argv[2])
    for module, kernel, arch in wanted:
        key = f"{module}::{kernel}::{arch}"
        t0, c0 = time.perf_counter(), _cpu_seconds()
        try:
            mod = importlib.import_module(module)
            specs = [s for s in _specs(mod) if _underlying(s[0]).__name__ == kernel]
            assert specs, f"no COMPILE_SPECS entry for {kernel}"
            ptx, shared = [], []
            for spec in specs:
                k = compile_spec(spec, int(arch[2:4]), aligned=arch.endswith("-aligned"))
                ptx.append((global_loads(k.asm["ptx"]), mma_kind(k.asm["ptx"])))
                shared.append((k.metadata.shared, (spec[3] if len(spec) == 4 else {}).get(
                    "shared_max")))
            res = {"ok": True, "error": "", "ptx": ptx, "shared": shared}
        except Exception as e:  # noqa: BLE001 - every failure is reported on its own test
            res = {"ok": False, "error": "".join(traceback.format_exception(e, limit=-6))[-6000:]}
        res.update(seconds=time.perf_counter() - t0, cpu_seconds=_cpu_seconds() - c0)
        print(json.dumps({key: res}), flush=True)


if __name__ == "__main__" and sys.argv[1:2] == ["--worker"]:
    _worker()
