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


def test_a_link_is_written_through(tmp_path):
    (tmp_path / "real").mkdir()
    target = tmp_path / "real" / "p.csv"
    target.write_text("old")
    os.symlink(target, tmp_path / "link.csv")
    with atomic_path(tmp_path / "link.csv") as tmp, open(tmp, "w") as f:
        f.write("new")
    assert os.path.islink(tmp_path / "link.csv") and target.read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["link.csv", "real"] and os.listdir(tmp_path / "real") == ["p.csv"]
