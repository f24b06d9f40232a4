"""Sinkhorn-Knopp for mHC in C, built on first use with the machine's C compiler and loaded with ctypes.

The stream residual's Sinkhorn (residual_kernels.sinkhorn) normalises one n × n matrix per token 2·t_max times.
Written with torch operations that is ≈ 6 · t_max small operations over all tokens forward and twice that backward,
and on a CPU their per-operation cost was the largest part of mHC's overhead: ≈ 86 ms of a ≈ 200 ms difference
per training step between mHC and plain at B=8, T=256, C=256, 8 sites (docs/LOG.md). Here each block of 64 tokens
goes through all iterations in a buffer that stays in the L1 cache, the innermost loops running over the tokens
(vectorised by the compiler). The arithmetic is the same as the torch version, in the same order: column sums then
row sums, each plus the dtype's smallest normal number, divisions (not multiplications by reciprocals), and the
backward replays the forward keeping only the denominators (tests/test_native.py compares both directions).

Built once per machine into nanoseek's cache folder (``$NANOSEEK_CACHE``, else ~/.cache/nanoseek), keyed by the
source, the compiler and the CPU's instruction-set flags (``-march=native``), in about a second; plain C, no torch
headers. ``NANOSEEK_NATIVE=0`` turns it off. Without a C compiler, or if the build fails, a warning says why once
and the torch version runs (the same maths, slower).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

from nanoseek.cache import cache_dir

SOURCE = r"""
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define TB 64 /* tokens per block: the innermost loops run over them */

/* m: [n*n][TB] element-major logits of TB tokens, normalised in place; dens: [2*iters][n][TB] or NULL */
#define DEFINE_FORWARD(T, NAME, EXP, TINY)                                                            \
  static void NAME(T *m, int n, int iters, T *dens, T *d) {                                           \
    int nn = n * n;                                                                                   \
    T mx[TB];                                                                                         \
    for (int t = 0; t < TB; ++t) mx[t] = m[t];                                                        \
    for (int e = 1; e < nn; ++e)                                                                      \
      for (int t = 0; t < TB; ++t) mx[t] = m[e * TB + t] > mx[t] ? m[e * TB + t] : mx[t];             \
    for (int e = 0; e < nn; ++e)                                                                      \
      for (int t = 0; t < TB; ++t) m[e * TB + t] = EXP(m[e * TB + t] - mx[t]);                        \
    for (int it = 0; it < iters; ++it) {                                                              \
      for (int j = 0; j < n; ++j) { /* column sums: over the row index i */                           \
        T *dj = d + j * TB;                                                                           \
        for (int t = 0; t < TB; ++t) dj[t] = m[j * TB + t];                                           \
        for (int i = 1; i < n; ++i)                                                                   \
          for (int t = 0; t < TB; ++t) dj[t] += m[(i * n + j) * TB + t];                              \
        for (int t = 0; t < TB; ++t) dj[t] += TINY;                                                   \
      }                                                                                               \
      if (dens) memcpy(dens + (size_t)(2 * it) * n * TB, d, sizeof(T) * n * TB);                      \
      for (int i = 0; i < n; ++i)                                                                     \
        for (int j = 0; j < n; ++j)                                                                   \
          for (int t = 0; t < TB; ++t) m[(i * n + j) * TB + t] /= d[j * TB + t];                      \
      for (int i = 0; i < n; ++i) { /* row sums */                                                    \
        T *di = d + i * TB;                                                                           \
        for (int t = 0; t < TB; ++t) di[t] = m[(i * n) * TB + t];                                     \
        for (int j = 1; j < n; ++j)                                                                   \
          for (int t = 0; t < TB; ++t) di[t] += m[(i * n + j) * TB + t];                              \
        for (int t = 0; t < TB; ++t) di[t] += TINY;                                                   \
      }                                                                                               \
      if (dens) memcpy(dens + (size_t)(2 * it + 1) * n * TB, d, sizeof(T) * n * TB);                  \
      for (int i = 0; i < n; ++i)                                                                     \
        for (int j = 0; j < n; ++j)                                                                   \
          for (int t = 0; t < TB; ++t) m[(i * n + j) * TB + t] /= d[i * TB + t];                      \
    }                                                                                                 \
  }

/* token-major (N, n*n) <-> a block [n*n][TB]; rows past the end are zeros (their results are never stored) */
#define DEFINE_BLOCKS(T, LOAD, STORE)                                                                 \
  static void LOAD(const T *src, T *blk, int64_t t0, int64_t cnt, int nn) {                           \
    for (int64_t t = 0; t < TB; ++t)                                                                  \
      for (int e = 0; e < nn; ++e) blk[e * TB + t] = t < cnt ? src[(t0 + t) * nn + e] : (T)0;         \
  }                                                                                                   \
  static void STORE(T *dst, const T *blk, int64_t t0, int64_t cnt, int nn) {                          \
    for (int64_t t = 0; t < cnt; ++t)                                                                 \
      for (int e = 0; e < nn; ++e) dst[(t0 + t) * nn + e] = blk[e * TB + t];                          \
  }

#define DEFINE_API(T, SUFFIX, FWD, LOAD, STORE)                                                       \
  int sinkhorn_forward_##SUFFIX(const T *logits, T *out, int64_t N, int n, int iters) {               \
    int nn = n * n;                                                                                   \
    T *m = malloc(sizeof(T) * nn * TB), *d = malloc(sizeof(T) * n * TB);                              \
    if (!m || !d) { free(m); free(d); return 1; }                                                     \
    for (int64_t t0 = 0; t0 < N; t0 += TB) {                                                          \
      int64_t cnt = N - t0 < TB ? N - t0 : TB;                                                        \
      LOAD(logits, m, t0, cnt, nn);                                                                   \
      FWD(m, n, iters, NULL, d);                                                                      \
      STORE(out, m, t0, cnt, nn);                                                                     \
    }                                                                                                 \
    free(m); free(d);                                                                                 \
    return 0;                                                                                         \
  }                                                                                                   \
  /* step k was y = m / d_k: dL/dm = (g - sum_dim g*y) / d_k, and its input is m = y * d_k */         \
  int sinkhorn_backward_##SUFFIX(const T *grad, const T *logits, T *out, int64_t N, int n, int iters) { \
    int nn = n * n;                                                                                   \
    T *m = malloc(sizeof(T) * nn * TB), *g = malloc(sizeof(T) * nn * TB);                             \
    T *d = malloc(sizeof(T) * n * TB), *dens = malloc(sizeof(T) * 2 * (size_t)iters * n * TB);        \
    T s[TB];                                                                                          \
    if (!m || !g || !d || !dens) { free(m); free(g); free(d); free(dens); return 1; }                 \
    for (int64_t t0 = 0; t0 < N; t0 += TB) {                                                          \
      int64_t cnt = N - t0 < TB ? N - t0 : TB;                                                        \
      LOAD(logits, m, t0, cnt, nn);                                                                   \
      LOAD(grad, g, t0, cnt, nn);                                                                     \
      FWD(m, n, iters, dens, d);                                                                      \
      for (int k = 2 * iters - 1; k >= 0; --k) {                                                      \
        const T *dk = dens + (size_t)k * n * TB;                                                      \
        int rows = k % 2; /* 0: a column step (divided by column sums), 1: a row step */              \
        for (int a = 0; a < n; ++a) {                                                                 \
          const T *da = dk + a * TB;                                                                  \
          for (int t = 0; t < TB; ++t) s[t] = 0;                                                      \
          for (int b = 0; b < n; ++b) {                                                               \
            int e = rows ? a * n + b : b * n + a;                                                     \
            for (int t = 0; t < TB; ++t) s[t] += g[e * TB + t] * m[e * TB + t];                       \
          }                                                                                           \
          for (int b = 0; b < n; ++b) {                                                               \
            int e = rows ? a * n + b : b * n + a;                                                     \
            for (int t = 0; t < TB; ++t) {                                                            \
              g[e * TB + t] = (g[e * TB + t] - s[t]) / da[t];                                         \
              m[e * TB + t] *= da[t];                                                                 \
            }                                                                                         \
          }                                                                                           \
        }                                                                                             \
      }                                                                                               \
      for (int i = 0; i < nn * TB; ++i) g[i] *= m[i];                                                 \
      STORE(out, g, t0, cnt, nn);                                                                     \
    }                                                                                                 \
    free(m); free(g); free(d); free(dens);                                                            \
    return 0;                                                                                         \
  }

DEFINE_FORWARD(float, forward_block_f32, expf, FLT_MIN)
DEFINE_BLOCKS(float, load_f32, store_f32)
DEFINE_API(float, f32, forward_block_f32, load_f32, store_f32)
DEFINE_FORWARD(double, forward_block_f64, exp, DBL_MIN)
DEFINE_BLOCKS(double, load_f64, store_f64)
DEFINE_API(double, f64, forward_block_f64, load_f64, store_f64)
"""

SUFFIX = {torch.float32: "f32", torch.float64: "f64"}
_lock = threading.Lock()
_library: ctypes.CDLL | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _build(compiler: str) -> ctypes.CDLL:
    key = hashlib.sha256("\n".join([SOURCE, compiler, platform.machine(), _cpu_flags()]).encode()).hexdigest()[:16]
    target = cache_dir() / "native" / f"sinkhorn-{key}.so"
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            source, built = Path(tmp, "sinkhorn.c"), Path(tmp, "sinkhorn.so")
            source.write_text(SOURCE)
            command = [compiler, "-O3", "-march=native", "-std=c99", "-shared", "-fPIC", "-o", str(built), str(source)]
            done = subprocess.run(command, capture_output=True, text=True, timeout=300)
            if done.returncode != 0:
                raise RuntimeError(f"{' '.join(command)} failed: {done.stderr.strip()[-500:]}")
            os.replace(built, target)  # atomic: a process building at the same time finds a whole library or none
    lib = ctypes.CDLL(str(target))
    for suffix in SUFFIX.values():
        pointer, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        getattr(lib, f"sinkhorn_forward_{suffix}").argtypes = [pointer, pointer, i64, i32, i32]
        getattr(lib, f"sinkhorn_backward_{suffix}").argtypes = [pointer, pointer, pointer, i64, i32, i32]
    return lib


def library() -> ctypes.CDLL | None:
    """The built library, or None (turned off, no compiler, or a failed build: then a warning said why, once)."""
    global _library, _tried
    if _tried:
        return _library
    with _lock:
        if _tried:
            return _library
        if os.environ.get("NANOSEEK_NATIVE", "1") == "0":
            _tried = True
            return None
        compiler = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
        try:
            if compiler is None:
                raise RuntimeError("no C compiler found (cc, gcc or clang on PATH, or $CC)")
            _library = _build(compiler)
        except (OSError, RuntimeError, subprocess.SubprocessError) as e:
            warnings.warn(f"nanoseek: mHC's Sinkhorn runs on torch operations (slower): its C kernel is unavailable: "
                          f"{e}", stacklevel=3)  # fmt: skip
            _library = None
        _tried = True
        return _library


def usable(t: torch.Tensor) -> bool:
    """Whether the C kernel takes this tensor: a CPU float32 / float64 tensor, with the library built."""
    return t.device.type == "cpu" and t.dtype in SUFFIX and library() is not None


def _call(name: str, dtype: torch.dtype, *args) -> None:
    if getattr(library(), f"{name}_{SUFFIX[dtype]}")(*args) != 0:
        raise MemoryError(f"nanoseek: {name} could not allocate its buffers")


def sinkhorn_forward(logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """Sinkhorn-Knopp of logits (..., n, n) (``usable(logits)`` must hold)."""
    x = logits.contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _call("sinkhorn_forward", x.dtype, x.data_ptr(), out.data_ptr(), x.numel() // (n * n), n, n_iters)
    return out


def sinkhorn_backward(grad: torch.Tensor, logits: torch.Tensor, n_iters: int) -> torch.Tensor:
    """dL/dlogits from dL/d(sinkhorn(logits)) (``usable(logits)`` must hold)."""
    x, g = logits.contiguous(), grad.to(logits.dtype).contiguous()
    out = torch.empty_like(x)
    n = x.shape[-1]
    _call("sinkhorn_backward", x.dtype, g.data_ptr(), x.data_ptr(), out.data_ptr(), x.numel() // (n * n), n, n_iters)
    return out
