"""Which deployment made a resource (a file, batch, vector store...) and which consumer owns it, shared by the
workers of one gateway (issue 15: stateful resources stay coherent, and one consumer never reaches another's).

A file, batch or vector store exists only at the deployment that created it, so every later request naming its
id must go there; and through the gateway it belongs to the consumer that created it. The map is a table of
fixed slots in a shared memory file in the run directory (as the circuit breakers are), made by the first worker
and mapped by the others; it survives a worker's restart, not the gateway's.

A slot: the id's 64-bit xxhash (0 = free), the owner's (consumer name's) xxhash, the deployment's seed (its
identity, stable across workers and reloads: fastgw.routing.router.Deployment.seed), the time it was recorded,
and a check word over the four. An id is looked for in a window of PROBE slots from its hash; a new one takes a
free slot there, else the oldest (so the table holds the most recent ids when it is full). Writers take an
exclusive lock on the file (a few µs; resources are created rarely); readers take none and trust a slot only
if its check word matches, retrying under the lock when it does not (a write was under way).

Plain Python: it runs only for the pass-through endpoints that name or create a resource, never on chat.
"""
from __future__ import annotations

import fcntl
import mmap
import os
import struct
import time

import xxhash

_SLOT = struct.Struct("<QQQQQ")        # id hash, owner hash, deployment seed, recorded at (ns), check
_MAGIC = 0x9E3779B97F4A7C15
_MASK = (1 << 64) - 1
PROBE = 16

# Id prefixes of OpenAI's stateful resources: a path segment or body field value starting with one is a resource
# id, checked against the map (other segments, such as "file_batches" or "content", are not ids).
ID_PREFIXES = ("file-", "batch_", "vs_", "vsfb_", "ftjob-", "ftckpt-", "ftevent-", "upload_", "resp_", "asst_",
               "thread_", "run_", "msg_", "step_", "cntr_", "cfile_", "eval_", "evalrun_", "conv_", "chatcmpl-",
               "ft:")
# Request body fields that name a resource (a string, or a list of them).
ID_FIELDS = ("input_file_id", "file_id", "file_ids", "training_file", "validation_file", "previous_response_id",
             "vector_store_id", "vector_store_ids", "assistant_id", "thread_id", "conversation")
# Files a batch or a fine-tuning job produced, named in its answers: they belong to whoever owns the job.
PRODUCED_FIELDS = ("output_file_id", "error_file_id", "result_files")
PRODUCERS = frozenset(("batch", "fine_tuning.job"))


def is_resource_id(value) -> bool:
    return isinstance(value, str) and 4 < len(value) <= 256 and value.startswith(ID_PREFIXES)


def _hash(text: str) -> int:
    return xxhash.xxh3_64_intdigest(text.encode("utf-8", "surrogatepass")) or 1   # never 0: 0 marks a free slot


def owner_key(consumer: str) -> int:
    """The owner word of a consumer ("" = anonymous: requests without key-auth)."""
    return _hash("consumer:" + consumer)


def _check(idh: int, owner: int, seed: int, at: int) -> int:
    return (idh ^ (owner * 3) ^ (seed * 5) ^ (at * 7) ^ _MAGIC) & _MASK


class ResourceMap:
    """ResourceMap(path, slots): the table at `path`, created with `slots` slots if it does not exist."""

    def __init__(self, path: str, slots: int):
        self.path = path
        self.slots = slots
        size = slots * _SLOT.size
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            if os.fstat(fd).st_size != size:
                fcntl.flock(fd, fcntl.LOCK_EX)
                try:
                    if os.fstat(fd).st_size != size:     # first, or another slot count: start empty
                        os.ftruncate(fd, 0)
                        os.ftruncate(fd, size)
                finally:
                    fcntl.flock(fd, fcntl.LOCK_UN)
            self._mem = mmap.mmap(fd, size)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd

    def close(self) -> None:
        self._mem.close()
        os.close(self._fd)

    def _read(self, i: int):
        idh, owner, seed, at, check = _SLOT.unpack_from(self._mem, i * _SLOT.size)
        return idh, owner, seed, at, check == _check(idh, owner, seed, at)

    def lookup(self, resource_id: str):
        """(owner word, deployment seed) recorded for `resource_id`, or None."""
        idh = _hash(resource_id)
        start = idh % self.slots
        for attempt in range(2):
            torn = False
            for k in range(PROBE):
                slot_idh, owner, seed, _, ok = self._read((start + k) % self.slots)
                if not ok:
                    torn = torn or slot_idh != 0
                    continue
                if slot_idh == idh:
                    return owner, seed
            if not torn:
                return None
            with self._locked():                     # a write was under way: read again once it is done
                pass
        return None

    def record(self, resource_id: str, owner: int, seed: int) -> None:
        idh = _hash(resource_id)
        start = idh % self.slots
        with self._locked():
            target, oldest = None, None
            for k in range(PROBE):
                i = (start + k) % self.slots
                slot_idh, _, _, at, ok = self._read(i)
                if ok and slot_idh == idh:
                    target = i
                    break
                if slot_idh == 0 or not ok:
                    if target is None:
                        target = i
                elif oldest is None or at < oldest[1]:
                    oldest = (i, at)
            if target is None:
                target = oldest[0]
            at = time.time_ns()
            _SLOT.pack_into(self._mem, target * _SLOT.size, idh, owner, seed, at, _check(idh, owner, seed, at))

    def forget(self, resource_id: str) -> None:
        idh = _hash(resource_id)
        start = idh % self.slots
        with self._locked():
            for k in range(PROBE):
                i = (start + k) % self.slots
                if self._read(i)[0] == idh:
                    _SLOT.pack_into(self._mem, i * _SLOT.size, 0, 0, 0, 0, 0)

    def _locked(self):
        return _FileLock(self._fd)


class _FileLock:
    __slots__ = ("fd",)

    def __init__(self, fd):
        self.fd = fd

    def __enter__(self):
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)


_MAPS: dict = {}


def map_for(run_dir: str, slots: int) -> ResourceMap:
    """This process's mapping of the gateway's resource table (one per run_dir and pid: mapped again after a
    fork, since a flock is per open file description)."""
    key = (run_dir, slots, os.getpid())
    m = _MAPS.get(key)
    if m is None:
        m = _MAPS[key] = ResourceMap(os.path.join(run_dir, f"fastgw-resources-{slots}.shm"), slots)
    return m
