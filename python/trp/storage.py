"""Files on disk: atomic writes with the mode the umask gives, cleanup of the temporaries that interrupted
writes leave behind, and safe reading (torch.load(weights_only=True): no pickled code runs) with errors
that say what is wrong with a file.

An atomic write goes to a hidden temporary `.NAME.PID.XXXXXXXX.tmp` beside the target, is fsynced and
os.replace()d onto it: a crash leaves the previous file or the new one, never a mix - at worst a
temporary whose PID tells a later start whether its writer is still alive."""
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


class UnreadableFile(ValueError):
    """A file that torch cannot load safely: corrupted, truncated, foreign, or holding pickled objects."""


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
    """IsADirectoryError for an output path that is a directory (checked before any work)."""
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a file")


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
    the mode open() would give (0666 & ~umask), not mkstemp's 0600. Creates missing directories."""
    path = os.path.abspath(os.fspath(path))
    check_output_file(path)
    directory, name = os.path.split(path)
    os.makedirs(directory, exist_ok=True)
    clean_stale_temps(directory, [name])
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.{os.getpid()}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "wb") as f:
            os.chmod(tmp, 0o666 & ~_umask())
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # make the rename itself durable (best effort; not every platform can fsync a directory)
    try:
        dfd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def atomic_save(obj, path):
    """torch.save(obj) to `path` by atomic_write."""
    atomic_write(path, lambda f: torch.save(obj, f))


def _alive(pid):
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
    LEGACY_STALE_S). A live writer's temporary is never touched. Returns the removed names."""
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
            stale = not _alive(int(pid)) if pid is not None else now - st.st_mtime > LEGACY_STALE_S
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


def read_torch(path):
    """torch.load(path, weights_only=True) onto the CPU. FileNotFoundError / IsADirectoryError name the
    path; UnreadableFile says whether the file is damaged or holds objects that safe loading refuses."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise IsADirectoryError(f"{path} is a directory, not a file")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except PermissionError:
        raise
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL (\S+)", str(exc))
        if found is None:
            raise UnreadableFile(f"{path}: corrupted or truncated, not a readable torch file "
                                 f"({_reason(exc)})") from None
        raise UnreadableFile(f"{path} is not a trp/torch checkpoint or holds disallowed objects "
                             f"({found[1]}); trp loads tensors and plain data only") from None
    except Exception as exc:  # truncated zip, bad records: torch raises RuntimeError, OSError (EINVAL)...
        raise UnreadableFile(f"{path}: corrupted or truncated, not a readable torch file ({_reason(exc)})") \
            from None


__all__ = ["UnreadableFile", "atomic_write", "atomic_save", "clean_stale_temps", "check_output_file",
           "check_writable", "read_torch"]
