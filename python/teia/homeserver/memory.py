"""The homeserver's malloc settings, on glibc.

glibc gives a thread that allocates while another thread holds the main heap's lock an arena of
its own (up to eight per CPU), and keeps what is freed there for that arena: after a load, the
homeserver's database worker threads each held an arena of 0.3 to 0.9 MiB, mostly free. The
service caps the arenas at start (`limit_arenas`), before its first worker thread; glibc's
per-thread caches keep most small allocations off the shared arenas' locks, and the load ran no
slower. An operator's ``MALLOC_ARENA_MAX`` in the environment wins: glibc read it at start, and
it is left alone. Elsewhere (musl, macOS) this is a no-op.
"""

from __future__ import annotations

import ctypes
import os
import sys

__all__ = ["limit_arenas"]

_M_ARENA_MAX = -8  # from glibc's <malloc.h>


def limit_arenas(count: int) -> bool:
    """Cap glibc's malloc arenas at ``count`` unless ``MALLOC_ARENA_MAX`` is set; whether the
    cap was applied."""
    if not sys.platform.startswith("linux") or "MALLOC_ARENA_MAX" in os.environ:
        return False
    libc = ctypes.CDLL(None)  # the process's own C library, already loaded
    if not hasattr(libc, "gnu_get_libc_version"):  # not glibc
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    return bool(mallopt(_M_ARENA_MAX, count))
