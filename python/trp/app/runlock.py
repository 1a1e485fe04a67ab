"""One `trp train` per run directory: an exclusive flock on DIR/.trp.lock.

The OS drops a flock when its process dies, so a crashed or killed run never leaves the directory locked
(a PID file alone would). The lock is re-entrant within a process: the CLI holds it from before training
to the end of the report while Run.fit takes it again. The file itself stays; only the flock matters.

The lock file is opened without following links (O_NOFOLLOW) and must be a regular file of this user with
one link, holding nothing but a PID: anything else (a link planted in a shared directory, another user's
file, a hard link to some other file) is refused before a byte is written, and a file trp did not create
is never truncated."""
import contextlib
import errno
import os
import stat

try:
    import fcntl
except ImportError:  # not POSIX: no locking
    fcntl = None

LOCK_NAME = ".trp.lock"
PID_BYTES = 32  # a lock file trp wrote holds one PID line, far shorter
_held = {}  # realpath -> [fd, depth]; flock would refuse this process a second descriptor
_FLAGS = os.O_RDWR | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class LockedError(OSError):
    """The run directory is in use by another process (or cannot hold a lock)."""


def _holder(fd):
    try:
        text = os.pread(fd, PID_BYTES, 0).decode(errors="replace").strip()
    except OSError:
        return None
    return text if text.isdigit() else None


def _refuse(path, why):
    return LockedError(f"{path} {why}: trp will not use it as its run lock; remove it if it is yours")


def _open(path):
    """(fd, created) of the lock file, created here if absent; LockedError for anything but a lock file trp
    could have made (checked on the open descriptor: the name cannot be swapped in between)."""
    try:
        mode = os.lstat(path).st_mode
        if not stat.S_ISREG(mode):  # before opening: a device or FIFO is not even opened
            kind = "a symbolic link" if stat.S_ISLNK(mode) else "not a regular file"
            raise _refuse(path, f"is {kind}")
    except FileNotFoundError:
        pass
    created = True
    try:
        fd = os.open(path, _FLAGS | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        created = False
        try:
            fd = os.open(path, _FLAGS)
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise _refuse(path, "is a symbolic link") from None
            raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _refuse(path, "is not a regular file")
        if hasattr(os, "geteuid") and st.st_uid != os.geteuid():
            raise _refuse(path, f"belongs to another user (uid {st.st_uid})")
        if st.st_nlink != 1:
            raise _refuse(path, f"has {st.st_nlink} hard links (another name of the same file)")
        if not created and (st.st_size > PID_BYTES or os.pread(fd, PID_BYTES, 0).strip(b"0123456789\n")):
            raise _refuse(path, "holds other data than a PID")
        os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd, created


def _acquire(directory):
    try:
        os.makedirs(directory, exist_ok=True)
        fd, _ = _open(os.path.join(directory, LOCK_NAME))
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
    try:  # our own lock file (checked by _open), held: the PID is only information for a refused run
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except OSError:
        pass
    return fd


@contextlib.contextmanager
def locked(directory):
    """Holds the run lock of `directory` (created if missing) for the with-block.

    Args:
        directory: the run directory.

    Raises:
        LockedError: at once, when another process holds the lock, when a file is in the way of the
            directory, or when DIR/.trp.lock is not a lock file trp may use (a link, a FIFO, another user's
            file, a hard link, other data).
    """
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
