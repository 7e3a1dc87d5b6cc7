"""install.py installs lark through the host's launch.run_pip, and only when it is missing."""
import os
import re
import runpy
import sys
import types


def _run_install(repo_root, installed):
    calls = []
    launch = types.ModuleType("launch")  # stand-in for A1111's launch module (hosts.md §2.2)
    launch.is_installed = lambda name: name in installed
    launch.run_pip = lambda command, desc=None: calls.append((command, desc))
    old = sys.modules.get("launch")
    sys.modules["launch"] = launch
    try:
        runpy.run_path(os.path.join(repo_root, "install.py"), run_name="__main__")
    finally:
        if old is None:
            del sys.modules["launch"]
        else:
            sys.modules["launch"] = old
    return calls


def test_installs_lark_when_missing(repo_root):
    calls = _run_install(repo_root, installed=set())
    assert len(calls) == 1
    assert calls[0][0].startswith("install lark==")


def test_installs_nothing_when_present(repo_root):
    assert _run_install(repo_root, installed={"lark"}) == []


def test_lark_pin_matches_pyproject(repo_root):
    pyproject = open(os.path.join(repo_root, "pyproject.toml"), encoding="utf-8").read()
    install = open(os.path.join(repo_root, "install.py"), encoding="utf-8").read()
    pin = re.search(r'"(lark==[^"]+)"', pyproject).group(1)
    assert pin in install
