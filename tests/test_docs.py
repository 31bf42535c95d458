"""The docs site builds (MkDocs + mkdocstrings, strict: no warnings), a broken reference
fails it, and the public API's functions carry Google-style Args/Returns sections."""
from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import adapterkit.api as api

ROOT = Path(__file__).resolve().parents[1]
pytest.importorskip("mkdocstrings_handlers.python", reason="docs need mkdocs and mkdocstrings[python]")


def build(root: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHON": sys.executable}
    return subprocess.run(["bash", str(root / "docs" / "build.sh"), str(site)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)


def test_docs_build_without_warnings(tmp_path) -> None:
    r = build(ROOT, tmp_path / "site")
    log = r.stdout + r.stderr
    assert r.returncode == 0, log
    assert "WARNING" not in log, log
    page = (tmp_path / "site" / "api" / "adapters" / "index.html").read_text()
    for name in ("add_adapter", "load_adapter", "disable_adapters", "merge_into_base", "combine_adapters"):
        assert f'id="adapterkit.api.{name}"' in page, name
    assert "Raises:" in page or "Raises" in page


def test_a_missing_reference_fails_the_build(tmp_path) -> None:
    copy = tmp_path / "repo"
    shutil.copytree(ROOT / "docs", copy / "docs")
    (copy / "mkdocs.yml").write_text((ROOT / "mkdocs.yml").read_text().replace(
        "paths: [src]", f"paths: [{ROOT / 'src'}]"))
    with open(copy / "docs" / "api" / "adapters.md", "a") as f:
        f.write("\nSee [this][adapterkit.api.no_such_function].\n")
    r = build(copy, tmp_path / "site")
    assert r.returncode != 0
    assert "Could not find cross-reference target 'adapterkit.api.no_such_function'" in r.stdout + r.stderr


PUBLIC = [n for n in api.__all__ if inspect.isfunction(getattr(api, n)) and n not in ("merge", "unmerge",
                                                                                     "merge_adapters")]


@pytest.mark.parametrize("name", PUBLIC)
def test_public_functions_have_google_style_sections(name: str) -> None:
    fn = getattr(api, name)
    doc = inspect.getdoc(fn) or ""
    params = [p for p in inspect.signature(fn).parameters if p not in ("self",)]
    if params:
        assert "\nArgs:\n" in doc, name
        for p in params:
            assert f"    {p}:" in doc, (name, p)
    if inspect.signature(fn).return_annotation not in (None, "None", "Iterator[None]"):
        assert "\nReturns:\n" in doc, name
