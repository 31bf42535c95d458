#!/usr/bin/env bash
# Write the pip constraints lock (requirements/lock.txt) from what a venv holds: every installed
# distribution at its exact version, adapterkit itself (editable) left out. Usage: write_lock.sh PYTHON OUT
set -euo pipefail
py="$1"; out="$2"
tmp="$(mktemp "${out}.tmp-XXXXXX")"
trap 'rm -f "$tmp"' EXIT
{
  echo "# Tested versions: pip constraints for 'pip install -c $(basename "$out")' (Makefile)."
  echo "# Written by tools/write_lock.sh ('make lock' / 'make upgrade'); edit pyproject.toml, not this."
  echo "# $("$py" -c 'import platform; print("python", platform.python_version(), platform.machine())')"
  "$py" -m pip freeze --exclude-editable --disable-pip-version-check 2>/dev/null \
    | grep -v -e '^#' -e '^-e ' -e ' @ ' | sed -E 's/\+cpu$//' | LC_ALL=C sort -f
} > "$tmp"
mv "$tmp" "$out"
echo "wrote $out ($(grep -vc '^#' "$out") packages)"
