#!/usr/bin/env bash
# Creates .venv beside this file and installs NetWeave with its pinned development tools.
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
