#!/usr/bin/env bash
# The two commands a newcomer needs (see README.md):
#   ./dev.sh bench [fastconv bench options]   set up .venv (reused when present), run the main job
#   ./dev.sh test  [pytest options]           set up .venv, run the test suite
# Set-up installs fastconv editable with its test dependencies; it is redone only when
# pyproject.toml changes. FASTCONV_VENV picks another virtual-environment directory.
set -euo pipefail
cd "$(dirname "$0")"
venv=${FASTCONV_VENV:-.venv}
py="$venv/bin/python"

setup() {
    if [ ! -x "$py" ]; then
        echo "dev.sh: creating virtual environment $venv" >&2
        python3 -m venv "$venv"
    fi
    local want stamp="$venv/.fastconv-setup"
    want=$(cat pyproject.toml | sha256sum | cut -c1-16)
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "dev.sh: installing fastconv and its dependencies into $venv (torch is large:" \
             "a few minutes the first time)" >&2
        "$py" -m pip install --disable-pip-version-check -q -e '.[test]'
        echo "$want" > "$stamp"
    fi
}

cmd=${1:-}
[ $# -gt 0 ] && shift
case "$cmd" in
    bench)
        setup
        exec "$py" -m fastconv bench "$@"
        ;;
    test)
        setup
        "$py" -m fastconv info
        exec "$py" -m pytest "$@"
        ;;
    *)
        sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//' >&2
        exit 2
        ;;
esac
