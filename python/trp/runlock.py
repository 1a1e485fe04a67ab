"""One `trp train` per run directory: an exclusive flock on DIR/.trp.lock.

The OS drops a flock when its process dies, so a crashed or killed run never leaves the directory locked
(a PID file alone would). The lock is re-entrant within a process: the CLI holds it from before training
to the end of the report while Run.fit takes it again. The file itself stays; only the flock matters."""
import contextlib
import os

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_NAME = ".trp.lock"
_held = {}  # realpath -> [fd, depth]; flock would refuse this process a second descriptor


class LockedError(OSError):
    """The run directory is in use by another process (or cannot hold a lock)."""


def _holder(fd):
    try:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def _acquire(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        fd = os.open(os.path.join(directory, LOCK_NAME), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
    except (FileExistsError, NotADirectoryError):
        raise LockedError(f"{directory} is not a directory (a file is in the way)") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        pid = _holder(fd)
        os.close(fd)
        raise LockedError(f"{directory} is in use by another `trp train`" + (f" (pid {pid})" if pid else "")
                          + "; wait for it to end or choose another --out") from None
    except BaseException:
        os.close(fd)
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


@contextlib.contextmanager
def locked(directory):
    """Holds the run lock of `directory` (created if missing) for the with-block; LockedError at once if
    another process holds it."""
    if fcntl is None:
        os.makedirs(directory, exist_ok=True)
        yield
        return
    key = os.path.realpath(directory)
    if key in _held:
        _held[key][1] += 1
    else:
        _held[key] = [_acquire(directory), 1]
    try:
        yield
    finally:
        entry = _held[key]
        entry[1] -= 1
        if entry[1] == 0:
            del _held[key]
            fcntl.flock(entry[0], fcntl.LOCK_UN)  # explicit: forked DataLoader workers share the fd
            os.close(entry[0])


def check_free(directory):
    """LockedError at once when another process holds the lock of an existing `directory` (a fast check
    before any work; the lock taken later is what guards the run)."""
    if fcntl is not None and os.path.isdir(directory):
        with locked(directory):
            pass
