"""Worker processes for CacheGen's entropy coder: a request's ANS streams, one per (layer, chunk), coded in parallel.

constriction codes ~100 M symbols/s on one core and holds the GIL, so one long prompt (an 8B model's 4K tokens: ~260 M
symbols) takes seconds to code in one process; the real CacheGen codes on the GPU in parallel. The streams are
independent, so they are spread over a pool of processes: created once per process on first use (`spawn`: the
parent holds CUDA), shut down at exit, and gone with their parent (a crashed serving worker leaves no orphans).
Coding the streams apart gives the very bytes of coding them one after the other.

No symbols cross the pipes: a request's arrays (symbols to encode; compressed streams and decoded symbols) live in
one `Arena`, a memory-mapped file every worker maps too (in /dev/shm, or the temporary directory when /dev/shm is
small; kept for the next request once it is done: a fresh file's first touch of every page is the costly part),
and a job carries `Ref`s (offset, shape, strides) into it plus its small frequency tables.
`coder(workers, symbols, nbytes)` picks where a request is coded; both kinds take jobs with `submit(fn, *args)`:
  * `InProcess`: in this process, each job run when `gather` asks for its result (one worker, or too little work
    to repay the pool's round trips; a decode prepared ahead then runs at install, not at receive);
  * `Pooled`: on the pool, each job running from submission on.
`gather` waits for the results and turns a dead worker into a one-line HackError.
"""
from __future__ import annotations

import math
import mmap
import multiprocessing
import multiprocessing.util
import os
import shutil
import tempfile
import threading
import time
import weakref
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Callable

import numpy as np

from hack_cli.errors import HackError

MIN_POOL_SYMBOLS = 1 << 21  # ~20 ms of coding on one core: less is coded in process (a job's round trip: ~0.3 ms)
ALIGN = 64  # bytes: every arena array starts on a cache line


def auto_workers() -> int:
    """Coder processes for quant.coder_workers=0: half of this process's cores (the prefill and decode workers share
    a host), at most 16, at least 1."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(16, cores // 2))


def resolve(workers: int) -> int:
    """quant.coder_workers -> the number of coder processes (1: code in this process)."""
    return auto_workers() if workers == 0 else workers


# ---------------------------------------------------------------------------------------------- the pool
class CoderPool:
    """`workers` spawned processes, each running jobs (`_run`) on arena arrays."""

    def __init__(self, workers: int):
        self.workers = workers
        self.executor = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=_exit_with_parent, initargs=(os.getpid(),))

    def submit(self, fn: Callable, *args) -> Future:
        try:
            return self.executor.submit(fn, *args)
        except BrokenProcessPool as e:
            raise _dead(e) from e

    def start(self) -> None:
        """Start the processes now (the first job starts them otherwise: seconds of imports)."""
        gather([self.submit(os.getpid) for _ in range(self.workers)])


_pool: CoderPool | None = None


def get_pool(workers: int) -> CoderPool:
    """This process's pool of `workers` processes, created on first use (a pool of another size is replaced)."""
    global _pool
    if _pool is None or _pool.workers != workers:
        shutdown()
        _pool = CoderPool(workers)
    return _pool


def shutdown() -> None:
    """End this process's pool, if any: queued jobs are cancelled, running ones finish, the processes exit."""
    global _pool
    if _pool is not None:
        _pool.executor.shutdown(wait=True, cancel_futures=True)
        _pool = None


# At exit, before anything else of `multiprocessing` (a serving worker, itself a multiprocessing child, joins its
# children before atexit handlers run, and closes the pool's job queue first: its processes would wait forever).
multiprocessing.util.Finalize(None, shutdown, exitpriority=100)


def _dead(e: BaseException) -> HackError:
    shutdown()  # a broken pool takes no more jobs: the next request starts a fresh one
    return HackError(f"a cachegen coder worker process died ({type(e).__name__}); quant.coder_workers=1 codes in "
                     "the serving process")


def _exit_with_parent(parent: int) -> None:
    """Worker initializer: exit once the parent is gone (killed, or ended with os._exit), which ends no pool."""
    def watch():
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(0)

    threading.Thread(target=watch, name="coder-parent-watch", daemon=True).start()


def gather(jobs: list) -> list:
    """The jobs' results in order (futures of either coder); a dead worker -> HackError."""
    try:
        return [job.result() for job in jobs]
    except BrokenProcessPool as e:
        raise _dead(e) from e


# ---------------------------------------------------------------------------------------------- the arena
@dataclass(frozen=True)
class Ref:
    """An array inside an arena, as a worker maps it."""
    offset: int
    shape: tuple
    strides: tuple
    dtype: str


def arena_bytes(shapes: list[tuple]) -> int:
    """Bytes of an arena holding one uint8 array of each shape."""
    return sum(-(-math.prod(s) // ALIGN) * ALIGN for s in shapes)


def _arena_dir(nbytes: int) -> str:
    """Where an arena's file goes: /dev/shm (memory) when it has room, else the temporary directory, whose file the
    page cache keeps in memory just the same (containers often give /dev/shm only 64 MB)."""
    for folder in ("/dev/shm", tempfile.gettempdir()):
        if os.path.isdir(folder) and shutil.disk_usage(folder).free > nbytes:
            return folder
    raise HackError(f"the cachegen coder pool needs {nbytes / 1e6:.0f} MB for a request's symbols and neither /dev/shm "
                    f"nor {tempfile.gettempdir()} has room: set quant.coder_workers=1")


class Arena:
    """One memory-mapped file of `nbytes` that the workers map too, handed out as uint8 arrays (`array`; from the start
    again when reused, `acquire`); deleted by `discard` (or when dropped). Arrays must be dropped before `discard`:
    the mapping stays while any view of it lives."""

    def __init__(self, nbytes: int):
        self.size = max(nbytes, 1)
        fd, self.path = tempfile.mkstemp(prefix="hack-cachegen-", dir=_arena_dir(self.size))
        try:
            os.ftruncate(fd, self.size)
            self.mm = mmap.mmap(fd, self.size)
        finally:
            os.close(fd)
        self.addr = np.frombuffer(self.mm, np.uint8).ctypes.data
        self.used = 0
        self.discard = weakref.finalize(self, _unlink, self.path, self.mm)

    def array(self, shape: tuple) -> np.ndarray:
        nbytes = math.prod(shape)
        if self.used + nbytes > self.size:
            raise RuntimeError(f"arena of {self.size} bytes overflows")  # the caller sized it wrong
        out = np.ndarray(shape, np.uint8, buffer=self.mm, offset=self.used)
        self.used += -(-nbytes // ALIGN) * ALIGN
        return out

    def ref(self, x):
        """An array inside the arena -> its `Ref`; anything else (tables, numbers) as it is."""
        if not isinstance(x, np.ndarray):
            return x
        offset = x.__array_interface__["data"][0] - self.addr
        if not 0 <= offset < self.size:
            return x
        return Ref(offset, x.shape, x.strides, x.dtype.str)


def _map(path: str) -> mmap.mmap:
    fd = os.open(path, os.O_RDWR)
    try:
        return mmap.mmap(fd, 0)
    finally:
        os.close(fd)


def _unmap(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:  # a view still lives (an exception's traceback): unmapped when it goes
        pass


def _unlink(path: str, mm: mmap.mmap) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    _unmap(mm)


SPARE_ARENAS = 4
_spare: list[Arena] = []  # arenas of finished requests, kept for the next ones: their pages are already in memory


def acquire(nbytes: int) -> Arena:
    """An arena of at least `nbytes`: the smallest spare one that fits (a fresh block's first touch of each page
    costs ~3x a write, ~0.15 s for a 4K-token 8B prompt's symbols), else a new one."""
    fits = [a for a in _spare if a.size >= nbytes]
    if not fits:
        return Arena(nbytes)
    arena = min(fits, key=lambda a: a.size)
    _spare.remove(arena)
    arena.used = 0
    return arena


def release(arena: Arena) -> None:
    """A finished request's arena (no job still uses it) kept as a spare; beyond SPARE_ARENAS the smallest goes."""
    _spare.append(arena)
    if len(_spare) > SPARE_ARENAS:
        smallest = min(_spare, key=lambda a: a.size)
        _spare.remove(smallest)
        smallest.discard()


def _nested(x, fn: Callable):
    """fn applied to every leaf of nested lists and tuples."""
    if isinstance(x, (list, tuple)):
        return type(x)(_nested(i, fn) for i in x)
    return fn(x)


def _run(path: str, fn: Callable, args: tuple):
    """A job on a worker: fn(*args) with every `Ref` of args mapped to its array in the arena file `path`."""
    mm = _map(path)

    def view(r):
        return np.ndarray(r.shape, r.dtype, buffer=mm, offset=r.offset, strides=r.strides) \
            if isinstance(r, Ref) else r

    try:
        return fn(*_nested(args, view))
    finally:
        _unmap(mm)


# ---------------------------------------------------------------------------------------------- coders
class Deferred:
    """A job of `InProcess`: fn(*args), run when its result is first asked for."""

    def __init__(self, fn: Callable, args: tuple):
        self.fn, self.args = fn, args

    def result(self):
        if self.fn is not None:
            self.value = self.fn(*self.args)
            self.fn = self.args = None
        return self.value


class Coder:
    """Where a request's jobs run (`InProcess`, `Pooled`): `array(shape)` allocates a uint8 array a job may read or
    write, `share(x)` makes an array readable by jobs, `submit(fn, *args)` starts fn(*args) and returns what `gather`
    takes; `close(done)` frees the arrays, which must no longer be referenced (done: every job has finished, so
    their memory may serve the next request; leaving a `with` block closes, done unless by an exception)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, *exc) -> None:
        self.close(done=kind is None)


class InProcess(Coder):
    """Codes in this process, each job when its result is asked for."""

    def array(self, shape: tuple) -> np.ndarray:
        return np.empty(shape, np.uint8)

    def share(self, x: np.ndarray) -> np.ndarray:
        return x

    def submit(self, fn: Callable, *args) -> Deferred:
        return Deferred(fn, args)

    def close(self, done: bool) -> None:
        pass


class Pooled(Coder):
    """Codes on the pool, the request's arrays in one arena of `nbytes` (`arena_bytes` of every array's shape)."""

    def __init__(self, pool: CoderPool, nbytes: int):
        self.pool, self.arena = pool, acquire(nbytes)

    def array(self, shape: tuple) -> np.ndarray:
        return self.arena.array(shape)

    def share(self, x: np.ndarray) -> np.ndarray:
        """A uint8 array copied into the arena."""
        out = self.arena.array(x.shape)
        out[...] = x
        return out

    def submit(self, fn: Callable, *args) -> Future:
        return self.pool.submit(_run, self.arena.path, fn, _nested(args, self.arena.ref))

    def close(self, done: bool) -> None:
        if done:
            release(self.arena)
        else:  # a job may still write into it
            self.arena.discard()


def coder(workers: int, symbols: int, nbytes: int) -> Coder:
    """Where to code a request of `symbols` symbols whose arrays take `nbytes` (`arena_bytes`): on the pool of
    quant.coder_workers=`workers` processes, or in this process (one worker, or less than MIN_POOL_SYMBOLS)."""
    n = resolve(workers)
    if n <= 1 or symbols < MIN_POOL_SYMBOLS:
        return InProcess()
    return Pooled(get_pool(n), nbytes)
