#!/bin/sh
# JupyterLab on the book (make lab).   usage: jupyter/lab.sh PYTHON [jupyter lab options]
#
# - A double-click opens a chapter (notebooks/NN_*.py, jupytext percent format) as a notebook:
#   lab/settings/overrides.json makes jupytext's "Jupytext Notebook" the default viewer of Python
#   files. Overrides only change defaults: a reader's own settings still win.
# - The "Python 3" kernel is PYTHON (the project's .venv): kernels/python3 comes first on
#   JUPYTER_PATH, ahead of any python3 kernel registered for the user, and its argv "python" is
#   replaced by the server's own interpreter (jupyter_client does that for "python").
# - The server's root is the project, the file browser opens on notebooks/. Pass
#   --ServerApp.root_dir=... to serve another copy of the book instead.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
python=${1:?usage: jupyter/lab.sh PYTHON [jupyter lab options]}
shift
root="--ServerApp.root_dir=$(dirname "$here")"
for arg in "$@"; do
    case $arg in --ServerApp.root_dir=* | --notebook-dir=* | --ServerApp.notebook_dir=*) root= ;; esac
done
JUPYTER_PATH="$here${JUPYTER_PATH:+:$JUPYTER_PATH}"
export JUPYTER_PATH
exec "$python" -m jupyterlab ${root:+"$root"} \
    --LabApp.app_settings_dir="$here/lab/settings" \
    --LabApp.default_url=/lab/tree/notebooks \
    "$@"
