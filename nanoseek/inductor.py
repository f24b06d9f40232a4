"""torch.compile's once-per-process costs on CPU, started as soon as a compile is known to come.

Before inductor builds its first CPU graph in a process it asks which vector instructions its generated C++ may
use: for each instruction set the CPU reports (AVX2, AVX-512, AVX-512 VNNI here) it loads a small probe library in
a fresh Python process, one after the other, and it hashes torch's own source for its cache keys. Neither depends
on the graph, and both happen inside the first compile, after dynamo has traced the graph: 1.0–1.4 s of a warm
GRPO first step of 6–7 s, 2.9 s measured alone (docs/LOG.md). ``prepare_in_background`` runs them in a daemon
thread the moment a ``torch.compile`` is set up; the probes mostly wait on their child processes, so they overlap
the tracing, and the compile then finds both answers cached. The answers are torch's own (its functions, its
caches): nothing is skipped or assumed, only started earlier.
"""

from __future__ import annotations

import threading

_lock = threading.Lock()
_thread: threading.Thread | None = None


def _prepare() -> None:
    from torch._inductor.codecache import torch_key
    from torch._inductor.cpu_vec_isa import valid_vec_isa_list

    try:
        valid_vec_isa_list()  # functools.cache'd: the compile reads this list
        torch_key()  # functools.cache'd as well
    except Exception:  # noqa: BLE001 - the compile will meet the same problem itself and report it there
        pass


def prepare_in_background(device: str = "cpu") -> threading.Thread | None:
    """Start the once-per-process preparation of CPU compiles in a daemon thread (once; later calls return the
    same thread). Nothing to do for other devices. Returns the thread, or None when nothing was started."""
    global _thread
    if device != "cpu":
        return None
    with _lock:
        if _thread is None:
            # import here, in the caller's thread: torch.compile has just imported these, and a module imported for
            # the first time from two threads at once is best avoided
            import torch._inductor.codecache  # noqa: F401
            import torch._inductor.cpu_vec_isa  # noqa: F401

            _thread = threading.Thread(target=_prepare, name="nanoseek-inductor-prepare", daemon=True)
            _thread.start()
        return _thread
