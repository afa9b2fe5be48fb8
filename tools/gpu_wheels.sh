#!/usr/bin/env bash
# Download the wheels that `make gpu-check` needs on a GPU machine that cannot reach a package registry.
#
#   tools/gpu_wheels.sh [FOLDER]          (make gpu-wheels; FOLDER defaults to gpu-wheels/, git-ignored)
#
# The check runs under the GPU machine's own python3 (3.12), which has torch, torchvision, timm, numpy, pillow,
# pyyaml, tqdm, tabulate, portalocker, scipy, tensorboard, pytest, setuptools and ninja, but not this project's
# other runtime packages: yacs (the trainer's config), fvcore (the FLOP counter, imported by the benchmark) and
# fvcore's iopath and termcolor. This script fetches those as Python 3.12 wheels, with timm and Pillow at the
# versions requirements.txt pins, in case the machine holds others (Pillow 13 breaks
# the recipe's RandAugment). tools/gpu_check.py installs from FOLDER, with `pip install --no-index --no-deps
# --target` beside (never over) the machine's torch, what the machine lacks or holds at another version. Copy or
# carry FOLDER with the repository.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
dest="${1:-${GPU_WHEELS:-gpu-wheels}}"

# yacs and fvcore at the versions requirements.txt pins; fvcore's own dependencies at versions known to work.
pinned() {
    local line
    line=$(grep -iE "^$1==" requirements.txt) || { echo "error: requirements.txt pins no version of $1" >&2; exit 1; }
    echo "${line%%[ ;#]*}"
}
requirements=("$(pinned yacs)" "$(pinned fvcore)" iopath==0.1.10 termcolor==3.3.0 "$(pinned timm)"
              "$(pinned pillow)")

platforms=()
for platform in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 any; do
    platforms+=(--platform "$platform")
done

mkdir -p "$dest"
rm -f "$dest"/*.whl
staging=$(mktemp -d)
trap 'rm -rf "$staging"' EXIT
for requirement in "${requirements[@]}"; do
    if ! "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d "$dest" "$requirement" 2>"$staging/download.log"; then
        # no wheel on the registry (fvcore, iopath publish only sdists): build one, which must be pure Python
        "$PYTHON" -m pip wheel --quiet --no-deps --no-binary "${requirement%%==*}" -w "$staging" "$requirement"
        built=("$staging"/*.whl)
        case "${built[0]}" in
            *-py3-none-any.whl | *-py2.py3-none-any.whl) mv "${built[0]}" "$dest"/ ;;
            *) echo "error: $requirement built a platform wheel (${built[0]##*/}), which the GPU machine may not run" >&2
               exit 1 ;;
        esac
    fi
done

ls -1 "$dest"/*.whl
size_kib=$(du -sk "$dest" | cut -f1)
echo "$(ls "$dest"/*.whl | wc -l) wheels, ${size_kib} KiB in $dest"
if [ "$size_kib" -gt $((16 * 1024)) ]; then
    echo "error: $dest holds more than 16 MiB; the GPU machine's working tree is limited to 64 MiB" >&2
    exit 1
fi
