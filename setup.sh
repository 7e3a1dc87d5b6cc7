#!/usr/bin/env bash
# Creates .venv beside this file and installs NetWeave with its pinned development tools.
# Safe to run again: pip skips what is already there.
set -euo pipefail
cd "$(dirname "$0")"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
# The `ldm` package A1111 and Forge run, for the LDM-layout test trees. --no-deps: its pins
# (pytorch-lightning 1.4, transformers 4.33, ...) are for training and would pull old torch.
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps stable-diffusion-sdkit==2.1.5
# The CLIP tokenizer's BPE vocabulary, which open_clip ships as a data file: read, never
# imported (open_clip imports torchvision, which does not install beside this torch).
.venv/bin/python -m pip install --quiet --disable-pip-version-check --no-deps open_clip_torch==3.3.0
# A1111's own transformers (4.30, whose CLIPTextModel still has the text_model level), kept
# apart from the venv's transformers 5; tests put it on PYTHONPATH in a child process.
[ -d .venv/a1111-transformers/transformers ] || .venv/bin/python -m pip install --quiet \
    --disable-pip-version-check --no-deps --target .venv/a1111-transformers \
    transformers==4.30.2 tokenizers==0.13.3
# Debian's chromium for the browser tests (Playwright drives it; nothing is downloaded by
# Playwright itself). Needs root and apt; without them the browser tests are skipped.
if ! command -v chromium >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } ||
            echo "setup.sh: could not install chromium: browser tests will be skipped" >&2
    else
        echo "setup.sh: chromium is not installed and this is not root: browser tests will be skipped" >&2
    fi
fi
# The Gradio versions the WebUIs run, each in its own small venv, for the tests that build the
# NetWeave tab under them and click through it, with the web stack each WebUI pins (a newer
# starlette breaks gradio 3's page templates, a newer pydantic gradio 4's API page):
# A1111 1.8–1.10 gradio 3.41.2 + fastapi 0.94.0, Forge gradio 4.40.0 + fastapi 0.104.1,
# pydantic 2.8.2, huggingface_hub 0.26.2 (its requirements_versions.txt). A venv made for
# another spec is made again.
for spec in "3.41.2:fastapi==0.94.0" "4.40.0:fastapi==0.104.1 pydantic==2.8.2 huggingface_hub==0.26.2"; do
    version=${spec%%:*}; extra=${spec#*:}  # $extra unquoted below: one or more packages
    venv=".venv/gradio-$version"
    if [ ! -x "$venv/bin/python" ] || [ "$(cat "$venv/.netweave-spec" 2>/dev/null)" != "$spec" ] || \
            ! "$venv/bin/python" -c "import gradio, lark" >/dev/null 2>&1; then
        python3 -m venv "$venv"
        "$venv/bin/python" -m pip install --quiet --disable-pip-version-check \
            "gradio==$version" lark==1.3.1 $extra
        echo "$spec" > "$venv/.netweave-spec"
    fi
done
