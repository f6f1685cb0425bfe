"""Writing files so that readers never see half of one, and output names that stay inside their folder.

Every file fastdec writes goes through :func:`atomic_write`: a temporary file beside the target, fsynced,
then renamed over it. JSON has one rule for non-finite numbers (they become ``null``, so the file is strict
JSON); CSV rows are written through :mod:`csv`.
"""
from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import socket
import tempfile
import unicodedata
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

from ..errors import DataError, InputTypeError, UnsafePathError, UsageError

TEMP_MARKER = ".fastdec-tmp"
_UMASK = os.umask(0)
os.umask(_UMASK)
# most file systems cap one name at 255 bytes; leave room for the temporary prefix and suffix
MAX_NAME_BYTES = 200


def _owner_tag() -> str:
    """Who writes a temporary file: this host and process, so that a later save can tell a dead writer's leftover
    from a file another process (or thread) is writing right now."""
    host = hashlib.sha1(socket.gethostname().encode()).hexdigest()[:8]
    return f"{host}-{os.getpid()}"


def _is_dead_writer(owner: str) -> bool:
    host, _, pid = owner.partition("-")
    if host != _owner_tag().partition("-")[0]:
        return False  # another machine's process (a shared file system): no way to tell, so leave it
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (PermissionError, OverflowError):
        return False  # alive under another user (or not a pid this system can hold)
    return False


def _remove_stale_temps(path: Path) -> None:
    """Temporary files that an interrupted save to ``path`` left behind (their writer died mid-write). Only
    exactly this name's, and only a dead process's: two processes saving one file must not delete each other's
    temporary file, nor a save of ``a.png`` the one of ``a.png.v2.png``."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.([0-9a-f]{{8}}-[0-9]+)\.[a-z0-9_]+{re.escape(TEMP_MARKER)}")
    for candidate in path.parent.glob(f".{glob_escape(path.name)}.*{TEMP_MARKER}*"):
        match = pattern.match(candidate.name)
        if match and _is_dead_writer(match.group(1)):
            candidate.unlink(missing_ok=True)


def temp_file_for(path: Path, suffix: str = "") -> Path:
    """A new hidden temporary file beside ``path`` (its folder made) for a write that is renamed to ``path`` when
    done; the temporary files an interrupted write to ``path`` left are removed first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{_owner_tag()}.",
                               suffix=f"{TEMP_MARKER}{suffix}")
    os.close(fd)
    return Path(tmp)


def glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any], suffix: str = "") -> Path:
    """Call ``write(tmp_path)``, fsync, then rename over ``path``: readers never see a half-written file.

    ``suffix`` ends the temporary name (some writers pick the format from it, e.g. ``.png``).
    """
    path = as_path(path, "the output path")  # '~/stats.npz' made a folder named '~'; 5 a bare TypeError
    tmp = str(temp_file_for(path, suffix))
    try:
        write(tmp)
        with open(tmp, "rb+") as f:  # data on disk before the rename makes it visible
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; outputs should be readable like any file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8", newline=""))


def json_safe(obj: Any) -> Any:
    """The one rule for non-finite numbers in JSON: NaN and +-inf become null (strict JSON)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {str(k): json_safe(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [json_safe(v) for v in obj]
    if hasattr(obj, "item") and callable(obj.item) and getattr(obj, "ndim", 1) == 0:  # numpy / torch scalars
        return json_safe(obj.item())
    return obj


def write_json(path: str | os.PathLike, payload: Any, indent: int | None = 2) -> Path:
    """``payload`` as JSON (non-finite numbers as null), atomically."""
    text = json.dumps(json_safe(payload), indent=indent, allow_nan=False, sort_keys=False) + "\n"
    return write_text(path, text)


def csv_text(rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(columns), extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow(row)
    return buffer.getvalue()


def write_csv(path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], columns: Sequence[str]) -> Path:
    return write_text(path, csv_text(rows, columns))


# ----------------------------------------------------------------------------- names inside an output folder
def check_name(name: str, what: str = "name") -> str:
    """A single path component that is safe as a file name: no separators, no '..', no control characters,
    not hidden, not too long. Raises :class:`UnsafePathError` naming the problem."""
    if not isinstance(name, str) or not name:
        raise UnsafePathError(f"{what} {name!r} cannot be a file name: it is empty or not text")
    problem = None
    if "/" in name or "\\" in name or name in (".", ".."):
        problem = "it contains a path separator or is '.'/'..'"
    elif name.startswith("."):
        problem = "it starts with '.' (hidden files and '..' are not allowed)"
    elif any(unicodedata.category(c) == "Cs" for c in name):  # how Python keeps the bytes of a non-UTF-8 file name
        problem = "it is not valid UTF-8 (the name came from a file whose name is not)"
    elif any(unicodedata.category(c).startswith("C") for c in name):
        problem = "it contains a control character (a newline, tab or NUL)"
    elif len(name.encode("utf-8")) > MAX_NAME_BYTES:
        problem = f"it is {len(name.encode('utf-8'))} bytes long (the limit is {MAX_NAME_BYTES})"
    elif TEMP_MARKER in name:
        problem = f"it contains {TEMP_MARKER!r}, which marks temporary files"
    if problem:
        raise UnsafePathError(
            f"{what} {name!r} cannot be a file name: {problem}; rename it to letters, digits, '_', '-' and '.'"
        )
    return name


def output_path(folder: str | os.PathLike, name: str, what: str = "output name") -> Path:
    """``folder / name``, refused unless it is a plain file name that stays inside ``folder``."""
    check_name(name, what)
    folder = Path(folder)
    path = folder / name
    # realpath, not resolve(): resolve() raises RuntimeError on a link that loops, realpath returns it as is
    if os.path.dirname(os.path.realpath(path)) != os.path.realpath(folder):  # a symlinked entry, or any escape
        raise UnsafePathError(f"{what} {name!r} would be written outside '{folder}'")
    return path


def output_subfolder(folder: str | os.PathLike, name: str, what: str = "output folder") -> Path:
    """``folder / name`` made a folder if it is not one yet, refused when it is a link or otherwise lands outside
    ``folder``: files written into it (and checkpoints pruned from it) must stay in the output folder."""
    path = check_subfolder(folder, name, what)
    path.mkdir(parents=True, exist_ok=True)
    return path


def check_subfolder(folder: str | os.PathLike, name: str, what: str = "output folder") -> Path:
    """``folder / name``, refused (not made) when it is a link, lands outside ``folder`` or is a file."""
    check_name(name, what)
    folder = Path(folder)
    path = folder / name
    if path.is_symlink() or (path.exists() and os.path.realpath(path) != os.path.join(os.path.realpath(folder),
                                                                                     name)):
        target = os.readlink(path) if path.is_symlink() else os.path.realpath(path)  # resolve() raises on a loop
        raise UnsafePathError(f"{what} '{path}' is a link to '{target}': fastdec writes only inside '{folder}', "
                              "never through a link. Replace the link by a real folder holding what it points to "
                              "(keep its files: a resume reads them), or give an output folder on that disk instead")
    if path.exists() and not path.is_dir():
        raise UsageError(f"{what} '{path}' is a file, where fastdec keeps a folder: move the file away")
    return path


def _write_problem(folder: Path) -> str | None:
    """Why a file cannot be created in ``folder`` (None when it can), found by creating one: permission bits
    do not tell (root passes every check, and /proc or a read-only mount refuse anyway)."""
    if not os.access(folder, os.W_OK | os.X_OK):
        return "it is not writable"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".fastdec-probe.", suffix=TEMP_MARKER)
    except OSError as e:
        return f"creating a file there fails ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def printable(path: str | os.PathLike) -> str:
    """``path`` as text every report and library can hold: a path that is not valid UTF-8 (Python keeps its
    bytes as surrogates) shows them as \\xff escapes, where CSV, JSON and matplotlib failed with a traceback.
    Equal to ``os.fspath(path)`` exactly when the path is valid UTF-8."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def display_name(path: Path) -> str:
    """``path.name``, :func:`printable`."""
    return printable(path.name)


def read_text_file(path: Path, error: type[Exception], what: str) -> str:
    """``path``'s UTF-8 text, or ``error`` naming ``what`` and the problem (an unreadable file, or bytes that
    are not UTF-8, met a bare OSError or UnicodeDecodeError)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise error(f"{what} '{path}' is not UTF-8 text (byte {e.start}): save it as UTF-8") from e
    except OSError as e:
        raise error(f"cannot read {what} '{path}': {e.strerror or e}") from e


def read_json_object(path: Path, error: type[Exception], what: str) -> dict[str, Any]:
    """The JSON object in ``path``, or ``error`` naming ``what``: not readable, not JSON, or not an object."""
    try:
        value = json.loads(read_text_file(path, error, what))
    except json.JSONDecodeError as e:
        raise error(f"{what} '{path}' is not valid JSON: {e}") from e
    if not isinstance(value, dict):
        raise error(f"{what} '{path}' holds a JSON {type(value).__name__}, not an object")
    return value


def as_path(value: str | os.PathLike, what: str) -> Path:
    """``value`` as a Path, or an error naming ``what`` (pathlib's own says only "expected str, bytes or
    os.PathLike object, not int", with no word of which argument it was)."""
    if not isinstance(value, (str, os.PathLike)):
        raise InputTypeError(f"{what} must be a path (a str or pathlib.Path), got {type(value).__name__} {value!r}")
    return Path(value).expanduser()


def prepare_output_dir(folder: str | os.PathLike, what: str = "--out") -> Path:
    """Create ``folder`` (and parents) before any work, or fail now with what is wrong."""
    folder = as_path(folder, what)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"{what} '{folder}' is a file, not a folder: pass a folder path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot create {what} folder '{folder}': {e.strerror or e}") from e
    problem = _write_problem(folder)
    if problem:
        raise UsageError(f"{what} folder '{folder}': {problem}; choose another folder or fix its permissions")
    return folder


@contextmanager
def output_folder(folder: str | os.PathLike | None, what: str = "--out") -> Iterator[Path | None]:
    """:func:`prepare_output_dir` for the work inside the ``with``: if that work fails, the folders this call
    created are removed again while they are still empty, so a refused run leaves no empty report folder.
    ``None`` (no output) yields ``None``."""
    if folder is None:
        yield None
        return
    folder = Path(folder).expanduser()
    created = [p for p in (folder, *folder.parents) if not p.exists()]  # deepest first
    path = prepare_output_dir(folder, what)
    try:
        yield path
    except BaseException:
        for made in created:
            try:
                made.rmdir()  # only an empty folder goes
            except OSError:
                break
        raise


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """Fail before any work when ``path`` cannot be written: a folder at its place, or an unwritable parent."""
    path = as_path(path, what)
    if path.is_dir():
        raise UsageError(f"{what} '{path}' is a folder: pass a file path")
    parent = path.parent
    existing = parent
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"cannot write {what} '{path}': '{existing}' is not a writable folder")
    problem = _write_problem(existing)
    if problem:
        raise UsageError(f"cannot write {what} '{path}': '{existing}' is not a writable folder ({problem})")
    return path


def drop_excluded(candidates: list[Path], root: Path, exclude: Iterable[str]) -> list[Path]:
    """``candidates`` without the files or frame folders named in ``exclude`` (a name, or a path relative to
    ``root``): how held-out clips stay out of a training folder that also holds them. A name that matches
    nothing is an error, so a typo cannot silently train on the held-out set. One string is a comma-separated
    list, as ``--exclude`` takes it (its letters were the names: "--exclude names 1, c, i, l, p")."""
    if isinstance(exclude, str):
        exclude = exclude.split(",")
    exclude = {_relative_name(e.strip(), root) for e in exclude if e.strip()}
    if not exclude:
        return candidates

    def names(path: Path) -> set[str]:
        return {path.name, path.relative_to(root).as_posix()}

    unmatched = sorted(e for e in exclude if not any(e in names(c) for c in candidates))
    if unmatched:
        raise DataError(f"--exclude names {', '.join(unmatched)}, which is not in '{root}': give file or folder "
                        "names (or paths relative to --data) of what to leave out")
    kept = [c for c in candidates if not names(c) & exclude]
    if candidates and not kept:
        raise DataError(f"--exclude leaves out all {len(candidates)} files or folders in '{root}': nothing is left")
    return kept


def _relative_name(entry: str, root: Path) -> str:
    """An --exclude entry as drop_excluded compares it: a path under ``root`` given whole (absolute) becomes
    relative to it; a trailing slash of a folder's name goes."""
    path = Path(entry)
    if path.is_absolute():
        try:
            return path.resolve().relative_to(root.resolve()).as_posix()
        except ValueError:
            return entry  # outside --data: reported, as given, as not in it
    return entry.strip("/")
