"""The fine-tuning API's durable records (`adapterkit.serve.ft_store`) on a real directory: what a
process killed at any point leaves behind is either a whole record or nothing visible."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from adapterkit.serve.ft_store import FTStore, JSONLError, validate_jsonl, write_atomic


def test_write_atomic_keeps_the_old_content_when_the_write_fails(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "job.json"
    write_atomic(f, b"old")

    def boom(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        write_atomic(f, b"new")
    assert f.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["job.json"]  # no temp left behind


def test_a_torn_event_line_is_dropped_and_the_next_event_stands_alone(tmp_path: Path) -> None:
    s = FTStore(tmp_path)
    s.create_job({"id": "ftjob-a", "created_at": 1, "status": "running"}, {"job_id": "ftjob-a"})
    s.append_event("ftjob-a", {"id": "e1"})
    with open(tmp_path / "jobs" / "ftjob-a" / "events.jsonl", "ab") as f:
        f.write(b'{"id": "e2", "mess')  # the process was killed mid-write
    s.append_event("ftjob-a", {"id": "e3"})
    assert [e["id"] for e in FTStore(tmp_path).events("ftjob-a")] == ["e1", "e3"]


def test_leftovers_of_a_killed_process_are_cleaned_at_start(tmp_path: Path) -> None:
    s = FTStore(tmp_path)
    kept = s.add_file("a.jsonl", "fine-tune", b'{"prompt": "a", "completion": "b"}\n')
    (tmp_path / "files" / "file-orphan.jsonl").write_bytes(b"x")  # killed before its record
    (tmp_path / "files" / ".file-x.json.tmp-12345678").write_bytes(b"{")  # killed mid-write
    (tmp_path / "jobs" / "ftjob-half").mkdir()  # killed between spec and job record
    (tmp_path / "jobs" / "ftjob-half" / "spec.json").write_text("{}")
    s2 = FTStore(tmp_path)
    assert sorted(p.name for p in (tmp_path / "files").iterdir()) == [f"{kept['id']}.json", f"{kept['id']}.jsonl"]
    assert not (tmp_path / "jobs" / "ftjob-half").exists()
    assert [f["id"] for f in s2.list_files()] == [kept["id"]]
    assert s2.file_content(kept["id"]) == b'{"prompt": "a", "completion": "b"}\n'


def test_records_survive_a_new_store_and_ids_cannot_escape(tmp_path: Path) -> None:
    s = FTStore(tmp_path)
    s.create_job({"id": "ftjob-b", "created_at": 5, "status": "queued"}, {"job_id": "ftjob-b", "seed": 1})
    s.update_job("ftjob-b", status="running")
    s.set_checkpoints("ftjob-b", [{"id": "ck", "step_number": 2}])
    s2 = FTStore(tmp_path)
    assert s2.get_job("ftjob-b")["status"] == "running" and s2.job_spec("ftjob-b")["seed"] == 1
    assert s2.checkpoints("ftjob-b") == [{"id": "ck", "step_number": 2}]
    for bad in ("../files", "ftjob-b/../../x", "", "a" * 100):
        assert s2.get_job(bad) is None and s2.get_file(bad) is None
    assert json.loads((tmp_path / "jobs" / "ftjob-b" / "job.json").read_text())["id"] == "ftjob-b"


def test_validate_jsonl_accepts_both_formats_and_blank_lines() -> None:
    rows = [{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                          {"role": "assistant", "content": "a", "weight": 1}]},
            {"prompt": "p\u2028q\x85", "completion": "c"}]  # separators str.splitlines would split at
    data = ("\r\n".join(json.dumps(r, ensure_ascii=False) for r in rows) + "\n\n").encode()
    assert validate_jsonl(data) == rows
    with pytest.raises(JSONLError) as ei:
        validate_jsonl(data + b'{"messages": [{"role": "asistant", "content": "a"}]}\n')
    assert ei.value.line == 4 and "'assistant'" in str(ei.value)
