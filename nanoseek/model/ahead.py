"""The decode step compiled ahead of time: ``Transformer.decode_step`` exported once (``torch.export``) and built by
AOTInductor into a library that is called directly, without torch.compile's per-call machinery.

A batch-1 token of the demo model costs ≈ 0.8 ms in the torch.compile'd step, of which only ≈ 0.35 ms is the
kernels' work (21 matrix-vector products reading 7.3 MB of weights, the attention and the norms): the rest is
Python and dynamo around the kernels — the guard check on ≈ 50 tensors, the bytecode that gathers the parameters,
the AOTAutograd and inductor wrappers, a tensor made for each symbolic size (docs/LOG.md). The ahead-of-time library
takes the same inputs and runs the same kind of generated C++ in ≈ 0.6 of the time, with the same numbers.

What the library is given, so that one build serves every batch, cache and weight update:

- the parameters and buffers as inputs (never baked in as constants): a GRPO update or a ``load_state_dict`` is
  seen at the next step, as with torch.compile;
- the KV cache's whole buffers (L, R, H_kv, S, D) and (R, S) with their row count R and slot count S dynamic, plus
  the tokens (B,) and a 1-D ``window`` tensor whose length n is the number of filled slots: the step reads the
  first B rows and n slots of the buffers and writes the new keys and values into slot n itself (two eager copies
  a token fewer). Exported inputs have fixed strides, so the step cannot take a cache window's view (its strides
  depend on the buffer) — but a prefix of a contiguous buffer it can slice itself;
- inductor's input checks are on (``AOTI_RUNTIME_CHECK_INPUTS``): a tensor of another dtype or layout is an error,
  not a misread.

The built library is kept in inductor's cache folder under a key hashed from what the exported graph is a
function of: the model's source (the files of ``nanoseek.model`` and the few top-level modules they import — all the
nanoseek code the model can run, which tests/test_ahead.py checks — and the model class's file if it is defined
elsewhere; an edit to the training, RL or serving code builds nothing anew), the model's configuration,
class and train / eval mode, its parameters' and buffers' names, dtypes and shapes, the autocast dtype, torch's and
Python's versions and the CPU's vector instructions. A later process loads the library (milliseconds) without
exporting the step again (seconds) or building it (tens of seconds). A model whose code is changed at run time
(a method or a module global patched in the process) is not seen by that key: turn the path off for it
(``generate.AHEAD_OF_TIME = False``). CPU only; under CPU autocast the step is exported inside the same autocast (a
GRPO run's sampling, whose matmuls run in bf16), each autocast dtype a library of its own; not for models whose step
cannot be exported whole (``Transformer.exportable``: not MoE models, whose experts get data-dependent numbers of
rows).
"""

from __future__ import annotations

import functools
import hashlib
import inspect
import os
import sys
import tempfile
import warnings
import weakref
from contextlib import nullcontext
from pathlib import Path

import torch

import nanoseek
from nanoseek.model.attention import KVCache

FORMAT = 2  # bump when what is exported or how it is called changes
_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_FAILED = object()  # a model whose export or build failed once: torch.compile serves it from then on
_PACKAGE = Path(nanoseek.__file__).resolve().parent
# the top-level modules the model's code imports (tests/test_ahead.py checks that it imports no other nanoseek code)
_TOP_LEVEL = ("__init__.py", "cache.py", "inductor.py", "openmp.py", "schema.py")


def _model_source_files() -> list[Path]:
    """The Python files the libraries' keys are hashed from: nanoseek/model/**.py and the top-level modules it
    imports — all the nanoseek code the model's forward and decode step can run."""
    return sorted([*(_PACKAGE / "model").rglob("*.py"), *(_PACKAGE / name for name in _TOP_LEVEL)])


class _Step(torch.nn.Module):
    """``model.decode_step`` as a module's forward, for ``torch.func.functional_call``."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, *args):
        return self.model.decode_step(*args)


class _Window(torch.nn.Module):
    """``decode_step`` over the first B rows and ``window`` slots of whole cache buffers, with the model's
    parameters passed in; holds no tensors of its own, so the export lifts none as constants."""

    def __init__(self, model: torch.nn.Module, names: list[str], autocast: torch.dtype | None):
        super().__init__()
        object.__setattr__(self, "step", _Step(model))  # not a submodule: its weights are inputs, not state
        self.names = [f"model.{name}" for name in names]
        self.autocast = autocast

    def forward(self, tensors, tokens, k, v, valid, window, position):
        b, n = tokens.shape[0], window.shape[0]
        torch._check(b <= k.shape[1])
        torch._check(n < k.shape[3])
        state = dict(zip(self.names, tensors, strict=True))
        slot = torch.ones((), dtype=torch.long, device=tokens.device) * window.shape[0]  # after the filled slots
        args = (tokens, k[:, :b, :, :n], v[:, :b, :, :n], valid[:b, :n], slot, position)
        with torch.autocast("cpu", dtype=self.autocast) if self.autocast is not None else nullcontext():
            logits, new_k, new_v = torch.func.functional_call(self.step, state, args, strict=True, tie_weights=False)
        k[:, :b, :, n : n + 1] = new_k  # written here, into the buffers: two eager copies a token fewer
        v[:, :b, :, n : n + 1] = new_v
        return logits


class AheadOfTimeDecodeStep:
    """``model.decode_step`` as an AOTInductor library; call it with (tokens (B,), cache, position) for the next
    logits (B, V), the new keys and values written into the cache's next slot."""

    def __init__(self, model: torch.nn.Module, autocast: torch.dtype | None = None):
        """The step of ``model`` (under CPU autocast to ``autocast``, if given): its library loaded from the cache
        folder, or exported and built there first."""
        names = [name for name, _ in model.named_parameters()] + [name for name, _ in model.named_buffers()]
        self.owners = [_owner(model, name) for name in names]
        tensors = self.tensors()
        self.dtype, device = tensors[0].dtype, tensors[0].device
        os.environ.setdefault("AOTI_RUNTIME_CHECK_INPUTS", "1")  # read once, when the first library is called
        described = [(name, str(t.dtype), tuple(t.shape)) for name, t in zip(names, tensors, strict=True)]
        key = hashlib.sha256(
            "\n".join(
                [
                    str(FORMAT),
                    torch.__version__,
                    sys.version,
                    torch.backends.cpu.get_cpu_capability(),
                    _source_digest(_class_file(model)),
                    f"{type(model).__module__}.{type(model).__qualname__}",
                    repr(getattr(model, "cfg", None)),
                    f"training={model.training} autocast={autocast} device={device}",
                    repr(described),
                ]
            ).encode()
        ).hexdigest()[:32]
        self.path = _library(key, lambda: _export(model, names, tensors, autocast))
        # inductor's own loader, without aoti_load_package's comparison of the package's CPU with this one (for a
        # warning): it asks inductor which vector instructions this CPU has, which builds and loads a probe library
        # per instruction set in child processes (≈ 1.8 s a process); the key above already names them
        self.loader = torch._C._aoti.AOTIModelPackageLoader(str(self.path), "model", False, 1, -1)

    def tensors(self) -> list[torch.Tensor]:
        """The model's parameters and buffers now: a parameter replaced in its module is seen (a replaced module
        is not; torch.compile's step, which reads the model afresh, would see that too)."""
        return [owner[name] for owner, name in self.owners]

    def __call__(self, tokens: torch.Tensor, cache: KVCache, position: torch.Tensor) -> torch.Tensor:
        """One token per row after the cache's filled slots -> the next logits (B, V); the new keys and values are
        written into the cache's next slot (``cache.pos`` is the caller's to advance)."""
        k, v, valid, copied = _buffers(cache)
        n = cache.pos
        window = _window(n, tokens.device)
        logits = self.loader.run([*self.tensors(), tokens.long().contiguous(), k, v, valid, window, position])
        if copied:  # the library wrote into copies: the new slot goes back into the cache
            cache.k[:, :, :, n], cache.v[:, :, :, n] = k[:, :, :, n], v[:, :, :, n]
        return logits[0]


def _owner(model: torch.nn.Module, name: str) -> tuple[dict, str]:
    """The dict that holds a parameter or buffer by name, and its key there: reading it at each call sees a
    replaced tensor at the cost of one lookup."""
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name) if module_name else model
    return (module._parameters if attr in module._parameters else module._buffers), attr


def _buffers(cache: KVCache) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
    """The cache's k, v and valid as contiguous buffers whose first rows (dimension 1 of k and v, 0 of valid) they
    are: themselves when contiguous, else the buffers they view when they are such a prefix (a server's running batch
    views its first rows), else contiguous copies (correct, slower; the last item says so). All three the same way,
    so that they agree on the row and slot counts the library reads them with."""
    tensors = (cache.k, cache.v, cache.valid)
    if all(t.is_contiguous() for t in tensors):
        return (*tensors, False)
    bases = [_prefix_base(t, 1 if t.dim() == 5 else 0) for t in tensors]
    if all(b is not None for b in bases) and bases[0].shape[1] == bases[1].shape[1] == bases[2].shape[0]:
        return (*bases, False)
    return (*(t.contiguous() for t in tensors), True)


def _prefix_base(t: torch.Tensor, row_dim: int) -> torch.Tensor | None:
    """The contiguous tensor ``t`` is the first rows of, along ``row_dim``: itself, or the buffer it views."""
    base = t._base if t._base is not None else t
    if (
        base.is_contiguous()
        and base.dim() == t.dim()
        and t.data_ptr() == base.data_ptr()
        and t.stride() == base.stride()
        and all(t.shape[d] == base.shape[d] for d in range(t.dim()) if d != row_dim)
    ):
        return base
    return None


_WINDOWS: dict[torch.device, torch.Tensor] = {}


def _window(n: int, device: torch.device) -> torch.Tensor:
    """A 1-D tensor of length n (its values unused): a prefix of one kept buffer, so nothing is allocated."""
    buf = _WINDOWS.get(device)
    if buf is None or buf.shape[0] < n:
        buf = _WINDOWS[device] = torch.empty(max(n, 4096), device=device)
    return buf[:n]


def _export(
    model: torch.nn.Module, names: list[str], tensors: list[torch.Tensor], autocast: torch.dtype | None
) -> torch.export.ExportedProgram:
    """``_Window`` over ``model`` exported with every size that varies between calls dynamic."""
    device = tensors[0].device
    example = KVCache(model.cfg, 5, 37, device, tensors[0].dtype)  # sizes no other dimension shares
    window, position = torch.empty(11, device=device), torch.tensor(11, device=device)
    tokens = torch.zeros(3, dtype=torch.long, device=device)
    inputs = ([t.detach() for t in tensors], tokens, example.k, example.v, example.valid, window, position)
    dim = torch.export.Dim
    # the new slot is after the filled ones, inside the buffer: filled < slots (export's lower bounds are 2 and 3,
    # from its rule that sizes 0 and 1 are special; one filled slot of two runs too, as the tests check)
    rows, slots = dim("rows", min=1, max=1 << 16), dim("slots", min=3, max=1 << 20)
    batch, filled = dim("batch", min=1, max=1 << 16), dim("filled", min=1, max=(1 << 20) - 1)
    cache, valid = {1: rows, 3: slots}, {0: rows, 1: slots}
    shapes = ([None] * len(tensors), {0: batch}, cache, cache, valid, {0: filled}, None)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch's notices about its own internals, not the user's
        return torch.export.export(_Window(model, names, autocast), inputs, dynamic_shapes=shapes, strict=False)


@functools.cache
def _source_digest(extra: str | None) -> str:
    """SHA-256 of the model's source files (``_model_source_files``: path and bytes), and of ``extra`` (the model
    class's file when it is not one of them): the code the exported step is traced from."""
    digest = hashlib.sha256()
    for f in _model_source_files():
        digest.update(str(f.relative_to(_PACKAGE)).encode() + b"\0" + f.read_bytes())
    if extra:
        digest.update(extra.encode() + b"\0" + Path(extra).read_bytes())
    return digest.hexdigest()


def _class_file(model: torch.nn.Module) -> str | None:
    """The file that defines the model's class, when it is not among the hashed model source files (else None)."""
    try:
        path = Path(inspect.getfile(type(model))).resolve()
    except (TypeError, OSError):
        return None
    return None if path in _model_source_files() or not path.exists() else str(path)


def _library(key: str, export) -> Path:
    """The library for this key: from the cache folder, or exported (``export()``) and built there (written to a
    temporary name and renamed, so a reader never sees half a file and two processes building it at once both end
    with a whole one)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    folder = Path(cache_dir()) / "nanoseek_ahead"
    path = folder / f"decode_step_{key}.pt2"
    if path.exists():
        return path
    program = export()
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".building-", suffix=".pt2")  # the package must end in .pt2
    os.close(fd)
    try:
        # dimensions of size 1 (one row, one filled slot) are valid inputs: no lower bound of 2 in the input checks
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch's notices about its own internals
            torch._inductor.aoti_compile_and_package(
                program, package_path=tmp, inductor_configs={"aot_inductor.check_lowerbound": False}
            )
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def ahead_of_time_step(model: torch.nn.Module) -> AheadOfTimeDecodeStep | None:
    """The model's ahead-of-time decode step, built on first use and kept for the model's lifetime (one per
    train / eval mode and CPU autocast dtype); None when it does not apply — not on CPU, a model that cannot be
    exported whole — or when its export or build failed (said once, in a warning; torch.compile's step is used
    instead)."""
    param = next(model.parameters())
    if param.device.type != "cpu" or not getattr(model, "exportable", False):
        return None
    autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
    steps = _STEPS.setdefault(model, {})
    mode = (model.training, autocast)
    step = steps.get(mode)
    if step is None:
        try:
            step = AheadOfTimeDecodeStep(model, autocast)
        except Exception as e:  # noqa: BLE001 - any failure leaves torch.compile's step, which computes the same
            warnings.warn(
                f"the decode step could not be compiled ahead of time ({type(e).__name__}: {str(e)[:300]}); "
                "torch.compile's step is used instead",
                stacklevel=2,
            )
            step = _FAILED
        steps[mode] = step
    if step is _FAILED or step.dtype != param.dtype:
        return None
    return step
