#!/usr/bin/env bash
# Build the documentation site (MkDocs + mkdocstrings) into ${1:-build/site}.
# --strict: any warning (a broken link, a reference mkdocstrings cannot resolve, a
# docstring whose Args do not match the signature) fails the build.
# Needs: mkdocs, mkdocstrings[python] (in .venv, or the python given as $PYTHON).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
exec "$PY" -m mkdocs build --strict --clean --site-dir "${1:-build/site}"
