"""docs/design.md §1 "One import namespace": the extension loads as `netweave` from any folder name,
while unrelated modules called `network`, `parser` and `extension` already sit in sys.modules."""
import os
import shutil
import subprocess
import sys
import textwrap

LOADER = textwrap.dedent("""
    import importlib.util, sys, types
    ext_dir = sys.argv[1]
    fakes = {}
    for name in ("network", "parser", "extension", "networks", "lora"):
        fakes[name] = sys.modules[name] = types.ModuleType(name)   # the built-in Lora's names
    sys.path.insert(0, ext_dir)                    # as A1111's load_scripts does
    path = ext_dir + "/scripts/netweave_entry.py"
    spec = importlib.util.spec_from_file_location("netweave_entry.py", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    import netweave, netweave.parser, netweave.network.plan
    assert netweave.__path__ == [ext_dir], netweave.__path__
    for name, fake in fakes.items():
        assert sys.modules[name] is fake, name     # nothing of ours took a bare name
    parsed = netweave.parser.parse("a <lora:x:0.5> b")
    assert parsed.text == "a b" and parsed.tags[0].name == "x"
    plan = netweave.network.plan.compile_prompt("<lora:x:0.5>", netweave.network.plan.CompileContext(steps=4))
    assert plan.networks[0].base.strength["unet"].tolist() == [0.5] * 4
    print("OK", netweave.__file__)
""")


def _copy_extension(repo_root, dest):
    shutil.copytree(repo_root, dest, ignore=shutil.ignore_patterns(
        ".venv", ".git", "__pycache__", "*.egg-info", ".pytest_cache", ".hypothesis", "tests"))


def test_loads_as_netweave_beside_colliding_modules(repo_root, tmp_path):
    ext_dir = str(tmp_path / "sd-webui-some-other-name")
    _copy_extension(repo_root, ext_dir)
    result = subprocess.run([sys.executable, "-c", LOADER, ext_dir], capture_output=True, text=True,
                            cwd=str(tmp_path))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("OK " + ext_dir)


def test_no_bare_imports_of_our_packages(repo_root):
    """Internal imports are relative; a bare `import parser` would pick up a stranger."""
    offenders = []
    for folder in ("parser", "network", "extension", "scripts"):
        for dirpath, _, files in os.walk(os.path.join(repo_root, folder)):
            for f in files:
                if f.endswith(".py"):
                    text = open(os.path.join(dirpath, f), encoding="utf-8").read()
                    for bad in ("import parser", "import network", "import extension",
                                "from parser", "from network", "from extension"):
                        if f"\n{bad}" in "\n" + text:
                            offenders.append((f, bad))
    assert offenders == []


def test_what_a_webui_loads_fits_every_webuis_libraries_and_imports_no_standalone_host():
    """A WebUI loads extension/*.py and extension/webui/*.py. A1111 v1.10.1 has pydantic 1
    and FastAPI 0.94 (a pydantic-2-only import there lost the whole script); Forge and SD.Next
    have FastAPI 0.104–0.124, without route body limits. And no WebUI module imports the
    standalone host or the development tools (docs/design.md §1)."""
    import ast
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    folders = [os.path.join(root, "extension"), os.path.join(root, "extension", "webui")]
    checked = 0
    for folder in folders:
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".py"):
                continue
            path = os.path.join(folder, name)
            source = open(path, encoding="utf-8").read()
            for node in ast.walk(ast.parse(source)):
                if isinstance(node, ast.ImportFrom):
                    module = "." * node.level + (node.module or "")
                    assert "pydantic" not in module, f"{path}: imports {module}"
                    assert "standalone" not in module and "devtools" not in module, \
                        f"{path}: imports {module}"
                elif isinstance(node, ast.Import):
                    assert not any("pydantic" in a.name for a in node.names), path
                elif isinstance(node, ast.keyword) and node.arg == "max_body_size":
                    raise AssertionError(f"{path}: max_body_size= (FastAPI ≥ 0.120 only)")
            checked += 1
    assert checked >= 12
