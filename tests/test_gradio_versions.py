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


@pytest.mark.slow
@pytest.mark.parametrize("version", ["3.41.2", "4.40.0"])
def test_the_tab_works_in_a_browser_under_the_webuis_gradio(version, repo_root, tmp_path):
    """Clicked through in chromium: a preset mask saved and listed, and Explain takes the
    WebUI's txt2img prompt (read in the browser: `_js` under Gradio 3, `js` under 4)."""
    import re
    import shutil
    import socket
    import time
    import urllib.request

    python = os.path.join(repo_root, ".venv", f"gradio-{version}", "bin", "python")
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if not os.path.exists(python) or chromium is None:
        pytest.skip(f"needs .venv/gradio-{version} and chromium: run setup.sh")
    from playwright.sync_api import sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    masks = tmp_path / "masks"
    server = subprocess.Popen([python, os.path.join(repo_root, "tests", "gradio_tab_serve.py"),
                               repo_root, str(masks), str(port)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2)
                break
            except OSError:
                assert server.poll() is None, server.stderr.read()[-3000:]
                assert time.monotonic() < deadline, f"Gradio {version} did not answer on {url}"
                time.sleep(0.2)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=chromium, args=[
                "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                "--disable-component-update", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(url)

            def tab(name):  # Gradio 4 marks tab buttons role=tab, Gradio 3 does not
                return page.locator(".tab-nav button", has_text=re.compile(rf"^\s*{name}\s*$")).first
            prompt = page.locator("#txt2img_prompt textarea")
            prompt.wait_for(state="visible", timeout=60000)
            prompt.fill("a fox <lora:style:0@0,1@0.5> <lora:x:te=>")
            tab("NetWeave").click()
            tab("Preset").click()
            page.locator("#netweave_mask_name textarea, #netweave_mask_name input").first \
                .fill("lefthalf")
            page.click("#netweave_mask_save_preset")
            status = "#netweave_mask_status textarea, #netweave_mask_status input"
            page.wait_for_function(f"document.querySelector('{status}').value === "
                                   "\"saved 'lefthalf'\"", timeout=30000)
            page.locator("#netweave_masks img").first.wait_for(state="visible", timeout=20000)
            assert os.listdir(masks) == ["lefthalf.png"]
            tab("Explain").click()
            page.click("#netweave_take_prompt")
            page.wait_for_function("document.querySelector('#netweave_explain_prompt textarea')"
                                   ".value.includes('<lora:style')", timeout=20000)
            page.click("#netweave_explain")
            page.wait_for_function("document.querySelector('#netweave_plan textarea').value"
                                   ".includes('style')", timeout=30000)
            errors = page.locator("#netweave_explain_errors textarea").input_value()
            assert errors.startswith("column 41:"), errors  # the ">" where a number belongs
            folder = os.environ.get("NETWEAVE_SHOTS") or str(tmp_path)
            page.screenshot(path=os.path.join(folder, f"tab-gradio-{version}.png"))
            browser.close()
    finally:
        server.stdin.close()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
