"""Files written whole or not at all (`moeut_dist.atomic_files`)."""

from __future__ import annotations

import json

import pytest

from moeut_dist.atomic_files import write_atomically, write_json_atomically


def test_failed_write_keeps_the_old_file_and_leaves_no_partial_one(tmp_path):
    path = tmp_path / "state.json"
    write_json_atomically(path, {"step": 1})

    def fail_halfway(temporary):
        temporary.write_text('{"step": ')
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, fail_halfway)
    assert json.loads(path.read_text()) == {"step": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
