# Shared by bin/callbridge and bin/test: find a Python >= 3.11 and keep a project virtualenv
# in sync with pyproject.toml. Sourced, not run.

pick_python() {
    if [ -n "${PYTHON:-}" ]; then echo "$PYTHON"; return; fi
    # newest first; pyenv installs count even when their shims are not active
    local candidates=(python3.13 python3.12)
    if command -v pyenv >/dev/null 2>&1; then
        local root v
        root="$(pyenv root)"
        for v in $(pyenv versions --bare 2>/dev/null | grep -E '^3\.1[1-9]' | sort -rV); do
            candidates+=("$root/versions/$v/bin/python3")
        done
    fi
    candidates+=(python3.11 python3)
    local c
    for c in "${candidates[@]}"; do
        if "$c" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' >/dev/null 2>&1; then
            echo "$c"; return
        fi
    done
    echo "callbridge needs Python 3.11 or newer (set PYTHON=/path/to/python3)" >&2
    return 1
}

# ensure_venv EXTRAS: create $VENV if needed and (re)install the project when pyproject.toml
# or the requested extras changed since the last install.
ensure_venv() {
    local extras="$1" spec="." stamp sum want have py
    [ -n "$extras" ] && spec=".[$extras]"
    VENV="${CALLBRIDGE_VENV:-$ROOT/.venv}"
    if [ ! -x "$VENV/bin/python" ]; then
        py="$(pick_python)"
        echo "creating $VENV with $("$py" --version 2>&1)" >&2
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    fi
    stamp="$VENV/.callbridge-installed"
    sum="$(cksum < "$ROOT/pyproject.toml" | cut -d' ' -f1)"
    want="$sum-$extras"
    have="$(cat "$stamp" 2>/dev/null || true)"
    # the test install is a superset of the runtime one
    if [ "$have" = "$want" ] || { [ -z "$extras" ] && [ "$have" = "$sum-test" ]; }; then
        return 0
    fi
    echo "installing callbridge${extras:+ with [$extras]} into $VENV" >&2
    (cd "$ROOT" && "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check -e "$spec") >&2
    echo "$want" > "$stamp"
}
