"""Atomic file and folder writes, locks, folder ownership, and file hashing.

Artifacts are written under a temporary name in the same folder and renamed into place, so a
process that dies half way leaves a temporary name behind, never a half-written artifact under
the name a later command trusts.

Folders controlrt writes whole (model sets, converted checkpoints, Triton repositories, the demo)
carry an owner record, ``.controlrt-owner.json``, listing every file written. Such a folder is
replaced only when asked to (``force``) and only while it holds nothing but those files: a folder
controlrt did not write, or one a user has added files to, is never replaced. Commands that write
the same target take an exclusive lock on it first (a lock file beside it, ``.NAME.lock``) and
check the target again under the lock before the final rename.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from controlrt.errors import InputError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20
OWNER_FILE = ".controlrt-owner.json"
OWNER_FORMAT = "controlrt-owner"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _cache_dir() -> Path:
    root = os.environ.get("CONTROLRT_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "controlrt"
    )
    return Path(root)


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


def sha256_cached(path: str | Path) -> str:
    """sha256 of a (large, rarely changing) file, cached by path, size, mtime and inode.

    The cache is ``$CONTROLRT_CACHE_DIR/sha256.json`` (default ``~/.cache/controlrt``); a file whose
    size, modification time or inode changed is hashed again. Without a writable cache the hash
    is computed every time.
    """
    path = Path(path).resolve()
    stat = path.stat()
    key = [stat.st_size, stat.st_mtime_ns, stat.st_ino]
    cache_file = _cache_dir() / "sha256.json"
    entry = _read_cache(cache_file).get(str(path))
    if isinstance(entry, list) and len(entry) == 2 and entry[0] == key:
        return str(entry[1])
    digest = sha256_file(path)
    try:
        cache_file.parent.mkdir(parents=True, exist_ok=True)
        with file_lock(cache_file):
            cache = _read_cache(cache_file)  # again, under the lock: others may have added to it
            cache[str(path)] = [key, digest]
            atomic_write_text(cache_file, json.dumps(cache))
    except (OSError, InputError) as exc:
        logger.debug("not caching the hash of %s: %s", path, exc)
    return digest


def _umask() -> int:
    """This process's file mode creation mask, read without changing it where /proc tells it."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but only where /proc is missing)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes, replace: bool = True) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    The file gets the mode a plainly created file gets (0666 less the umask), not the temporary
    file's private 0600. With ``replace=False`` an existing ``path`` is never replaced, even one
    that appeared while the data was written: the file is linked into place, which fails if the
    name is taken (FileExistsError).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fchmod(f.fileno(), 0o666 & ~_umask())
            os.fsync(f.fileno())
        if replace:
            os.replace(tmp, path)
            return
        try:
            os.link(tmp, path)
        except OSError as exc:
            if isinstance(exc, FileExistsError) or exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EXDEV):
                raise
            # a file system without hard links: check, then rename (not atomic against a racing writer)
            if path.exists() or path.is_symlink():
                raise FileExistsError(errno.EEXIST, "File exists", str(path)) from None
            os.replace(tmp, path)
        else:
            os.unlink(tmp)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


# --- locks ---------------------------------------------------------------------------------------


class _HeldLock:
    def __init__(self) -> None:
        self.guard = threading.RLock()  # threads of this process
        self.fd: int | None = None  # the flock, held once per process
        self.depth = 0


_LOCKS: dict[str, _HeldLock] = {}
_LOCKS_GUARD = threading.Lock()


def lock_path(target: str | Path) -> Path:
    """The lock file of ``target``: ``.NAME.lock`` beside it."""
    target = Path(target).expanduser().resolve()
    return target.parent / f".{target.name}.lock"


@contextmanager
def file_lock(target: str | Path) -> Iterator[None]:
    """Hold an exclusive lock on ``target`` (a file or folder, existing or not).

    The lock is an ``flock`` on ``.NAME.lock`` beside the target, so it outlives a replacement of
    the target itself. It waits for another process's lock, saying whose; it is re-entrant within
    a process. The holder removes the lock file as it releases it; a process that was waiting on
    the removed file notices and locks the new one, so no two processes ever hold the lock.

    Raises:
        InputError: The lock file cannot be created (the folder is missing or read-only).
    """
    path = lock_path(target)
    with _LOCKS_GUARD:
        held = _LOCKS.setdefault(str(path), _HeldLock())
    with held.guard:
        if held.depth == 0:
            held.fd = _acquire(path, Path(target))
        held.depth += 1
        try:
            yield
        finally:
            held.depth -= 1
            if held.depth == 0 and held.fd is not None:
                _release(path, held.fd)
                held.fd = None


def _acquire(path: Path, target: Path) -> int:
    """flock ``path``, created if need be; retried if the file was removed while waiting for it."""
    waited = False
    while True:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise InputError(f"cannot lock {target}: cannot create {path} ({exc.strerror})") from None
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if not waited:
                    holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
                    logger.warning("waiting for %s: another controlrt command (pid %s) is writing it", target, holder)
                    waited = True
                fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                current = os.stat(path).st_ino
            except FileNotFoundError:
                current = None
            if current != os.fstat(fd).st_ino:  # the holder removed it as it finished: lock the new one
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        except BaseException:
            os.close(fd)
            raise


def _release(path: Path, fd: int) -> None:
    """Remove the lock file while still holding it (waiters see it gone and retry), then unlock."""
    with suppress(OSError):
        os.unlink(path)
    os.close(fd)


# --- folder ownership ----------------------------------------------------------------------------

# Given a folder, the relative paths of the files controlrt wrote there, or None if it is not one
# of controlrt's folders.
Explain = Callable[[Path], "set[str] | None"]


def files_under(folder: Path) -> list[str]:
    """Every file and link below ``folder`` (relative, sorted); empty folders are not listed."""
    out = []
    for root, dirs, files in os.walk(folder, followlinks=False):
        base = Path(root)
        # a link to a folder is listed, never followed
        out += [str((base / name).relative_to(folder)) for name in dirs if (base / name).is_symlink()]
        out += [str((base / name).relative_to(folder)) for name in files]
    return sorted(out)


# Names of controlrt's own temporary files: staging folders of interrupted commands (any depth below
# them), atomic writes' temporary files, write probes, locks, folders renamed aside.
_TEMPORARY_FOLDERS = (".*.partial-*", ".*-partial-*", ".refit-*", ".*.old-*")
_TEMPORARY_FILES = (".*.tmp", ".*.lock", ".controlrt-probe-*", ".*.inferred.onnx")


def is_temporary(relative: str) -> bool:
    """Whether a path (relative to an output folder) is one of controlrt's temporary files."""
    from fnmatch import fnmatchcase

    parts = Path(relative).parts
    if any(fnmatchcase(part, p) for part in parts[:-1] for p in _TEMPORARY_FOLDERS):
        return True
    return any(fnmatchcase(parts[-1], p) for p in _TEMPORARY_FILES)


def owner_record(folder: Path) -> dict | None:
    """The owner record of a folder controlrt wrote whole, or None."""
    try:
        data = json.loads((folder / OWNER_FILE).read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or data.get("format") != OWNER_FORMAT or not isinstance(data.get("files"), list):
        return None
    return data


def explain_owned(folder: Path) -> set[str] | None:
    """The files an owner record lists (and the record itself), or None without a record."""
    record = owner_record(folder)
    if record is None:
        return None
    return {*map(str, record["files"]), OWNER_FILE, *(f for f in files_under(folder) if is_temporary(f))}


def write_owner_record(folder: Path, kind: str) -> None:
    """List every file now in ``folder`` as written by controlrt (``kind``: which command)."""
    files = [f for f in files_under(folder) if f != OWNER_FILE]
    text = json.dumps({"format": OWNER_FORMAT, "written_by": f"controlrt {kind}", "files": files}, indent=1)
    atomic_write_text(folder / OWNER_FILE, text)


def check_replaceable(target: Path, force: bool, explain: Explain = explain_owned, during: str = "") -> None:
    """InputError unless ``target`` may be written: it is missing or empty, or (with ``force``)
    it is a folder controlrt wrote that holds nothing else.

    Args:
        explain: Which files of the folder controlrt wrote (None: not controlrt's folder).
        during: Set when checking again just before replacing: the error then says the folder
            appeared or changed while the command ran.
    """
    if not target.exists() and not target.is_symlink():
        return
    if target.is_symlink() or not target.is_dir():
        raise InputError(f"output {target} exists and is not a folder")
    if not any(target.iterdir()):
        return
    changed = f" ({during})" if during else ""
    known = explain(target)
    if known is None:
        raise InputError(
            f"output folder {target} exists and was not written by controlrt{changed}; refusing to replace "
            "it, even with --force: choose another folder"
        )
    foreign = [f for f in files_under(target) if f not in known]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise InputError(
            f"output folder {target} holds files controlrt did not write ({foreign[0]}{more}){changed}; "
            "refusing to replace it, even with --force"
        )
    if not force:
        raise InputError(f"output folder {target} already exists{changed}; pass --force to replace it")


def replace_dir(staging: Path, target: Path) -> None:
    """Move the finished folder ``staging`` to ``target``, replacing any folder there.

    The old folder is first renamed aside, so ``target`` never holds a mix of old and new files.
    Callers check that the old folder may be replaced (check_replaceable) under the target's lock.
    """
    os.chmod(staging, 0o755)  # mkdtemp makes it private
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, old)
    os.replace(staging, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def output_folder(path: str | Path) -> Path:
    """An output folder path made absolute; InputError for one that can never be a folder."""
    target = Path(path).expanduser()
    resolved = target.resolve()
    if resolved.parent == resolved or not resolved.name or resolved == Path.cwd() or target.name in ("", ".", ".."):
        raise InputError(f"output {path} must name a folder to create, not {resolved}")
    parent = resolved.parent
    existing = next((p for p in (parent, *parent.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise InputError(f"output {path}: {existing} is a file, not a folder")
    return resolved


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve() or (a.exists() and b.exists() and os.path.samefile(a, b))
    except OSError:
        return False


def check_output_file(
    path: str | Path, force: bool = False, inputs: Sequence[str | Path] = (), what: str = "output"
) -> Path:
    """The absolute path of a file a command will write; InputError, before any work, unless it
    can be written there.

    Its folder must exist (files are not written into folders created on the way). A file that
    exists is replaced only with ``force``; one of the command's own ``inputs`` never, even with
    ``force``. A probe file is made and removed in the folder, so that long work does not end in
    an error about the output. Write it with :func:`write_output_file`.
    """
    path = output_folder(path)
    shown = f"{what} {path}"
    if path.is_dir():
        raise InputError(f"{shown} is a folder; give a file name in it")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist")
    for source in inputs:
        if _same_file(path, Path(source).expanduser()):
            raise InputError(
                f"{shown} is one of this command's inputs; choose another file (even --force does not write over "
                "an input)"
            )
    if (path.exists() or path.is_symlink()) and not force:
        raise InputError(f"{shown} already exists; pass --force to replace it")
    _probe(path.parent, path)
    return path


def check_output_folder(path: str | Path) -> Path:
    """The absolute path of a folder a command writes files into (created if missing, its parent
    must exist); InputError unless files can be written there. Each file in it is then checked
    with :func:`check_output_file`."""
    path = output_folder(path)
    if path.exists() and not path.is_dir():
        raise InputError(f"output {path} exists and is not a folder")
    if not path.parent.is_dir():
        raise InputError(f"cannot write {path}: the folder {path.parent} does not exist")
    try:
        path.mkdir(exist_ok=True)
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None
    _probe(path, path)
    return path


def _probe(folder: Path, path: Path) -> None:
    try:
        with tempfile.NamedTemporaryFile(prefix=".controlrt-probe-", dir=folder):
            pass
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


def write_output_file(path: Path, data: bytes, force: bool = False) -> None:
    """Write a file checked by :func:`check_output_file`, atomically; without ``force`` a file
    that appeared there meanwhile is left as it is (InputError)."""
    try:
        atomic_write_bytes(path, data, replace=force)
    except FileExistsError:
        raise InputError(f"output {path} already exists (it was left as it is); pass --force to replace it") from None
    except OSError as exc:
        raise InputError(f"cannot write {path}: {exc.strerror or exc}") from None


@contextmanager
def staged_folder(
    target: str | Path, kind: str, force: bool = False, explain: Explain = explain_owned, owner: bool = True
) -> Iterator[Path]:
    """A temporary folder beside ``target`` to fill; on success it replaces ``target``.

    ``target`` is checked first (check_replaceable) and again under its lock just before the
    rename, so two commands writing one target never silently replace each other's work. On any
    failure the temporary folder is removed and ``target`` is untouched.

    Args:
        kind: The command writing it, for the owner record.
        force: Replace a folder controlrt wrote (holding nothing else).
        explain: How to tell what controlrt wrote in an existing target (default: its owner record).
        owner: Write an owner record listing the files (builds have their manifest instead).
    """
    target = output_folder(target)
    check_replaceable(target, force, explain)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    except OSError as exc:
        raise InputError(f"cannot write {target}: {exc.strerror}") from None
    try:
        yield staging
        if owner:
            write_owner_record(staging, kind)
        with file_lock(target):
            check_replaceable(target, force, explain, during="written by another command meanwhile")
            replace_dir(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_files(root: Path, paths: list[str]) -> None:
    """Delete files a manifest no longer lists (after the manifest that drops them is written)."""
    for rel in paths:
        path = root / rel
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            logger.warning("could not remove %s, which the build no longer uses: %s", path, exc.strerror)
