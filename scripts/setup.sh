#!/usr/bin/env bash
# Fresh-machine setup: system packages, .venv, the project with its extras, and the DALI build
# that matches torch's CUDA version. Idempotent: a re-run with nothing changed only checks.
set -euo pipefail
cd "$(dirname "$0")/.."

# Compilers for ffcv's C extension, the built-in dataset, and real photographs for the benchmark corpus.
APT_PACKAGES=(pkg-config libopencv-dev libturbojpeg0-dev dataset-fashion-mnist mate-backgrounds ukui-wallpapers lomiri-wallpapers)
missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    if [ "$(id -u)" -eq 0 ]; then
        SUDO=()
    elif command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
        SUDO=(sudo)
    else
        echo "setup: missing system packages: ${missing[*]}" >&2
        echo "setup: run as root or install them first: sudo apt-get install -y ${missing[*]}" >&2
        exit 1
    fi
    echo "setup: installing system packages: ${missing[*]}"
    "${SUDO[@]}" apt-get update -qq
    DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
    echo "setup: Python >= 3.11 is required ($PYTHON is $("$PYTHON" --version 2>&1)); set PYTHON=/path/to/python3.11" >&2
    exit 1
}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv

# Reinstall only when the dependency list or this script changed.
stamp=.venv/.fastbyol-setup
want=$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
    .venv/bin/python -m pip install -q --upgrade pip
    .venv/bin/python -m pip install -e ".[dev,ffcv,plot]"
    cuda=$(.venv/bin/python -c 'import torch; print(torch.version.cuda or "")')
    # DALI's CPU mode needs no GPU, so it is installed on CPU-only machines too.
    case "$cuda" in
        12.*) dali_extra=dali ;;
        *) dali_extra=dali-cu13 ;;
    esac
    echo "setup: torch CUDA '${cuda:-none}' -> extra [$dali_extra]"
    .venv/bin/python -m pip install -e ".[$dali_extra]"
    echo "$want" >"$stamp"
fi
.venv/bin/python -c 'import torch, torchvision, nvidia.dali, ffcv; print("setup: ok: torch", torch.__version__, "| dali", nvidia.dali.__version__)'
