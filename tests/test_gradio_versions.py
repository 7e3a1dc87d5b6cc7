"""The NetWeave tab builds under the Gradio the WebUIs run: 3.41.2 (A1111 1.8–1.10) and 4.40.0
(Forge), each in its own venv made by setup.sh; the page's own Gradio is tested elsewhere."""
import os
import subprocess

import pytest


@pytest.mark.parametrize("version", ["3.41.2", "4.40.0"])
def test_the_tab_builds_under_the_webuis_gradio(version, repo_root, tmp_path):
    python = os.path.join(repo_root, ".venv", f"gradio-{version}", "bin", "python")
    if not os.path.exists(python):
        pytest.skip(f"no .venv/gradio-{version}: run setup.sh")
    result = subprocess.run([python, os.path.join(repo_root, "tests", "gradio_tab_check.py"),
                             repo_root, str(tmp_path)], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().startswith(f"OK {version}")
