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
