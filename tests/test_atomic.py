"""fastvit_style.atomic: names and links (interrupted writes and permissions: test_weights.py)."""

import errno
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import ended_pid, leftover_name

from fastvit_style import atomic
from fastvit_style.atomic import (
    _HOST,
    _stem,
    atomic_path,
    holds_json_keys,
    remove_temporaries,
    writable_problem,
    write_json,
)


def test_a_long_valid_name_is_written_and_its_leftover_temporary_found(tmp_path):
    """A 250-byte name is valid (the usual limit is 255); its temporary, up to 30 bytes longer, must fit too."""
    name = "é" * 100 + "a" * 46 + ".json"  # 251 bytes, 151 characters
    assert len(name.encode()) == 251
    write_json(tmp_path / name, {"a": 1})
    assert os.listdir(tmp_path) == [name]
    leftover = tmp_path / leftover_name(name)  # of a run killed mid-write
    leftover.write_bytes(b"")
    assert remove_temporaries(tmp_path, [name]) == [str(leftover)]
    # Only names of the whole pattern go: a user's file that merely starts like one stays.
    kept = tmp_path / (leftover_name("b.json") + ".bak")
    kept.write_bytes(b"mine")
    assert remove_temporaries(tmp_path, ["b.json"]) == [] and kept.read_bytes() == b"mine"


def test_a_long_name_is_cut_at_a_character_boundary():
    name = "é" * 122 + ".csv"  # 248 bytes: the 225-byte cut falls inside an é
    assert _stem(name) == "é" * 112 and len(_stem(name).encode()) == 224


def test_a_link_is_replaced_and_its_target_left_alone(tmp_path):
    (tmp_path / "elsewhere").mkdir()
    target = tmp_path / "elsewhere" / "p.csv"
    target.write_text("old")
    os.symlink(target, tmp_path / "link.csv")
    with atomic_path(tmp_path / "link.csv") as tmp, open(tmp, "w") as f:
        f.write("new")
    assert not os.path.islink(tmp_path / "link.csv") and (tmp_path / "link.csv").read_text() == "new"
    assert target.read_text() == "old" and os.listdir(tmp_path / "elsewhere") == ["p.csv"]


def test_the_temporary_reaches_the_disk_before_it_replaces_the_file(tmp_path, monkeypatch):
    """fsync of the written temporary, then the rename, then fsync of the folder (the rename's entry): a
    power cut never leaves the name pointing at data still in the page cache."""
    events, fsync, replace = [], os.fsync, os.replace

    def recording_fsync(fd):
        events.append(("fsync", os.fstat(fd).st_ino))
        fsync(fd)

    def recording_replace(src, dst):
        events.append(("replace", os.stat(src).st_ino))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "replace", recording_replace)
    write_json(tmp_path / "a.json", {"a": 1})
    written = os.stat(tmp_path / "a.json").st_ino
    assert events[:2] == [("fsync", written), ("replace", written)]
    if hasattr(os, "O_DIRECTORY"):
        assert events[2:] == [("fsync", os.stat(tmp_path).st_ino)]


def test_a_links_temporary_is_written_beside_the_link(tmp_path):
    """Never in the target's folder: a kill mid-write would leave it where remove_temporaries never looks."""
    (tmp_path / "elsewhere").mkdir()
    os.symlink(tmp_path / "elsewhere" / "p.csv", tmp_path / "link.csv")
    with atomic_path(tmp_path / "link.csv") as tmp:
        assert os.path.dirname(tmp) == str(tmp_path)
        with open(tmp, "w") as f:
            f.write("new")
    assert os.listdir(tmp_path / "elsewhere") == []


def test_only_the_named_files_temporaries_are_removed(tmp_path):
    """A name is matched as it is written: the dot of 'last.pt' is no wildcard."""
    ours, mine = tmp_path / leftover_name("last.pt"), tmp_path / leftover_name("lastXpt")
    for path in (ours, mine):
        path.write_bytes(b"")
    assert remove_temporaries(tmp_path, ["last.pt"]) == [str(ours)]
    assert os.listdir(tmp_path) == [mine.name]


def test_a_single_files_write_removes_what_a_killed_write_of_it_left(tmp_path):
    """remove_leftovers (weights, checkpoints, style banks, the tta CSV): a SIGKILL mid-write leaves a
    temporary as large as the file, which the next write of that file removes; other files' stay."""
    ours, other = tmp_path / leftover_name("w.safetensors"), tmp_path / leftover_name("v.safetensors")
    for path in (ours, other):
        path.write_bytes(b"partial")
    with atomic_path(tmp_path / "w.safetensors") as tmp, open(tmp, "wb") as f:
        f.write(b"1")
    assert ours.exists()  # not asked: writers of many files in one folder list it once themselves
    with atomic_path(tmp_path / "w.safetensors", remove_leftovers=True) as tmp, open(tmp, "wb") as f:
        f.write(b"2")
    assert sorted(os.listdir(tmp_path)) == [other.name, "w.safetensors"]


def test_a_live_writers_temporary_is_never_removed(tmp_path):
    """Two writers of one file (every rank saving, two jobs): the second's cleanup leaves the first's
    temporary, whose writer still runs, also after that writer (safetensors) renamed a file of its own
    onto it, and both writes succeed (the last rename wins). Another live process's temporary and
    another host's stay too."""
    target = tmp_path / "bank.safetensors"
    first = atomic_path(target, remove_leftovers=True)
    tmp = first.__enter__()
    (tmp_path / ".own").write_bytes(b"first")
    os.replace(tmp_path / ".own", tmp)
    with atomic_path(target, remove_leftovers=True) as second, open(second, "wb") as f:
        f.write(b"second")
    assert os.path.exists(tmp)
    first.__exit__(None, None, None)
    assert target.read_bytes() == b"first" and os.listdir(tmp_path) == [target.name]
    with subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"]) as running:
        try:
            theirs = tmp_path / leftover_name(target.name, pid=running.pid)
            elsewhere = tmp_path / leftover_name(target.name).replace(_HOST, "zzzzzz")
            for path in (theirs, elsewhere):
                path.write_bytes(b"")
            assert remove_temporaries(tmp_path, [target.name]) == []
        finally:
            running.kill()
    assert theirs.exists() and elsewhere.exists()


def test_a_writer_is_named_by_its_pid_at_the_write(tmp_path, monkeypatch):
    """The pid is read at each write: a child forked from this process (a worker) that dies mid-write
    leaves a temporary of its own pid, which the parent's next write of that file removes (it carried
    the parent's, which a live parent would never clean). The child is stood in for by getpid."""
    target = tmp_path / "w.json"
    with monkeypatch.context() as child:
        child.setattr(os, "getpid", ended_pid)
        writing = atomic_path(target)  # never finished, as under SIGKILL
        with open(writing.__enter__(), "w") as f:
            f.write("partial")
    (leftover,) = os.listdir(tmp_path)
    assert f"-{ended_pid()}." in leftover
    write_json(target, {"a": 1})
    assert sorted(os.listdir(tmp_path)) == [leftover, "w.json"]  # not asked: write_json cleans nothing
    with atomic_path(target, remove_leftovers=True) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert os.listdir(tmp_path) == ["w.json"]


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_write(tmp_path, monkeypatch):
    """Another user's leftover in a shared (sticky) folder cannot be removed: the cleanup is best
    effort, the write goes on."""
    leftover = tmp_path / leftover_name("w.json")
    leftover.write_bytes(b"theirs")
    real_remove = os.remove

    def remove(path):
        if os.fspath(path) == str(leftover):
            raise PermissionError(1, "Operation not permitted", str(path))
        real_remove(path)

    monkeypatch.setattr(os, "remove", remove)
    with atomic_path(tmp_path / "w.json", remove_leftovers=True) as tmp, open(tmp, "w") as f:
        f.write("{}")
    assert (tmp_path / "w.json").read_text() == "{}" and leftover.read_bytes() == b"theirs"


def test_a_name_that_is_not_utf8_is_written(tmp_path):
    """A file name from a non-UTF-8 file system reaches Python with surrogate escapes."""
    name = os.fsdecode(b"caf\xe9.json")
    write_json(tmp_path / name, {"a": 1})
    assert os.listdir(tmp_path) == [name]


def test_a_new_file_gets_the_umasks_permissions(tmp_path):
    umask = os.umask(0o027)
    try:
        write_json(tmp_path / "a.json", {"a": 1})
    finally:
        os.umask(umask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o640


def test_a_json_file_is_recognised_by_all_its_keys(tmp_path):
    path = tmp_path / "c.json"
    for content, expected in [
        ({"data": 1, "out": 2, "extra": 3}, True),
        ({"data": 1}, False),  # one key of two: another tool's file
        (["data", "out"], False),  # the names, but no object
    ]:
        path.write_text(json.dumps(content))
        assert holds_json_keys(path, ("data", "out")) is expected, content
    path.write_bytes(b"\xff\xfe not text")
    assert not holds_json_keys(path, ("data",)) and not holds_json_keys(tmp_path, ("data",))


def test_the_write_check_leaves_nothing_behind(tmp_path):
    assert writable_problem(tmp_path, "--out") is None
    assert writable_problem(tmp_path / "new" / "sub", "--out") is None  # probed where it would be created
    assert os.listdir(tmp_path) == []


def test_only_names_still_to_create_are_held_to_name_max(tmp_path, monkeypatch):
    """A name that exists fits its file system (APFS and NTFS count characters, not bytes): only the
    names an output would create are checked against NAME_MAX, also after a '/' on Windows."""
    monkeypatch.setattr(atomic, "NAME_MAX", 10)
    existing = tmp_path / "eleven_byte"
    existing.mkdir()
    assert atomic.folder_problem(str(existing / "new"), "--out") is None
    assert "is 11 bytes, longer than the 10" in atomic.folder_problem(str(existing / "eleven_byte"), "--out")
    assert "is 11 bytes" in atomic.folder_problem(f"{tmp_path}/new/eleven_byte", "--out")


def test_a_failed_write_names_the_target_and_leaves_no_temporary(tmp_path):
    """Python's write errors name no file and the OS's open names the hidden temporary: every atomic write
    (images, CSV, banks, checkpoints) raises an OSError naming the target instead; torch's zip writer
    wraps such an error (or a Ctrl-C) in a RuntimeError, which is unwrapped."""
    target = tmp_path / "out.png"
    full = OSError(errno.ENOSPC, "No space left on device")
    message = re.escape(f"[Errno 28] No space left on device: '{target}'")
    with pytest.raises(OSError, match=message), atomic_path(target) as tmp, open(tmp, "wb") as f:
        f.write(b"partial")
        raise full
    for context in (full, KeyboardInterrupt()):
        with pytest.raises(type(context)) as raised, atomic_path(target) as tmp:
            try:
                raise context
            except BaseException:
                raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos") from None
        assert isinstance(context, KeyboardInterrupt) or str(target) in str(raised.value)
    with pytest.raises(ValueError, match="not a write error"), atomic_path(target):
        raise ValueError("not a write error")
    assert os.listdir(tmp_path) == []
