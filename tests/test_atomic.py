"""fastvit_style.atomic: names and links (interrupted writes and permissions: test_weights.py)."""

import os
import uuid

from fastvit_style.atomic import _stem, atomic_path, remove_temporaries, write_json


def test_a_long_valid_name_is_written_and_its_leftover_temporary_found(tmp_path):
    """A 250-byte name is valid (the usual limit is 255); its temporary, 18 bytes longer, must fit too."""
    name = "é" * 100 + "a" * 46 + ".json"  # 251 bytes, 151 characters
    assert len(name.encode()) == 251
    write_json(tmp_path / name, {"a": 1})
    assert os.listdir(tmp_path) == [name]
    leftover = tmp_path / f".{_stem(name)}.{uuid.uuid4().hex[:12]}.tmp"  # of a run killed mid-write
    leftover.write_bytes(b"")
    assert remove_temporaries(tmp_path, [name]) == [str(leftover)]
    # Only names of the whole pattern go: a user's file that merely starts like one stays.
    kept = tmp_path / f".b.json.{uuid.uuid4().hex[:12]}.tmp.bak"
    kept.write_bytes(b"mine")
    assert remove_temporaries(tmp_path, ["b.json"]) == [] and kept.read_bytes() == b"mine"


def test_a_long_name_is_cut_at_a_character_boundary():
    name = "é" * 122 + ".csv"  # 248 bytes: the 237-byte cut falls inside an é
    assert _stem(name) == "é" * 118 and len(_stem(name).encode()) == 236


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
