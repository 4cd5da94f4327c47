"""Who executes a run: one process at a time, on any host, and a dead holder is noticed and replaced.

A run's folder holds two files:

* ``.lock`` — ``flock``-ed (exclusive, never waiting) by the process executing the run. The kernel releases
  it when that process dies, however it dies (``kill -9`` included), so on one host a free ``flock`` is
  exact proof that the holder is gone. Across hosts it is only as good as the file system: NFS forwards it
  to the server (Linux ≥ 2.6.12), but Lustre's ``localflock``, NFS mounted ``nolock`` / ``local_lock=flock``
  and others keep it per node, and some refuse it (``ENOLCK``) — then only the record below counts;
* ``.lock.json`` — the holder's record ``{pid, host, boot_id, proc_start, acquired, job_id, cluster, token}``,
  put in place with ``link(2)``, which fails when the name exists (atomic also on NFS, unlike ``O_EXCL`` on
  old NFS). The holder touches it every :data:`HEARTBEAT_S` seconds while it works.

A record is **stale** — and the next process takes the run over, saying whose lock it took — when

* its host is this one and the ``flock`` is free, its process is gone, is a zombie, is another process
  under a reused pid (start time from ``/proc/<pid>/stat`` differs) or the host rebooted (boot id);
* its host is another one and its SLURM job has ended (``job_alive``), or, with no job known alive, the
  record was not touched for :data:`STALE_AFTER_S` seconds.

Otherwise the run is **held**: ``acquire`` returns False and :attr:`RunLock.holder` says by whom.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

LOCK_FILE, RECORD_FILE = ".lock", ".lock.json"
HEARTBEAT_S = 60.0
STALE_AFTER_S = 15 * 60.0  # 15 missed heartbeats: far beyond a busy node's hiccup or moderate clock skew
WAIT_S = 2.0  # how long acquire retries a flock held without a live record (a status probe, a claim under way)

JobAlive = Callable[[dict], "bool | None"]


# --------------------------------------------------------------------------- this process
def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def boot_id() -> str | None:
    text = _read("/proc/sys/kernel/random/boot_id")
    return text.strip() if text else None


def process_start(pid: int) -> str | None:
    """Start time of process PID in clock ticks since boot (``/proc/<pid>/stat`` field 22); None where unknown."""
    text = _read(f"/proc/{pid}/stat")
    if not text:
        return None
    fields = text[text.rfind(")") + 2:].split()  # the command name may hold spaces and parentheses
    return fields[19] if len(fields) > 19 else None


def process_alive(pid: int) -> bool:
    """PID exists and is not a zombie (a killed child its parent has not reaped yet is no holder)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    text = _read(f"/proc/{pid}/stat")
    return not (text and text[text.rfind(")") + 2:][:1] in ("Z", "X"))


def current_job(job_id: str | None = None) -> tuple[str | None, str | None]:
    """(job id, cluster) of this process: the caller's (submitit's) id, else SLURM's environment."""
    env = os.environ
    slurm = (f"{env['SLURM_ARRAY_JOB_ID']}_{env['SLURM_ARRAY_TASK_ID']}" if env.get("SLURM_ARRAY_JOB_ID")
             and env.get("SLURM_ARRAY_TASK_ID") else env.get("SLURM_JOB_ID"))
    if job_id:
        return str(job_id), "slurm" if slurm else "local"
    return (slurm, "slurm") if slurm else (None, None)


# --------------------------------------------------------------------------- holders
@dataclass(frozen=True)
class Holder:
    """Who holds a run (a record's content, and when it was last touched)."""

    pid: int | None
    host: str | None
    acquired: float | None = None
    job_id: str | None = None
    cluster: str | None = None
    boot_id: str | None = None
    proc_start: str | None = None
    token: str | None = None
    heartbeat: float | None = None  # the record's mtime

    @classmethod
    def read(cls, path: Path) -> "Holder | None":
        try:
            text, mtime = path.read_text(), path.stat().st_mtime
            d = json.loads(text)
        except (OSError, ValueError):  # none, vanished between the calls, or not ours
            return None
        return cls(pid=d.get("pid"), host=d.get("host"), acquired=d.get("acquired"), job_id=d.get("job_id"),
                   cluster=d.get("cluster"), boot_id=d.get("boot_id"), proc_start=d.get("proc_start"),
                   token=d.get("token"), heartbeat=mtime)

    def describe(self) -> str:
        if self.pid is None:
            return "another process on this host (no record of it yet)"
        since = ""
        if self.acquired:
            t = time.localtime(self.acquired)
            since = time.strftime(" since %H:%M" if t[:3] == time.localtime()[:3] else " since %Y-%m-%d %H:%M", t)
        job = f" (job {self.job_id})" if self.job_id else ""
        return f"pid {self.pid} on host {self.host}{since}{job}"

    @property
    def here(self) -> bool:
        return self.host == socket.gethostname()

    def stale(self, *, flock_free: bool | None, job_alive: JobAlive | None = None,
              now: float | None = None) -> str | None:
        """Why this holder is gone (module docstring), or None while it may be alive. ``flock_free``: True when
        this host could take the ``flock`` (None: the file system has none)."""
        if self.pid is None:
            return None
        if self.here:
            if self.boot_id and boot_id() and self.boot_id != boot_id():
                return "the host rebooted since"
            if not process_alive(int(self.pid)):
                return "its process is gone"
            start = process_start(int(self.pid))
            if self.proc_start and start and start != self.proc_start:
                return "its pid now belongs to another process"
            if flock_free:
                return "its process no longer holds the lock"
            return None
        alive = job_alive({"job_id": self.job_id, "cluster": self.cluster}) if job_alive and self.job_id else None
        if alive is False:
            return f"its job {self.job_id} has ended"
        if alive is None and self.heartbeat is not None:
            age = (time.time() if now is None else now) - self.heartbeat
            if age > STALE_AFTER_S:
                return f"no heartbeat for {age / 60:.0f} min"
        return None


def _flock(fd: int, mode: int) -> bool | None:
    """True: taken; False: another open file holds it; None: the file system has no flock."""
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # ENOLCK, EOPNOTSUPP, ENOSYS: locks are not supported here
        return None


def lock_holder(folder: Path, *, job_alive: JobAlive | None = None) -> Holder | None:
    """Who holds the run in FOLDER now (None: nobody alive). Reads; takes nothing but a shared ``flock`` for
    an instant, which never blocks another reader (a writer's :meth:`RunLock.acquire` retries past it)."""
    path, record = folder / LOCK_FILE, folder / RECORD_FILE
    holder = Holder.read(record)
    if not path.exists():
        return holder if holder and holder.stale(flock_free=None, job_alive=job_alive) is None else None
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        free = _flock(fd, fcntl.LOCK_SH)
    finally:
        os.close(fd)  # closing releases the shared flock
    if free is False:
        return Holder.read(record) or Holder(pid=None, host=socket.gethostname())
    if holder is None or holder.stale(flock_free=free, job_alive=job_alive) is not None:
        return None
    return holder


# --------------------------------------------------------------------------- the lock
class RunLock:
    """The run's lock (module docstring). ``acquire()`` never waits for a live holder; after it returns False,
    :attr:`holder` says who holds the run; after it returns True, :attr:`took_over` says whose stale lock it
    replaced (``(holder, reason)``) if any."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path, self.record = self.folder / LOCK_FILE, self.folder / RECORD_FILE
        self.fd: int | None = None
        self.token: str | None = None
        self.holder: Holder | None = None
        self.took_over: tuple[Holder, str] | None = None
        self._stop: threading.Event | None = None

    def acquire(self, *, job_id: str | None = None, job_alive: JobAlive | None = None, wait: float = WAIT_S) -> bool:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.holder = self.took_over = None
        deadline = time.monotonic() + wait
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            got = _flock(fd, fcntl.LOCK_EX)
            if got is not False:
                break
            os.close(fd)
            holder = Holder.read(self.record)
            if (holder is not None and holder.stale(flock_free=False, job_alive=job_alive) is None) \
                    or time.monotonic() > deadline:
                self.holder = holder or Holder(pid=None, host=socket.gethostname())
                return False
            time.sleep(0.05)
        self.fd = fd
        if self._claim(job_id, job_alive, flock_free=got):
            self._start_heartbeat()
            return True
        self._unlock()
        return False

    def _claim(self, job_id: str | None, job_alive: JobAlive | None, *, flock_free: bool | None) -> bool:
        job, cluster = current_job(job_id)
        self.token = uuid.uuid4().hex
        content = {"pid": os.getpid(), "host": socket.gethostname(), "boot_id": boot_id(),
                   "proc_start": process_start(os.getpid()), "acquired": time.time(), "job_id": job,
                   "cluster": cluster, "token": self.token}
        tmp = self.folder / f"{RECORD_FILE}.{self.token}"
        tmp.write_text(json.dumps(content, indent=2))
        try:
            for _ in range(5):
                try:
                    os.link(tmp, self.record)  # fails if a record exists: the claim is atomic
                    return True
                except FileExistsError:
                    pass
                holder = Holder.read(self.record)
                if holder is None:
                    if self.record.exists() and time.time() - self.record.stat().st_mtime < WAIT_S:
                        time.sleep(0.05)  # not yet readable (another writer, or a foreign file): look again
                    elif self.record.exists():
                        self._set_aside(None)  # unreadable for seconds: not a holder's record
                    continue
                reason = holder.stale(flock_free=flock_free, job_alive=job_alive)
                if reason is None:
                    self.holder = holder
                    return False
                if self._set_aside(holder):
                    self.took_over = (holder, reason)
            self.holder = Holder.read(self.record) or Holder(pid=None, host=socket.gethostname())
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _set_aside(self, stale: Holder | None) -> bool:
        """Move the stale record away; if a rival replaced it meanwhile, put the rival's back (link: only
        where the name is still free) and report failure."""
        aside = self.folder / f"{RECORD_FILE}.stale.{uuid.uuid4().hex}"
        try:
            os.rename(self.record, aside)
        except FileNotFoundError:
            return False
        moved = Holder.read(aside)
        if stale is not None and (moved is None or moved.token != stale.token):
            try:
                os.link(aside, self.record)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return True

    def _start_heartbeat(self) -> None:
        stop = self._stop = threading.Event()
        record, token = self.record, self.token

        def beat():
            while not stop.wait(HEARTBEAT_S):
                holder = Holder.read(record)
                if holder is None or holder.token != token:
                    return  # taken over (we looked dead to another host): never touch the new holder's record
                try:
                    os.utime(record)
                except OSError:
                    return

        threading.Thread(target=beat, name=f"heartbeat {self.folder.name}", daemon=True).start()

    def owns(self) -> bool:
        """Our record is still in place (another host did not take the run over)."""
        holder = Holder.read(self.record)
        return self.token is not None and holder is not None and holder.token == self.token

    def release(self) -> None:
        if self._stop is not None:
            self._stop.set()
            self._stop = None
        if self.token is not None and self.fd is not None:
            if self.owns():
                self.record.unlink(missing_ok=True)  # the record first: while we hold the flock, no one claims
            self.token = None
        self._unlock()

    def _unlock(self) -> None:
        if self.fd is not None:
            _flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def is_locked(folder: Path, *, job_alive: JobAlive | None = None) -> bool:
    return lock_holder(folder, job_alive=job_alive) is not None


__all__ = ["RunLock", "Holder", "lock_holder", "is_locked", "process_alive", "process_start", "current_job",
           "LOCK_FILE", "RECORD_FILE", "HEARTBEAT_S", "STALE_AFTER_S"]
