"""A short soak (tests/soak.py runs the long one): random tags and injected failures; every
generation ends with pristine weights, no hook left, bounded memory; a file truncated while it
is read never kills the process."""
import pytest

from soak import soak


@pytest.mark.slow
def test_short_soak():
    n = 60
    counts = soak(n, seed=7)
    assert counts["bit-exact after"] == n and counts["no hook left"] == n
    assert counts["finished"] > n // 2 and counts["with tag problems"] > 0
    for failure in ("callback", "interrupt", "oom", "vanish", "rewrite", "interrupts"):
        assert counts[f"injected: {failure}"] > 0, counts
    assert counts["failed: out of memory"] == counts["injected: oom"]
    assert counts["rss last MiB"] - counts["rss first MiB"] < 150, counts
