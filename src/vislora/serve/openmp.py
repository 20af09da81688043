"""Keep the batch worker's OpenMP team alone: free the team of a thread that ran torch ops before it.

With GNU OpenMP (torch's CPU builds), every thread that opens a parallel region gets its own team of worker
threads, kept for its next region. Once the thread that built the model owns such a team, the batch worker's
own team runs small ops far slower: a MiniLM batch of 8 captions took 22 ms on the worker thread against 14 ms on
the thread that built the model (2 cores; the same 14 ms once that thread's team is freed). OpenMP 5's
`omp_pause_resource_all(omp_pause_hard)` frees the calling thread's team; torch makes a new one when that thread
next needs it, so calling this costs nothing but that.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

OMP_PAUSE_HARD = 2  # omp_pause_resource_t: omp_pause_soft = 1, omp_pause_hard = 2


def release_team() -> bool:
    """Free the calling thread's OpenMP team; False where torch's OpenMP runtime cannot (then nothing changes)."""
    pause = _pause()
    return pause is not None and pause(OMP_PAUSE_HARD) == 0


@functools.cache
def _pause() -> Callable[[int], int] | None:
    """`omp_pause_resource_all` of the OpenMP runtime torch loaded (never loads one of its own)."""
    folder = Path(torch.__file__).parent / "lib"
    # GNU OpenMP only: its pause frees just the calling thread's pool. LLVM/Intel OpenMP's pauses the whole
    # runtime, which would pull the team from under the batch worker.
    for path in sorted(folder.glob("libgomp*.so*")):
        try:
            runtime = ctypes.CDLL(str(path), mode=os.RTLD_NOLOAD | os.RTLD_LAZY)
            pause = runtime.omp_pause_resource_all
        except (OSError, AttributeError):
            continue
        pause.argtypes, pause.restype = [ctypes.c_int], ctypes.c_int
        return pause
    logger.debug("no GNU OpenMP runtime with omp_pause_resource_all in %s: teams stay as they are", folder)
    return None
