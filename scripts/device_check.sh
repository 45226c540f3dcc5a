#!/bin/sh
# The GPU device check (scripts/device_check.py): run on a machine with an NVIDIA GPU and fmc
# installed (README's setup). Usage: scripts/device_check.sh OUTDIR [--arch sm_90] [--skip-big]
here=$(dirname "$0")
python=${PYTHON:-python3}
[ -x "$here/../.venv/bin/python" ] && [ -z "$PYTHON" ] && python="$here/../.venv/bin/python"
exec "$python" "$here/device_check.py" "$@"
