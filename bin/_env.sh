# Shared by bin/callbridge, bin/test and bin/refresh-constraints: find a Python >= 3.11 and
# keep a project virtualenv in sync with pyproject.toml and constraints.txt. Sourced, not run.

SUPPORTED='import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)'

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
        if "$c" -c "$SUPPORTED" >/dev/null 2>&1; then
            echo "$c"; return
        fi
    done
    echo "callbridge needs Python 3.11 or newer (set PYTHON=/path/to/python3)" >&2
    return 1
}

# python_minor 3.11: an interpreter of exactly that version, if this machine has one.
python_minor() {
    local want="$1" c
    local candidates=("python$want")
    if command -v pyenv >/dev/null 2>&1; then
        candidates+=("$(pyenv root)/versions/$want"*/bin/python3)
    fi
    candidates+=(python3)
    for c in "${candidates[@]}"; do
        if "$c" -c "import sys; sys.exit(0 if '%d.%d' % sys.version_info[:2] == '$want' else 1)" >/dev/null 2>&1; then
            echo "$c"; return
        fi
    done
    return 1
}

# check_venv: refuse a virtualenv whose Python cannot run callbridge, saying how to fix it.
check_venv() {
    local version
    if ! version="$("$VENV/bin/python" --version 2>&1)"; then
        echo "callbridge: $VENV is broken: its python does not run (was the Python it was made with removed?)." >&2
        echo "  Fix: rm -rf '$VENV' and run this again; it is recreated with a supported Python (or set PYTHON=...)." >&2
        return 1
    fi
    if ! "$VENV/bin/python" -c "$SUPPORTED" >/dev/null 2>&1; then
        echo "callbridge: $VENV was made with $version; callbridge needs Python 3.11 or newer." >&2
        echo "  Fix: rm -rf '$VENV' and run this again; it is recreated with a supported Python (or set PYTHON=...)." >&2
        return 1
    fi
}

# ensure_venv EXTRAS: create $VENV if needed and (re)install the project, with the versions
# pinned in constraints.txt, when pyproject.toml, the constraints or the extras changed since
# the last install.
ensure_venv() {
    local extras="$1" spec="." stamp sum want have py
    [ -n "$extras" ] && spec=".[$extras]"
    VENV="${CALLBRIDGE_VENV:-$ROOT/.venv}"
    if [ ! -e "$VENV/bin/python" ] && [ ! -L "$VENV/bin/python" ]; then
        py="$(pick_python)"
        echo "creating $VENV with $("$py" --version 2>&1)" >&2
        "$py" -m venv "$VENV"
        "$VENV/bin/python" -m pip install --quiet --upgrade pip >&2
    fi
    check_venv || exit 1
    stamp="$VENV/.callbridge-installed"
    sum="$(cat "$ROOT/pyproject.toml" "$ROOT/constraints.txt" | cksum | cut -d' ' -f1)"
    want="$sum-$extras"
    have="$(cat "$stamp" 2>/dev/null || true)"
    # the test install is a superset of the runtime one
    if [ "$have" = "$want" ] || { [ -z "$extras" ] && [ "$have" = "$sum-test" ]; }; then
        return 0
    fi
    echo "installing callbridge${extras:+ with [$extras]} into $VENV (versions from constraints.txt)" >&2
    # setuptools tells every editable install of a flat layout (app/ beside pyproject.toml) to
    # beware of folders named like the package in the working directory, as a warning that
    # pip (26 and later) shows as a 10-line banner: app/ is that package, so the note is muted
    # for this install only (PYTHONWARNINGS reaches the build backend pip runs).
    (cd "$ROOT" && PYTHONWARNINGS="ignore:Editable installation" "$VENV/bin/python" -m pip install --quiet \
        --disable-pip-version-check -c constraints.txt -e "$spec") >&2
    echo "$want" > "$stamp"
}
