"""Atomic file writing: a crash or an error never leaves a half-written file at the destination, and a
run replaces only files of its own kind."""

import contextlib
import hashlib
import json
import os
import re
import socket
import uuid


def str_path(value) -> str | None:
    """`value` as a str when it is a str or an os.PathLike that gives one (not bytes), else None: for
    callers that refuse other values with a TypeError naming their argument (os.fspath's names none)."""
    if isinstance(value, (str, os.PathLike)) and isinstance(path := os.fspath(value), str):
        return path
    return None


@contextlib.contextmanager
def atomic_path(path, remove_leftovers: bool = False):
    """Yield a temporary path in `path`'s folder; when the block succeeds it is fsynced and renamed onto
    `path` (os.replace, atomic on POSIX and Windows), otherwise removed. Any earlier file stays intact.
    A symbolic link at `path` is replaced by the file (its target stays as it was): a write never lands
    outside `path`'s folder, where a run's checks and `temporaries` look. remove_leftovers: first remove
    what killed earlier writes of `path` left (one listing of the folder: for a single file; writers of
    many files in one folder use `temporaries` once). An error of the write is raised as
    `plain_write_errors` says: an OSError names `path`, not the temporary."""
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    if remove_leftovers:
        remove_temporaries(directory, [os.path.basename(path)])
    # Hidden (image listings skip it), and named by its writer (_TEMPORARY): writers write this very file
    # (not one of their own renamed onto it, as safetensors' save_file does), so a killed write leaves
    # only what `remove_temporaries` recognises.
    owner = f"{_HOST}-{os.getpid()}"  # the pid asked each time: a forked child is another writer
    tmp = os.path.join(directory, f".{_stem(os.path.basename(path))}.{owner}.{uuid.uuid4().hex[:6]}.tmp")
    try:
        with plain_write_errors(path):
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, _mode_for(path))
            os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX only)
        fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def plain_write_errors(path):
    """Re-raise what writing `path` failed with as Python raises it. An OSError (a full disk, a read-only
    file system) names `path`: Python's write errors name no file, the OS's open names the temporary.
    torch's zip writer turns what the file object it writes to raises into a RuntimeError of its own
    ('unexpected pos ...') whose context it is: an OSError, or a Ctrl-C (KeyboardInterrupt), which the
    commands answer with `interrupted` and no traceback."""
    try:
        yield
    except (OSError, RuntimeError) as e:
        error = e if isinstance(e, OSError) else e.__context__
        if isinstance(error, KeyboardInterrupt):
            raise error from None
        if not isinstance(error, OSError) or error.errno is None:
            raise
        raise OSError(error.errno, error.strerror, os.fspath(path)) from e


# atomic_path's temporaries: `.<stem of the target's name>.<host>-<pid>.<6 hex digits>.tmp`, the host a
# hash of its name: a leftover is one whose writer, a process of this host, no longer runs.
_HOST = hashlib.sha1(socket.gethostname().encode(errors="surrogateescape")).hexdigest()[:6]
_TEMPORARY = re.compile(r"\.(.+)\.([0-9a-f]{6})-([0-9]{1,10})\.[0-9a-f]{6}\.tmp", re.DOTALL)


def _gone(host: str, pid: int) -> bool:
    """Whether the process that wrote a temporary is known to have ended: on this host (a network
    folder's other hosts cannot be asked), and POSIX (Windows' os.kill would stop the process)."""
    if os.name != "posix" or host != _HOST:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # another user's process (PermissionError) or no answer: alive as far as we know
        return False
    return False


def temporaries(folder) -> dict[str, list[str]]:
    """What killed writes (a kill runs no cleanup; a checkpoint's temporary is as large as the
    checkpoint) left in `folder`: atomic_path's temporaries whose writer, on this host, has ended, by
    the stem of their target's name, {stem: [paths]}. A live writer's (another process writing the same
    file), another host's and a user's file that merely looks like one (`.a.json.<...>.tmp.bak`) are not
    among them. Empty where the folder cannot be listed."""
    found = {}
    with contextlib.suppress(OSError):
        for entry in sorted(os.listdir(folder)):
            match = _TEMPORARY.fullmatch(entry)
            if match and _gone(match[2], int(match[3])):
                found.setdefault(match[1], []).append(os.path.join(folder, entry))
    return found


def remove_temporaries_of(found: dict[str, list[str]], name: str) -> list[str]:
    """Delete the leftovers in `found` (`temporaries`) of the file `name` (or of a file whose name shares
    its first 225 bytes); the paths removed. A writer calls it as it writes `name`. Best effort: one that
    cannot be removed (another user's, in a shared folder) stays."""
    removed = []
    for path in found.pop(_stem(name), ()):
        with contextlib.suppress(OSError):
            os.remove(path)
            removed.append(path)
    return removed


def remove_temporaries(folder, names) -> list[str]:
    """Delete the leftovers of killed writes of the files `names` in `folder`; the paths removed."""
    found = temporaries(folder)
    return [path for name in names for path in remove_temporaries_of(found, name)]


# The temporary adds at most 30 bytes to a name (`.` + stem + `.hhhhhh-<pid up to 10 digits>.xxxxxx.tmp`):
# a valid long output name (up to the common 255-byte limit) must not fail for its temporary's.
_STEM_BYTES = 255 - 30


def _stem(name: str) -> str:
    """`name` as its temporary's stem: cut to at most _STEM_BYTES bytes, at a character boundary (a cut
    through a UTF-8 sequence makes a name some file systems refuse)."""
    while len(name.encode(errors="surrogateescape")) > _STEM_BYTES:
        name = name[:-1]
    return name


def _mode_for(path: str) -> int:
    """The permissions the file at `path` has, or a new file's under the umask: writers such as
    safetensors create their file 0600, which the rename would otherwise carry onto `path`."""
    with contextlib.suppress(FileNotFoundError):
        return os.stat(path).st_mode & 0o7777
    return 0o666 & ~_umask()


def _umask() -> int:
    """The process's umask. Linux reports it; elsewhere reading it means setting it for a moment, which
    could give a file another thread creates just then the wrong permissions."""
    with contextlib.suppress(OSError, ValueError, StopIteration), open("/proc/self/status") as f:
        return int(next(line for line in f if line.startswith("Umask:")).split()[1], 8)
    umask = os.umask(0o22)
    os.umask(umask)
    return umask


def write_json(path, obj, indent: int = 1) -> None:
    """json.dump(obj) to `path` atomically; objects JSON cannot encode are written as str()."""
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=indent, default=str)


def holds_json_keys(path, keys) -> bool:
    """Whether the file at `path` is a JSON object with every key of `keys`: how a tool recognises a file
    it wrote (and may replace)."""
    try:
        with open(path) as f:
            obj = json.load(f)
    except (OSError, ValueError):  # a folder, unreadable, not JSON (a UnicodeDecodeError is a ValueError)
        return False
    return isinstance(obj, dict) and all(k in obj for k in keys)


def _nearest_entry(path) -> str:
    """`path` made absolute, or the nearest folder above it that exists (a link counts, broken or not)."""
    entry = os.path.abspath(path)
    while not os.path.lexists(entry):
        entry = os.path.dirname(entry)
    return entry


NAME_MAX = 255  # bytes in a file name on ext4, XFS and btrfs (APFS and NTFS count characters)


def _long_name_problem(path: str, flag: str, entry: str | None = None) -> str | None:
    """Why `path` can never be created: a name in it that does not exist yet is longer than NAME_MAX
    bytes (the OS then says only ENAMETOOLONG, and only once a run writes there, after its work). Names
    that exist are left alone: file systems that count characters (APFS, NTFS) hold longer ones.
    entry: `_nearest_entry(path)`, where the caller has it."""
    to_create = os.path.relpath(os.path.abspath(path), entry or _nearest_entry(path))
    for name in to_create.replace(os.altsep or os.sep, os.sep).split(os.sep):
        if (size := len(name.encode(errors="surrogateescape"))) > NAME_MAX:
            return (
                f"{flag} {path!r}: the name {name[:20]!r}... is {size} bytes, longer than the {NAME_MAX} "
                "bytes file systems allow"
            )
    return None


def folder_problem(path, flag: str) -> str | None:
    """Why `path` (given by the option `flag`) cannot be an output folder: it is empty, or a name in it
    is too long, or it or a folder above it is a broken link, or it exists and is not a folder, or lies
    below a file. None when it is one or can be created."""
    path = os.fspath(path)
    if not path:
        return f"{flag} is empty: name a folder"
    entry = _nearest_entry(path)
    if problem := _long_name_problem(path, flag, entry):
        return problem
    if not os.path.exists(entry):
        named = "" if entry == os.path.abspath(path) else f": {entry!r}"
        return f"{flag} {path!r}{named} is a broken symbolic link"
    if not os.path.isdir(entry):
        if entry == os.path.abspath(path):
            return f"{flag} {path!r} exists and is not a folder"
        return f"{flag} {path!r}: {entry!r} is a file, not a folder"
    return None


@contextlib.contextmanager
def _probe(folder, stem: str):
    """A hidden empty file `.<stem>.<12 hex digits>.tmp` created in `folder` (or the nearest folder above
    it that exists) for the block, then removed; yields (that folder, the file's name)."""
    folder, name = _nearest_entry(folder), f".{stem}.{uuid.uuid4().hex[:12]}.tmp"
    with open(os.path.join(folder, name), "xb"):
        pass
    try:
        yield folder, name
    finally:
        os.remove(os.path.join(folder, name))


def writable_problem(folder, flag: str) -> str | None:
    """Why no file can be written into `folder` (given by the option `flag`; it or the nearest folder
    above it that exists, where it would be created): found by writing and removing a hidden temporary,
    as the permissions alone do not tell (an immutable folder, a read-only file system). None when it
    can. Assumes `folder_problem` found none."""
    try:
        with _probe(folder, "write-test"):
            pass
    except OSError as e:
        return f"{flag} {os.fspath(folder)!r} cannot be written to ({e.strerror or e})"
    return None


def folds_case(folder) -> bool:
    """Whether the file system of `folder` (or of the nearest folder above it that exists) takes names
    that differ only in case for one file, as macOS, Windows and FAT do by default: found by writing a
    hidden temporary with an upper-case name and looking for it by its lower-case one. Assumes
    `writable_problem` found none."""
    with _probe(folder, "CASE-TEST") as (where, name):
        return os.path.exists(os.path.join(where, name.lower()))


def file_path_problem(path: str) -> str | None:
    """Why no file can be written at `path` itself: it is empty or a folder (or ends as one does), or its
    folder does not exist (or is a file); None when it can be. For the API's writers, which create no
    folders."""
    if not path:
        return "it is empty; give a file name"
    if os.path.isdir(path) or path.endswith(tuple(filter(None, (os.sep, os.altsep)))):
        return "it is a folder; give a file name"
    if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
        return "its folder does not exist (or is a file)"
    return None


def check_replaceable(path: str, flag: str, what: str, ours, not_ours: str) -> None:
    """Before a run that writes the file `path`, given as option `flag`: SystemExit when it names a
    folder, or an existing file that `ours(path)` does not recognise as this tool's `what` (the message
    says it `not_ours`); never a file the user made. A name too long to create is refused too."""
    if not path:
        raise SystemExit(f"error: {flag} is empty: name the {what} to write")
    if problem := _long_name_problem(path, flag):
        raise SystemExit(f"error: {problem}")
    if path.endswith((os.sep, "/")) or os.path.isdir(path):
        raise SystemExit(f"error: {flag} {path!r} is a folder; it names the {what} to write")
    if os.path.exists(path) and not os.path.isfile(path):  # reading a pipe to recognise it would hang
        raise SystemExit(
            f"error: {flag} {path!r} is not a regular file (a pipe or a device); it names the {what} to write"
        )
    if os.path.exists(path) and not ours(path):
        raise SystemExit(f"error: {flag} {path!r} exists and {not_ours}: remove it or choose another {flag}")
