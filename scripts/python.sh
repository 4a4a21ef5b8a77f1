# Sourced by scripts/run_local.sh and scripts/run_multinode.sh: the interpreter that runs spmd_dp, in PYTHON.
# $PYTHON, else the repository's .venv (make setup), else python3; it must import spmd_dp (else exit 2).
if [ -z "${PYTHON:-}" ]; then
    PYTHON=python3
    [ -x "$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/python" ] && PYTHON="$(dirname "${BASH_SOURCE[0]}")/../.venv/bin/python"
fi
"$PYTHON" -c "import spmd_dp" 2>/dev/null || {
    echo "$(basename "$0"): $PYTHON cannot import spmd_dp; activate its virtualenv (source .venv/bin/activate)" \
         "or set PYTHON=/path/to/venv/bin/python" >&2; exit 2; }
