"""docs/migrating-from-peft.md: every snippet runs (PEFT's with the real peft package), and
the hidden ``<!-- check ... -->`` blocks assert that both sides agree."""
from __future__ import annotations

import contextlib
import io
import re
from pathlib import Path

import pytest

GUIDE = Path(__file__).resolve().parents[1] / "docs" / "migrating-from-peft.md"
_ITEM = re.compile(r"```python\n(.*?)```|<!-- check\n(.*?)-->", re.S)


def sections() -> dict[str, str]:
    parts = re.split(r"^## ", GUIDE.read_text(), flags=re.M)[1:]
    return {p.split("\n", 1)[0].strip(): p for p in parts}


def items(text: str) -> list[tuple[str, str]]:
    """(kind, code) in document order: kind is "PEFT", "adapterkit" or "check"."""
    out = []
    for m in _ITEM.finditer(text):
        if m.group(1) is not None:
            code = m.group(1)
            first = code.split("\n", 1)[0].strip()
            kind = "PEFT" if first == "# PEFT" else "adapterkit" if first == "# adapterkit" else "setup"
            out.append((kind, code))
        else:
            out.append(("check", m.group(2)))
    return out


SECTIONS = sections()
CALLS = [t for t in SECTIONS if re.match(r"\d+\. ", t)]


def test_the_guide_covers_15_calls_side_by_side() -> None:
    assert len(CALLS) == 15
    for title in CALLS:
        kinds = [k for k, _ in items(SECTIONS[title])]
        assert "PEFT" in kinds and "adapterkit" in kinds, title


@pytest.mark.parametrize("title", CALLS)
def test_snippets_run_and_agree(title: str, tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    ns: dict = {"__name__": "guide"}
    (setup_kind, setup), = items(SECTIONS["Setup used by the snippets"])
    exec(compile(setup, f"{GUIDE.name}:setup", "exec"), ns)
    ns["OUT"] = {}
    for kind, code in items(SECTIONS[title]):
        buf = io.StringIO()
        with contextlib.redirect_stdout(buf):
            exec(compile(code, f"{GUIDE.name}:{title}:{kind}", "exec"), ns)
        if kind != "check":
            ns["OUT"][kind] = buf.getvalue()
