# Over 300 lines: every file trp writes goes through these primitives; their safety rules belong together.
"""Files on disk: atomic writes with the mode the umask gives, cleanup of the temporaries that interrupted
writes leave behind, and safe reading (torch.load(weights_only=True): no pickled code runs) with errors
that say what is wrong with a file.

An atomic write goes to a hidden temporary `.NAME.PID.XXXXXXXX.tmp` beside the target (created with
O_EXCL, so never through a link someone planted), is fsynced and os.replace()d onto it: a crash leaves the
previous file or the new one, never a mix - at worst a temporary whose PID tells a later start whether its
writer is still alive. The target must be absent or a regular file: trp never writes through a symbolic
link and never truncates a file in place. A write that fails (disk full, I/O error, file-size limit, an
interrupt) removes its temporary and says which file it could not write; reads accept regular files only,
so a FIFO or a device is refused instead of blocking."""
import errno
import os
import pickle
import re
import stat
import tempfile
import time

import torch

# temporaries of an older trp carry no PID: they count as stale once no write could still be running
LEGACY_STALE_S = 3600
# what follows ".TARGET" in a temporary's name (mkstemp adds 8 of [a-z0-9_])
_TEMP_TAIL = re.compile(r"\.(?:(?P<pid>\d+)\.)?[a-z0-9_]{8}\.tmp")
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
# what a failed write says, by errno (else the OS's own words)
_CAUSES = {errno.ENOSPC: "disk full", errno.EDQUOT: "disk quota exceeded",
           errno.EFBIG: "file too large for the file-size limit (ulimit -f)", errno.EIO: "input/output error",
           errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
           errno.EPERM: "operation not permitted"}


class UnreadableFile(ValueError):
    """A file that torch cannot load safely: corrupted, truncated, foreign, or holding pickled objects."""


class NotRegularFile(OSError):
    """A path where trp expects a regular file holds something else (a symbolic link to write through, a
    FIFO, a device, a socket)."""


class WriteError(OSError):
    """A file could not be written (disk full, I/O error, file-size limit...); the message names the file.
    Its errno is the OS's."""

    def __init__(self, path, cause):
        reason = _CAUSES.get(cause.errno) or cause.strerror or str(cause) or type(cause).__name__
        self.message = f"cannot write {path}: {reason}"
        super().__init__(self.message)
        self.errno, self.filename = cause.errno, path

    def __str__(self):  # the message, not OSError's "[Errno N] strerror: filename"
        return self.message


def _kind(mode):
    for test, name in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


def _umask():
    """The process umask, read without changing it where Linux allows (os.umask is process-wide)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def check_output_file(path):
    """Checks, before any work, that trp may write `path`: absent or a regular file.

    Args:
        path: the file to write.

    Raises:
        IsADirectoryError: `path` is a directory.
        NotRegularFile: `path` is a symbolic link (trp never writes through one), a FIFO, a device, a socket.
    """
    try:
        mode = os.lstat(path).st_mode
    except OSError:  # absent (or its directory is): the write itself says what is wrong
        return
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if stat.S_ISLNK(mode):
        raise NotRegularFile(f"{path} is a symbolic link: trp does not write through links (remove it, or "
                             "name the file it points to)")
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is {_kind(mode)}, not a regular file: trp replaces regular files only")


class _Recorder:
    """The file object a writer gets: it records the first exception a write raises (torch.save turns an
    OSError or a KeyboardInterrupt inside its writes into a RuntimeError that hides the cause)."""

    def __init__(self, f):
        self._f, self.failure = f, None

    def _call(self, name, *args):
        try:
            return getattr(self._f, name)(*args)
        except BaseException as exc:
            if self.failure is None:
                self.failure = exc
            raise

    def write(self, data):
        return self._call("write", data)

    def flush(self):
        return self._call("flush")

    def tell(self):
        return self._f.tell()

    def seek(self, *args):
        return self._call("seek", *args)

    def seekable(self):
        return self._f.seekable()

    def writable(self):
        return True

    def fileno(self):
        return self._f.fileno()

    @property
    def closed(self):
        return self._f.closed


def _unlink(path):
    try:
        os.unlink(path)
    except OSError:
        pass


def check_writable(path):
    """Raises before any work when atomic_write(path) could not write there: a directory at `path`, an
    existing ancestor that is not a directory, or a directory that this process cannot write in.

    Raises:
        IsADirectoryError, NotADirectoryError, PermissionError: naming the path.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_file(path)
    parent = os.path.dirname(path)
    while not os.path.lexists(parent):  # atomic_write creates the missing directories below it
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise NotADirectoryError(f"{path}: {parent} is not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: no permission to write in {parent}")


def atomic_write(path, write):
    """Calls write(f) on a binary temporary file beside `path`, then renames it onto `path`. The file gets
    the mode open() would give (0666 & ~umask), not mkstemp's 0600. Creates missing directories.

    Args:
        path: the file to write.
        write: write(f) writes the content to the binary file object f.

    Raises:
        IsADirectoryError, NotRegularFile: `path` is not absent or a regular file (checked first).
        WriteError: a write, the fsync or the rename failed (disk full, I/O error...); the previous file is
            intact and no temporary is left.
        KeyboardInterrupt: interrupted; the previous file is intact and no temporary is left.
    """
    path = os.path.abspath(os.fspath(path))
    check_output_file(path)
    directory, name = os.path.split(path)
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as exc:
        raise WriteError(path, exc) from None
    clean_stale_temps(directory, [name])
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    except OSError as exc:
        raise WriteError(path, exc) from None
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(fd, 0o666 & ~_umask())  # on the descriptor: the name could be swapped meanwhile
            recorder = _Recorder(f)
            try:
                write(recorder)
            except BaseException as exc:
                if recorder.failure is not None and recorder.failure is not exc:
                    raise recorder.failure from None  # the cause, not the serializer's report of it
                raise
            f.flush()
            os.fsync(fd)
        os.replace(tmp, path)
    except BaseException as exc:
        _unlink(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, (WriteError, NotRegularFile)) and exc.errno is not None:
            raise WriteError(path, exc) from None
        raise
    # make the rename itself durable (best effort; not every platform can fsync a directory)
    try:
        dfd = os.open(directory, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | _CLOEXEC)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj, path):
    """torch.save(obj) to `path` by atomic_write.

    Args:
        obj: what torch.save takes.
        path: the file to write.

    Raises:
        See atomic_write.
    """
    atomic_write(path, lambda f: torch.save(obj, f))


def writer_alive(pid):
    """Whether the process `pid` (the writer a temporary's name records) may still be running.

    Args:
        pid: a process id.

    Returns:
        False only when no such process exists (another user's process counts as alive).
    """
    if pid in (0, os.getpid()):
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OverflowError:  # no such PID can exist
        return False
    except OSError:  # EPERM: alive, someone else's
        return True
    return True


def clean_stale_temps(directory, targets):
    """Removes the temporaries that interrupted atomic writes of the files named `targets` left in
    `directory`: those whose writer's PID is gone (PID-less names of an older trp: older than
    LEGACY_STALE_S). A live writer's temporary is never touched, nor anything but a regular file (a link
    with a temporary's name is left alone). Returns the removed names."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    removed, now = [], time.time()
    for name in names:
        m = next((_TEMP_TAIL.fullmatch(name, len(t) + 1) for t in targets if name.startswith(f".{t}.")), None)
        if m is None:
            continue
        path = os.path.join(directory, name)
        try:
            st = os.lstat(path)
            if not stat.S_ISREG(st.st_mode):
                continue
            pid = m["pid"]
            stale = not writer_alive(int(pid)) if pid is not None else now - st.st_mtime > LEGACY_STALE_S
            if stale:
                os.unlink(path)
                removed.append(name)
        except OSError:  # renamed into place or removed meanwhile, or not ours to remove
            continue
    return removed


def _reason(exc):
    """A short cause from torch's error, without its advice on unsafe loading."""
    text = str(exc).strip()
    first = text.splitlines()[0].split(". ")[0][:200] if text else ""
    return type(exc).__name__ if not first or "weights_only" in first.lower() else first


def open_regular(path):
    """A binary file object reading `path` (a link to a regular file is followed), refusing anything but a
    regular file before and after opening it, so that a FIFO or a device is never read (or waited on).

    Args:
        path: the file to read.

    Returns:
        The open binary file object (blocking).

    Raises:
        FileNotFoundError, IsADirectoryError, PermissionError: name the path.
        NotRegularFile: a FIFO, a device, a socket.
    """
    path = os.fspath(path)
    try:
        mode = os.stat(path).st_mode
        if stat.S_ISREG(mode):
            fd = os.open(path, os.O_RDONLY | _NONBLOCK | _CLOEXEC)  # non-blocking: a FIFO swapped in meanwhile
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                os.close(fd)
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file") from None
    except PermissionError:
        raise PermissionError(f"{path}: permission denied") from None
    if stat.S_ISDIR(mode):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not stat.S_ISREG(mode):
        raise NotRegularFile(f"{path} is {_kind(mode)}, not a regular file: trp reads regular files only")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_torch(path):
    """torch.load(path, weights_only=True) onto the CPU, from a regular file only (open_regular).

    Args:
        path: the file to read.

    Returns:
        What the file holds (tensors and plain data).

    Raises:
        FileNotFoundError, IsADirectoryError, NotRegularFile, PermissionError: name the path.
        UnreadableFile: the file is damaged or holds objects that safe loading refuses.
    """
    path = os.fspath(path)
    with open_regular(path) as f:
        try:
            return torch.load(f, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            found = re.search(r"GLOBAL (\S+)", str(exc))
            if found is None:
                raise UnreadableFile(f"{path}: corrupted or truncated, not a readable torch file "
                                     f"({_reason(exc)})") from None
            raise UnreadableFile(f"{path} is not a trp/torch checkpoint or holds disallowed objects "
                                 f"({found[1]}); trp loads tensors and plain data only") from None
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as exc:  # truncated zip, bad records: torch raises RuntimeError, OSError (EINVAL)...
            raise UnreadableFile(f"{path}: corrupted or truncated, not a readable torch file "
                                 f"({_reason(exc)})") from None


__all__ = ["UnreadableFile", "NotRegularFile", "WriteError", "atomic_write", "atomic_save", "clean_stale_temps",
           "check_output_file", "check_writable", "open_regular", "read_torch", "writer_alive"]
