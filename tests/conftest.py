import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def repo_root():
    return ROOT


@pytest.fixture(scope="session")
def netdir(tmp_path_factory):
    """Networks for both tiny SD1 and SDXL trees: {name: path}."""
    from netweave.devtools.synthetic import write_network
    from tinymodels import ldm_trees
    root = tmp_path_factory.mktemp("loras")
    for arch in ("sd1", "sdxl"):
        trees = ldm_trees(arch)
        for fmt, seed in (("lora", 1), ("loha", 2), ("full", 3), ("lokr", 4), ("norm", 5)):
            write_network(root / f"{arch}_{fmt}.safetensors", trees, fmt, "kohya", arch, seed=seed)
    return root


# ---- slow checks, run in a sample ------------------------------------------------------
# A test marked `slow` repeats what faster tests check on a bigger model or more cases. The
# default run keeps a sample of them (one in SLOW_SAMPLE, drawn by the day, so every one
# runs within a few days of CI); NETWEAVE_SLOW=all runs them all, NETWEAVE_SLOW=none none,
# NETWEAVE_SLOW=<word> draws the sample of that word (the header says today's). A test named
# on the command line (path::name) always runs.
SLOW_SAMPLE = 4
LEFT_OUT = pytest.StashKey[tuple]()  # (the sample's word, how many slow checks it left out)


def _slow_mode() -> str:
    import datetime
    return os.environ.get("NETWEAVE_SLOW") or datetime.date.today().isoformat()


def _in_sample(nodeid: str, word: str) -> bool:
    import zlib
    return zlib.crc32(f"{word}:{nodeid}".encode()) % SLOW_SAMPLE == 0


def _as_nodeid(config, arg: str) -> str:
    path, rest = arg.split("::", 1)
    return os.path.relpath(os.path.abspath(path), str(config.rootpath)) + "::" + rest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: a check sampled in the default run "
                            "(NETWEAVE_SLOW=all runs every one; see tests/conftest.py)")


def pytest_collection_modifyitems(config, items):
    mode = _slow_mode()
    if mode == "all":
        return
    named = tuple(_as_nodeid(config, a) for a in config.args if "::" in a)
    keep, drop = [], []
    for item in items:
        runs = item.get_closest_marker("slow") is None or item.nodeid.startswith(named) or \
            (mode != "none" and _in_sample(item.nodeid, mode))
        (keep if runs else drop).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
    config.stash[LEFT_OUT] = (mode, len(drop))


def pytest_report_header(config):
    return f"slow checks: a sample (NETWEAVE_SLOW={_slow_mode()}; =all runs every one)"


def pytest_terminal_summary(terminalreporter, config):
    mode, dropped = config.stash.get(LEFT_OUT, (None, 0))
    if dropped:
        terminalreporter.write_line(f"{dropped} slow checks outside today's sample "
                                    f"(NETWEAVE_SLOW={mode}) were not run; NETWEAVE_SLOW=all "
                                    "runs them")
