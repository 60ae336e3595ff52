"""A sweep that survives being killed: one run per cell at a time, and every child stopped on SIGTERM, SIGHUP or
SIGINT.

- ``claim_cell``: ``_RUNNING.json`` is a lock, created atomically (``O_EXCL``) with the host, the sweep's pid and
  (once started) its papermill child's pid, each with its start time (a pid reused by another process is not it).
  A cell whose marker belongs to a live process (same host and either pid alive; another host: assumed alive, it
  cannot be checked from here) is not started a second time; a marker
  whose processes are all dead is stale and taken over, with a message.
- ``StopSignals``: while a sweep runs in the main thread, those signals set a stop flag, kill every registered child
  process tree (papermill, its kernel and their children) and raise ``SweepInterrupted`` in the main thread; the
  workers then mark their cells interrupted (``_INTERRUPTED.json``: neither done nor failed) and no new cell starts.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from helpers.experiments.atomic_files import atomic_write_json
from helpers.experiments.sweep_cells import RUNNING, read_marker


class SweepInterrupted(BaseException):
    """The sweep was stopped by a signal (a BaseException, like KeyboardInterrupt: nothing catches it by accident)."""

    def __init__(self, signum: int):
        super().__init__(f"stopped by {signal.Signals(signum).name}")
        self.signum = signum


def _proc_start(pid: int) -> str | None:
    """Linux: ``"<boot id>:<start ticks>"`` of ``pid`` from /proc: exact, and unmoved by clock changes (psutil's
    create_time adds the boot time, which it derives from the wall clock: a clock step shifts it)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = stat[stat.rindex(")") + 2:].split()[19]  # field 22, counted after the command name
    except (OSError, ValueError, IndexError):
        return None
    return f"{boot}:{ticks}"


def process_started(pid: int) -> str | float | None:
    """When process ``pid`` started: ``"<boot id>:<ticks>"`` on Linux, else seconds since the epoch (psutil), or
    None where neither can be read."""
    exact = _proc_start(pid)
    if exact is not None:
        return exact
    try:
        import psutil

        return psutil.Process(pid).create_time()
    except Exception:
        return None


def _same_start(pid: int, started) -> bool:
    if isinstance(started, str):  # recorded from /proc: compare exactly (unreadable now: assume the same)
        now = _proc_start(pid)
        return now is None or now == started
    try:
        import psutil

        return abs(psutil.Process(pid).create_time() - float(started)) < 1.0
    except Exception:
        return True


def pid_alive(pid, started: str | float | None = None) -> bool:
    """Is process ``pid`` running (a zombie is not)? ``started``: when the process meant started (recorded with its
    pid, ``process_started``), so that another process that got the same pid since (after a reboot, in a new
    container) is not it."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        pass
    try:
        import psutil

        if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
            return False
    except Exception:
        pass
    return started is None or _same_start(pid, started)


_HELD: set[str] = set()  # the cell folders this process is running now (its own markers are live only for those)
_HELD_LOCK = threading.Lock()


def marker_is_live(marker: dict | None, cell_dir: Path | None = None) -> bool:
    """Does a ``_RUNNING.json`` (of ``cell_dir``) belong to a process that may still be running? This process's own
    marker is live while it runs that cell (a marker left by an earlier, interrupted call is not)."""
    if not marker:
        return False
    if marker.get("host") not in (None, socket.gethostname()):
        return True  # another machine's run: cannot be checked from here
    if marker.get("pid") == os.getpid():
        with _HELD_LOCK:
            held = cell_dir is not None and str(cell_dir.resolve()) in _HELD
        return held or pid_alive(marker.get("child_pid"), marker.get("child_started"))
    return (pid_alive(marker.get("pid"), marker.get("pid_started"))
            or pid_alive(marker.get("child_pid"), marker.get("child_started")))


@contextmanager
def _claim_lock(cell_dir: Path):
    """An exclusive ``flock`` on ``cell_dir/.claim.lock`` around read-check-take-over, so that two sweeps on one
    machine never both take over the same stale marker (where flock is unavailable: no lock)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(cell_dir / ".claim.lock", "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def claim_cell(cell_dir: Path, record: dict, log: Callable[[str], None] = print, force: bool = False) -> str | None:
    """Create ``cell_dir/_RUNNING.json`` for this process, atomically (written aside, then hard-linked into place:
    no reader ever sees it half written). Returns None when claimed, else why not (the cell is running in a live
    process). A stale marker (its processes dead) is taken over, with a message; ``force`` also takes over another
    machine's marker, which cannot be checked from here (a crashed node's would otherwise hold the cell forever)."""
    path = cell_dir / RUNNING
    data = {**record, "status": "running", "host": socket.gethostname(), "pid": os.getpid(),
            "pid_started": process_started(os.getpid())}
    tmp = cell_dir / f".{RUNNING}.{os.getpid()}.{threading.get_ident()}.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    try:
        with _claim_lock(cell_dir):
            try:
                os.link(tmp, path)
            except FileExistsError:
                marker = read_marker(path)
                other_host = (marker or {}).get("host") not in (None, socket.gethostname())
                if marker_is_live(marker, cell_dir) and not (force and other_host):
                    where = f"pid {marker.get('pid')} on {marker.get('host')}"
                    hint = " (--force takes it over if that machine's run is gone)" if other_host else ""
                    return f"already running ({where}; _RUNNING.json): not started a second time{hint}"
                log(f"taking over {path}: its run (pid {(marker or {}).get('pid')} on "
                    f"{(marker or {}).get('host')}) is gone")
                path.unlink(missing_ok=True)
                os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    with _HELD_LOCK:
        _HELD.add(str(cell_dir.resolve()))
    return None


def release_cell(cell_dir: Path) -> None:
    """This process no longer runs ``cell_dir`` (its marker, if still there, is stale from now on)."""
    with _HELD_LOCK:
        _HELD.discard(str(cell_dir.resolve()))


def note_child(cell_dir: Path, pid: int) -> None:
    """Add the papermill child's pid to this process's ``_RUNNING.json`` (an orphan of a killed sweep stays live)."""
    path = cell_dir / RUNNING
    marker = read_marker(path)
    if marker is not None and marker.get("pid") == os.getpid():
        atomic_write_json(path, {**marker, "child_pid": pid, "child_started": process_started(pid)})


def kill_tree(proc: subprocess.Popen) -> None:
    """Stop papermill, its kernel (own session) and their children."""
    procs = []
    try:
        import psutil

        procs = psutil.Process(proc.pid).children(recursive=True)
    except Exception:
        pass
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (OSError, AttributeError):
        proc.kill()
    for p in procs:
        try:
            p.kill()
        except Exception:
            pass
    proc.wait()


class StopSignals:
    """The stop flag, the live children, and (in the main thread) the handlers of SIGTERM, SIGHUP and SIGINT."""

    SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))

    def __init__(self):
        self.stop = threading.Event()
        self.signum: int | None = None
        self._children: set = set()
        self._lock = threading.Lock()
        self._previous: dict = {}
        # raise SweepInterrupted from the handler (the local executor), or only set the flag for a caller that polls
        # it (the Ray executor: an exception raised inside Ray's wait comes out as a SystemError)
        self.raise_in_handler = True

    def add(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children.add(proc)
        if self.stop.is_set():  # started while stopping: stop it too
            kill_tree(proc)

    def discard(self, proc: subprocess.Popen) -> None:
        with self._lock:
            self._children.discard(proc)

    def kill_children(self) -> None:
        with self._lock:
            children = list(self._children)
        for proc in children:
            try:
                kill_tree(proc)
            except Exception:
                pass

    def _handle(self, signum, frame):
        first = not self.stop.is_set()
        self.stop.set()
        self.signum = signum
        self.kill_children()
        if first and self.raise_in_handler:
            raise SweepInterrupted(signum)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def reinstall(self) -> None:
        """Take the signals back after a library installed its own handlers (ray.init does, for SIGTERM)."""
        if self._previous and threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                signal.signal(s, self._handle)

    def __exit__(self, *exc):
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous.clear()
        return False
