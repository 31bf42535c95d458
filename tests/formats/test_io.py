"""Atomic saves under hostile conditions: writers killed by SIGKILL, concurrent writers of
one target, a full disk. Real processes and a real (tiny) tmpfs, no mocks of the OS."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import adapterkit as ak
from adapterkit.errors import AdapterFileError
from adapterkit.formats import io as fio
from adapterkit.formats import read_adapter

# A child process: a real save_adapter of ~16 MB of LoRA tensors (r=1024 on two 1024x1024
# Linears). "pause": stop inside the save once the weights are in the temp dir and wait to
# be killed; "loop": save over and over (killed at a random moment); "live": hold a
# temp dir open through atomic_dir until the parent says go, then finish normally.
CHILD = textwrap.dedent("""
    import sys, time
    import torch
    from torch import nn
    import adapterkit as ak
    from adapterkit.formats import io as fio, native

    mode, target = sys.argv[1], sys.argv[2]
    if mode == "live":
        with fio.atomic_dir(target) as tmp:
            (tmp / "who").write_text("child")
            print("READY", tmp, flush=True)
            sys.stdin.readline()
        sys.exit(0)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1024, 1024), nn.Linear(1024, 1024))
    ak.add_adapter(model, "big", ak.LoRAConfig(r=1024, targets=["0", "1"]))
    if mode == "pause":
        def stall(path, data):
            print("READY", path.parent, flush=True)
            time.sleep(120)
        native.write_json = stall  # weights written, config not yet: mid-save
        ak.save_adapter(model, "big", target)
    else:
        print("READY", flush=True)
        while True:
            ak.save_adapter(model, "big", target)
""")


def _base() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 32))


def _small(seed: int = 0) -> nn.Module:
    model = _base()
    torch.manual_seed(seed)
    ak.add_adapter(model, "a", ak.LoRAConfig(r=4, targets=["0", "1"]))
    with torch.no_grad():
        for p in ak.api.adapter_parameters(model, "a").values():
            p.normal_()
    return model


def _spawn(tmp_path: Path, mode: str, target: Path) -> subprocess.Popen:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    return subprocess.Popen([sys.executable, str(script), mode, str(target)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ready(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()  # blocks until the child prints (or dies: "")
    assert line.startswith("READY"), f"child failed: {line!r} {proc.stderr.read()}"
    return line.split(" ", 1)[1].strip() if " " in line else ""


def _temps(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".tmp-" in p.name or ".old-" in p.name)


def _kill(proc: subprocess.Popen) -> None:
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    proc.stdout.close()
    proc.stderr.close()
    proc.stdin.close()


def _same_as_saved(model: nn.Module, path: Path) -> None:
    saved = read_adapter(path).tensors
    want = ak.api.adapter_state_dict(model, "a")
    assert saved.keys() == want.keys()
    for k, v in want.items():
        assert torch.equal(saved[k], v.detach())


def test_saves_killed_mid_write_are_cleaned_by_the_next_save(tmp_path):
    target = tmp_path / "adapters" / "big"
    kids = [_spawn(tmp_path, "pause", target) for _ in range(2)]
    temps = [Path(_ready(k)) for k in kids]
    for t in temps:  # each killed writer holds a temp with its 16 MB of weights
        assert t.parent == target.parent and (t / "adapter.safetensors").stat().st_size > 16e6
    for k in kids:
        _kill(k)
    assert len(_temps(target.parent)) == 2 and not target.exists()

    model = _small()
    ak.save_adapter(model, "a", target)
    assert _temps(target.parent) == []
    _same_as_saved(model, target)


def test_saves_killed_at_random_moments_leave_nothing_after_next_save(tmp_path):
    target = tmp_path / "big"
    for delay in (0.0, 0.3):
        kid = _spawn(tmp_path, "loop", target)
        _ready(kid)
        deadline = time.monotonic() + 60
        while not _temps(tmp_path) and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(delay)
        _kill(kid)
    model = _small()
    ak.save_adapter(model, "a", target)
    assert _temps(tmp_path) == []
    _same_as_saved(model, target)


def test_a_live_concurrent_writers_temp_is_not_removed(tmp_path):
    target = tmp_path / "shared"
    kid = _spawn(tmp_path, "live", target)
    try:
        child_tmp = Path(_ready(kid))
        model = _small()
        ak.save_adapter(model, "a", target)  # runs the stale-temp cleanup of this target
        assert (child_tmp / "who").read_text() == "child", "a live writer's temp was removed"
        _same_as_saved(model, target)
        kid.stdin.write("go\n")
        kid.stdin.flush()
        assert kid.wait(timeout=30) == 0, kid.stderr.read()
    finally:
        if kid.poll() is None:
            kid.kill()
            kid.wait()
    assert (target / "who").read_text() == "child"  # last writer wins, whole
    assert _temps(tmp_path) == []


def test_cleanup_touches_only_its_own_targets_temps(tmp_path):
    # unlocked dirs named like temps are what a killed writer leaves behind
    own = Path(tempfile.mkdtemp(prefix=".a.tmp-", dir=tmp_path))
    other = Path(tempfile.mkdtemp(prefix=".b.tmp-", dir=tmp_path))
    lookalike = Path(tempfile.mkdtemp(prefix=".a.tmp-x.tmp-", dir=tmp_path))  # a temp of target "a.tmp-x"
    notes = tmp_path / ".a.tmp-notes"
    notes.mkdir()
    ak.save_adapter(_small(), "a", tmp_path / "a")
    assert not own.exists()
    assert other.exists() and lookalike.exists() and notes.exists()


def test_new_temp_removed_by_a_racing_cleanup_is_replaced(tmp_path, monkeypatch):
    """The window between mkdtemp and flock: another save's cleanup sees the new temp
    unlocked and removes it; the writer must notice and take a fresh one."""
    target = tmp_path / "t"
    real = tempfile.mkdtemp
    calls = []

    def mkdtemp_then_race(*a, **k):
        d = real(*a, **k)
        calls.append(d)
        if len(calls) == 1:
            assert fio.clean_stale_temps(target) == [Path(d)]
        return d

    monkeypatch.setattr(fio.tempfile, "mkdtemp", mkdtemp_then_race)
    model = _small()
    ak.save_adapter(model, "a", target)
    assert len(calls) == 2 and not Path(calls[0]).exists()
    _same_as_saved(model, target)


# -- a full disk: a real 1 MiB tmpfs ----------------------------------------------------------
@pytest.fixture
def tiny_disk(tmp_path):
    disk = tmp_path / "disk"
    disk.mkdir()
    if os.name != "posix" or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def _big() -> nn.Module:  # ~2 MiB of adapter tensors: does not fit in 1 MiB
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(512, 512), nn.Linear(512, 512))
    ak.add_adapter(model, "a", ak.LoRAConfig(r=256, targets=["0", "1"]))
    return model


@pytest.mark.parametrize("fmt", ["adapterkit", "peft"])
def test_full_disk_clear_error_and_previous_adapter_intact(tiny_disk, fmt):
    target = tiny_disk / "a"
    small = _small()
    ak.save_adapter(small, "a", target, format=fmt)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    with pytest.raises(AdapterFileError, match="disk is full") as e:
        ak.save_adapter(_big(), "a", target, format=fmt)
    assert str(target) in str(e.value) and "unchanged" in str(e.value)
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert _temps(tiny_disk) == []
    fresh = _base()
    ak.load_adapter(fresh, target, name="a")
    ak.set_adapter(fresh, "a")
    ak.set_adapter(small, "a")
    x = torch.randn(2, 32)
    torch.testing.assert_close(fresh(x), small(x), rtol=0, atol=1e-6)


def test_full_disk_on_a_first_save_leaves_nothing(tiny_disk):
    target = tiny_disk / "new"
    with pytest.raises(AdapterFileError, match="disk is full.*nothing was written"):
        ak.save_adapter(_big(), "a", target)
    assert not target.exists() and _temps(tiny_disk) == []
    ak.save_adapter(_small(), "a", target)  # the space was given back
    _same_as_saved(_small(), target)


def test_without_renameat2_the_swap_still_keeps_the_old_adapter(tmp_path, monkeypatch):
    """The fallback swap (old -> backup, new -> target): a failure between the two renames
    puts the old version back; a success leaves no backup behind."""
    monkeypatch.setattr(fio, "_exchange", lambda a, b: False)
    target = tmp_path / "a"
    old = _small()
    ak.save_adapter(old, "a", target)
    real_rename = os.rename

    def fail_new_into_place(src, dst):
        if ".tmp-" in str(src):
            raise OSError("rename failed")
        return real_rename(src, dst)

    monkeypatch.setattr(fio.os, "rename", fail_new_into_place)
    with pytest.raises(OSError, match="rename failed"):
        ak.save_adapter(_small(seed=4), "a", target)
    monkeypatch.setattr(fio.os, "rename", real_rename)
    _same_as_saved(old, target)
    assert _temps(tmp_path) == []
    new = _small(seed=5)
    ak.save_adapter(new, "a", target)
    _same_as_saved(new, target)
    assert _temps(tmp_path) == []
