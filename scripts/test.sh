#!/usr/bin/env bash
# Install everything the tests need on a fresh machine, then lint, build the docs and run the offline test suite.
#
#   bash scripts/test.sh                 # the README's test command; .ci/run calls it too
#   bash scripts/test.sh -k video -x     # arguments go to pytest
#
# 1. Debian's Chromium and its chromedriver, for the web UI's browser tests (tests/test_ui_browser.py),
#    through apt-get (with sudo when not root) when `chromium` or `chromedriver` is missing;
# 2. a virtual environment in .venv (made when missing) with `pip install torch==2.13.0 -e ".[test]"`:
#    torch==2.13.0 is the CPU wheel that lies on these machines (the tests run on the CPU); the project
#    itself asks only for torch>=2.1;
# 3. `ruff check .`;
# 4. `mkdocs build --strict` of the documentation site (mkdocs.yml, docs/, the API reference read from the
#    docstrings) into a temporary folder, quietly: a broken link, anchor or API reference fails here
#    (NO_MKDOCS_2_WARNING=1 silences Material's notice about its end of life, which is not about this site);
# 5. `python -m pytest "$@"` with HF_HUB_OFFLINE=1 (no test reaches for the hub).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v chromium >/dev/null 2>&1 || ! command -v chromedriver >/dev/null 2>&1; then
    if command -v apt-get >/dev/null 2>&1; then
        sudo=""
        if [ "$(id -u)" -ne 0 ]; then
            command -v sudo >/dev/null 2>&1 || {
                echo "scripts/test.sh: installing chromium and chromium-driver needs root or sudo" >&2
                exit 1
            }
            sudo=sudo
        fi
        echo "scripts/test.sh: installing Debian's chromium and chromium-driver for the browser tests" >&2
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get update
        $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends \
            chromium chromium-driver
    else
        echo "scripts/test.sh: no apt-get here; install Chromium and its chromedriver yourself," \
            "or the browser tests (tests/test_ui_browser.py) fail, saying so" >&2
    fi
fi

if [ ! -f .venv/bin/activate ]; then
    python3 -m venv .venv
fi
# shellcheck disable=SC1091
. .venv/bin/activate
pip install torch==2.13.0 -e ".[test]"

ruff check .
NO_MKDOCS_2_WARNING=1 mkdocs build --strict --quiet --site-dir "$(mktemp -d)"
HF_HUB_OFFLINE=1 python -m pytest "$@"
