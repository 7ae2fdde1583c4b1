#!/bin/sh
# Install torch into a virtualenv: the CPU build on a machine without an NVIDIA GPU, wherever
# it runs (make setup calls this; see README "Install").
#
#   scripts/install_torch.sh PYTHON [SPEC] [INDEX]
#
# SPEC   the torch requirement (default torch==2.13.0).
# INDEX  where it comes from (make's TORCH_INDEX):
#   auto  (default) a machine with nvidia-smi: pip's own index (PyPI's Linux torch is the CUDA
#         build). Otherwise what pip resolves when that is a CPU build (a local wheel or index
#         serving torch==X+cpu, or macOS, where PyPI's build is the CPU one), else PyTorch's
#         CPU index: PyPI alone would bring the CUDA build (GBs of nvidia-* wheels).
#   pip   pip's own configuration, whatever it resolves.
#   URL   that index, e.g. https://download.pytorch.org/whl/cu128
# PAGEDLLM_TORCH_DRY_RUN=1 prints the pip arguments instead of installing (tests).
set -eu
PY=$1
SPEC=${2:-torch==2.13.0}
INDEX=${3:-auto}
CPU_INDEX=https://download.pytorch.org/whl/cpu

resolved_version() {  # the torch version pip would install from its own configuration
    "$PY" -m pip install --dry-run --quiet --no-deps --ignore-installed --report - "$SPEC" \
        2>/dev/null | "$PY" -c 'import json, sys; print(json.load(sys.stdin)["install"][0]["metadata"]["version"])' \
        2>/dev/null || true
}

case "$INDEX" in
    pip) ARGS="" ;;
    auto)
        if command -v nvidia-smi >/dev/null 2>&1 || [ "$(uname -s)" = Darwin ]; then
            ARGS=""
        else
            case "$(resolved_version)" in
                *+cpu*) ARGS="" ;;  # a CPU wheel is served here (a local wheel or index)
                *) ARGS="--index-url $CPU_INDEX" ;;
            esac
        fi ;;
    *) ARGS="--index-url $INDEX" ;;
esac

if [ "${PAGEDLLM_TORCH_DRY_RUN:-0}" = 1 ]; then
    echo "pip install $ARGS $SPEC"
    exit 0
fi
echo "installing $SPEC${ARGS:+ ($ARGS)}"
# shellcheck disable=SC2086  # ARGS is empty or two words
"$PY" -m pip install --disable-pip-version-check -q $ARGS "$SPEC"
