"""The run lock (nnunet_transfer.study.lock) with real processes: a live holder is respected and named, a
holder killed with SIGKILL is taken over, a record of another host is respected until its job ends or its
heartbeat stops, and of many processes racing for one run exactly one gets it."""
from __future__ import annotations

import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import nnunet_transfer.study.lock as lockmod
from nnunet_transfer.study.lock import RECORD_FILE, Holder, RunLock, lock_holder, process_start

HOLD = """
import sys, time
from pathlib import Path
from nnunet_transfer.study.lock import RunLock
folder, start, seconds = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
while time.time() < start:
    time.sleep(0.001)
lock = RunLock(folder)
ok = lock.acquire()
print("acquired" if ok else "held", flush=True)
if ok:
    time.sleep(seconds)
    lock.release()
"""


def holder_process(folder: Path, *, start: float = 0.0, seconds: float = 60.0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", HOLD, str(folder), str(start), str(seconds)],
                            stdout=subprocess.PIPE, text=True)


def wait_until_held(proc: subprocess.Popen) -> None:
    assert proc.stdout.readline().strip() == "acquired"


def write_record(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    content = {"pid": 4242, "host": "node-elsewhere", "acquired": time.time(), "job_id": None, "cluster": None,
               "token": "theirs", **fields}
    path = folder / RECORD_FILE
    path.write_text(json.dumps(content))
    return path


def test_acquire_release_and_a_second_holder_in_the_same_process(tmp_path):
    a, b = RunLock(tmp_path / "run"), RunLock(tmp_path / "run")
    assert a.acquire()
    record = json.loads((tmp_path / "run" / RECORD_FILE).read_text())
    assert (record["pid"], record["host"]) == (os.getpid(), socket.gethostname())
    assert record["proc_start"] == process_start(os.getpid()) is not None
    assert not b.acquire(wait=0.1)  # flock is per open file: a second lock in this process is refused
    assert (b.holder.pid, b.holder.host) == (os.getpid(), socket.gethostname())
    assert lock_holder(tmp_path / "run").pid == os.getpid()
    a.release()
    assert not (tmp_path / "run" / RECORD_FILE).exists() and lock_holder(tmp_path / "run") is None
    assert b.acquire() and b.took_over is None
    b.release()


def test_a_live_holder_in_another_process_is_named(tmp_path):
    proc = holder_process(tmp_path / "run")
    try:
        wait_until_held(proc)
        lock = RunLock(tmp_path / "run")
        t0 = time.monotonic()
        assert not lock.acquire()
        assert time.monotonic() - t0 < 1.0  # a live record: no waiting
        assert lock.holder.pid == proc.pid and lock.holder.here
        text = lock.holder.describe()
        assert text.startswith(f"pid {proc.pid} on host {socket.gethostname()} since ")
        assert lock_holder(tmp_path / "run").pid == proc.pid
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("reap", [False, True])
def test_a_holder_killed_with_sigkill_is_taken_over(tmp_path, reap):
    """Unreaped, the killed holder is a zombie whose pid still answers kill(0); its flock is gone either way."""
    proc = holder_process(tmp_path / "run")
    wait_until_held(proc)
    os.kill(proc.pid, signal.SIGKILL)
    if reap:
        proc.wait()
    else:
        # the leader turns zombie before the process's other threads (the holder's heartbeat) have exited,
        # and the open files -- the flock -- go with the last of them: wait for the whole thread group
        while lockmod._read(f"/proc/{proc.pid}/stat").split(") ")[1][0] != "Z" \
                or len(os.listdir(f"/proc/{proc.pid}/task")) > 1:
            time.sleep(0.01)
    try:
        assert lock_holder(tmp_path / "run") is None
        lock = RunLock(tmp_path / "run")
        assert lock.acquire()
        old, why = lock.took_over
        assert old.pid == proc.pid
        assert why in ("its process is gone", "its process no longer holds the lock")
        assert json.loads((tmp_path / "run" / RECORD_FILE).read_text())["pid"] == os.getpid()
        lock.release()
    finally:
        proc.wait()


def test_a_record_of_this_host_whose_pid_was_reused_is_stale(tmp_path):
    # our own pid, alive, but "started" at another time: the record's process is gone, the pid is reused
    write_record(tmp_path / "run", pid=os.getpid(), host=socket.gethostname(), proc_start="1", token="old")
    (tmp_path / "run" / ".lock").unlink(missing_ok=True)
    assert lock_holder(tmp_path / "run") is None
    lock = RunLock(tmp_path / "run")
    assert lock.acquire()
    assert lock.took_over[0].token == "old" and lock.took_over[1] == "its pid now belongs to another process"
    lock.release()


def test_without_flock_a_dead_pid_of_this_host_is_stale_and_a_live_one_is_not(tmp_path):
    """What is left where the file system refuses flock: the record alone."""
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        here = socket.gethostname()
        assert Holder(pid=dead.pid, host=here).stale(flock_free=None) == "its process is gone"
        live = Holder(pid=alive.pid, host=here, proc_start=process_start(alive.pid))
        assert live.stale(flock_free=None) is None
        assert live.stale(flock_free=True) == "its process no longer holds the lock"
    finally:
        alive.kill()
        alive.wait()


def test_another_hosts_record_is_respected_until_its_heartbeat_stops(tmp_path):
    record = write_record(tmp_path / "run", acquired=time.time() - 3600)
    lock = RunLock(tmp_path / "run")
    assert not lock.acquire()
    assert lock.holder.host == "node-elsewhere" and lock.holder.describe().startswith("pid 4242 on host node-elsewhere")
    assert lock_holder(tmp_path / "run").host == "node-elsewhere"
    assert json.loads(record.read_text())["token"] == "theirs"  # untouched
    old = time.time() - lockmod.STALE_AFTER_S - 120
    os.utime(record, (old, old))
    assert lock_holder(tmp_path / "run") is None
    assert lock.acquire()
    assert lock.took_over[1] == f"no heartbeat for {(lockmod.STALE_AFTER_S + 120) / 60:.0f} min"
    lock.release()


def test_another_hosts_record_follows_its_slurm_job(tmp_path):
    record = write_record(tmp_path / "run", job_id="777_3", cluster="slurm")
    asked = []

    def job_alive(state):
        asked.append(state)
        return state["job_id"] != "777_3"

    lock = RunLock(tmp_path / "run")
    assert lock.acquire(job_alive=job_alive)  # job 777_3 has ended: its fresh heartbeat does not matter
    assert asked == [{"job_id": "777_3", "cluster": "slurm"}] and lock.took_over[1] == "its job 777_3 has ended"
    lock.release()
    # a job known alive keeps its run though its heartbeat stopped (a suspended job)
    record = write_record(tmp_path / "run", job_id="778", cluster="slurm")
    old = time.time() - lockmod.STALE_AFTER_S - 120
    os.utime(record, (old, old))
    assert not lock.acquire(job_alive=lambda state: True)
    assert lock.holder.describe().endswith("(job 778)")
    assert lock.acquire(job_alive=lambda state: None)  # job unknown (no sacct here): the old heartbeat decides
    assert lock.took_over[1].startswith("no heartbeat for ")
    lock.release()


def test_a_flock_held_without_record_is_busy_and_a_shared_probe_is_waited_out(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    fd = os.open(folder / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a holder that has not written its record (yet)
    lock = RunLock(folder)
    assert not lock.acquire(wait=0.2) and lock.holder.pid is None
    fcntl.flock(fd, fcntl.LOCK_UN)
    # `study status` probing (a shared flock for an instant) never makes a starting run look busy
    fcntl.flock(fd, fcntl.LOCK_SH)
    threading.Timer(0.3, lambda: fcntl.flock(fd, fcntl.LOCK_UN)).start()
    assert lock.acquire()
    lock.release()
    os.close(fd)


def test_the_heartbeat_touches_only_its_own_record(tmp_path, monkeypatch):
    monkeypatch.setattr(lockmod, "HEARTBEAT_S", 0.05)
    lock = RunLock(tmp_path / "run")
    assert lock.acquire()
    record = tmp_path / "run" / RECORD_FILE
    os.utime(record, (1000.0, 1000.0))
    deadline = time.monotonic() + 10
    while record.stat().st_mtime == 1000.0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert record.stat().st_mtime > time.time() - 60
    # another host took the run over (we looked dead): its record is neither touched nor removed by us
    write_record(tmp_path / "run", token="new-holder")
    beats = [t for t in threading.enumerate() if t.name == "heartbeat run"]
    assert len(beats) == 1
    beats[0].join(timeout=30)  # it sees the other token and stops
    assert not beats[0].is_alive() and not lock.owns()
    os.utime(record, (2000.0, 2000.0))
    lock.release()
    assert json.loads(record.read_text())["token"] == "new-holder"


def test_of_many_processes_racing_for_one_run_exactly_one_gets_it(tmp_path):
    # a stale record of a killed holder on this host, to take over: the race includes the takeover
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    write_record(tmp_path / "run", pid=dead.pid, host=socket.gethostname(), token="dead")
    start = time.time() + 2.0  # all of them import first, then start together
    procs = [holder_process(tmp_path / "run", start=start, seconds=5.0) for _ in range(6)]
    outs = [p.communicate(timeout=60)[0].strip() for p in procs]
    assert sorted(outs) == ["acquired"] + ["held"] * 5, outs
    assert not (tmp_path / "run" / RECORD_FILE).exists()
    assert not list((tmp_path / "run").glob(RECORD_FILE + ".*"))  # no temporary or set-aside record left


def test_a_program_started_by_run_step_dies_with_a_killed_parent(tmp_path):
    """The lock's flock goes with a killed `study run`; its nnUNetv2_train must go too (pipeline.run_step)."""
    child = f"import os, time; open({str(tmp_path / 'pid')!r}, 'w').write(str(os.getpid())); time.sleep(120)"
    parent = ("import os, sys; from nnunet_transfer.pipeline import run_step; "
              f"run_step(['python', '-c', {child!r}], env=dict(os.environ), log={str(tmp_path / 'log')!r}, what='x')")
    proc = subprocess.Popen([sys.executable, "-c", parent])
    try:
        deadline = time.monotonic() + 60
        while not (tmp_path / "pid").is_file() or not (tmp_path / "pid").read_text():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.01)
        pid = int((tmp_path / "pid").read_text())
        assert lockmod.process_alive(pid)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.monotonic() + 30
        while lockmod.process_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not lockmod.process_alive(pid)
    finally:
        proc.kill()
        proc.wait()
