"""Keep a long-running serving process's memory from ratcheting up (glibc's malloc).

glibc gives each thread that allocates its own arena (up to 8 per core) and keeps freed memory inside them:
with a pool of decode threads handling images of varying sizes, the service's resident memory grew steadily
under the soak benchmark although nothing was leaking. Capping the arenas and trimming periodically gives
memory back. Both are no-ops where the C library is not glibc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)
_M_ARENA_MAX = -8  # mallopt parameter number in glibc's malloc.h


def _libc():
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None
    except OSError:
        return None


def limit_arenas(arenas: int = 2) -> bool:
    """Cap the number of malloc arenas for threads started from now on; True when applied."""
    libc = _libc()
    return bool(libc and libc.mallopt(_M_ARENA_MAX, arenas))


def trim() -> bool:
    """Return free heap memory to the operating system; True when some was released."""
    libc = _libc()
    return bool(libc and libc.malloc_trim(0))
