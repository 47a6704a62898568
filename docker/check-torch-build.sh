#!/bin/sh
# Run in the image build after torch is installed: fail unless it is the build TORCH_INDEX_URL names
# (.../whl/cpu: no CUDA; .../whl/cu126: CUDA 12.6). A wheelhouse, which pip reads instead of the index,
# could otherwise put a CPU torch into the GPU image, or CUDA 13 where a CUDA 12 build was asked for.
# An index whose last path part names no build (PyPI's /simple) is not checked. PYTHON: the image's by default.
set -eu
wanted=$(basename "${1:?usage: $0 TORCH_INDEX_URL}")
exec "${PYTHON:-/opt/venv/bin/python}" - "$wanted" <<'PY'
import re
import sys

import torch

wanted = sys.argv[1]
got = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
if re.fullmatch(r"cpu|cu\d+", wanted) and got != wanted:
    sys.exit(f"torch {torch.__version__} is the {got} build, but TORCH_INDEX_URL asks for {wanted}")
print(f"torch {torch.__version__}: the {got} build")
PY
