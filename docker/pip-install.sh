#!/bin/sh
# pip install into the image's virtual environment: from $WHEELHOUSE alone when the build sets it
# (a machine with no registry), else from the registries.
set -eu
if [ -n "${WHEELHOUSE:-}" ]; then
    exec /opt/venv/bin/pip install --no-index --find-links "$WHEELHOUSE" "$@"
fi
exec /opt/venv/bin/pip install "$@"
