#!/usr/bin/env bash
# Wheels the GPU machine's image lacks, downloaded here into .whl/ so a device run can carry them.
#
#   bench/device_wheels.sh                 # core: what bench/ and the library import (25 MiB)
#   bench/device_wheels.sh train           # + wandb and its needs (train.py imports wandb): 49 MiB
#   bench/device_wheels.sh ocr             # + rapidocr for the OCR reward: 43 MiB (with train: 66 MiB,
#                                          #   over the 64 MiB a device call carries; refused)
#
# The image ('cuda', Python 3.12, see the device notes' KINDS.md) has torch 2.11, numpy, pillow,
# safetensors, accelerate, lightning, onnxruntime, opencv-python-headless and most small packages,
# but no diffusers, omegaconf, hydra-core, webdataset, wandb or rapidocr, and transformers 5.17,
# tokenizers 0.23.2, huggingface_hub 1.33 and a peft of unseen version where we pin 5.23.0, 0.23.3,
# 2.4.0 and 0.21.2: those travel too, so the device runs what CI tests. Versions are the ones pyproject.toml pins
# (read from it, so they cannot drift); their needs that pyproject does not pin take the versions of
# our tested .venv. antlr4-python3-runtime (omegaconf/hydra) has no wheel on PyPI: built here with
# `pip wheel` at the version our .venv runs. .whl/ is emptied first, so it holds one version of
# each package (two stop the device's install). On the device, start the command with
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit;
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=.whl
LIMIT=$((64 * 1024 * 1024))  # the device's limit on everything a call carries, working tree included

pin() {  # the version pyproject.toml pins for $1
  local v
  v=$(sed -n "s/^ *\"$1==\([^\"]*\)\".*/\1/p" pyproject.toml)
  [[ -n $v ]] || { echo "pyproject.toml pins no version of $1" >&2; exit 1; }
  echo "$v"
}

core=(
  "diffusers==$(pin diffusers)" "transformers==$(pin transformers)" "tokenizers==$(pin tokenizers)"
  "huggingface_hub==$(pin huggingface_hub)" "peft==$(pin peft)" "omegaconf==$(pin omegaconf)"
  "hydra-core==$(pin hydra-core)" "webdataset==$(pin webdataset)"
  # their needs missing on the image (or older there), at the .venv's versions
  importlib_metadata==10.2.0 lazy-importer==0.1.0 braceexpand==0.1.7 regex==2026.11.15
  httpx2==2.16.2 httpcore2==2.16.2 truststore==0.10.5 anyio==4.16.0 idna==3.20 h11==0.16.0
  typing_extensions==4.16.0
)
train=(
  "wandb==$(pin wandb)" cwevals==0.0.1b1 distro==1.9.0 platformdirs==4.14.7 pydantic==2.14.3
  pydantic_core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5 googleapis-common-protos==1.76.0
  opentelemetry-api==1.45.2 opentelemetry-sdk==1.45.2 opentelemetry-proto==1.45.2
  opentelemetry-exporter-otlp-proto-http==1.45.2 opentelemetry-exporter-otlp-proto-common==1.45.2
  opentelemetry-semantic-conventions==0.66b2 opentelemetry-exporter-http-transport==0.66b2
  opentelemetry-exporter-otlp-common==0.66b2
)
ocr=("rapidocr-onnxruntime==$(pin rapidocr-onnxruntime)" pyclipper==1.4.0 shapely==2.2.0)
ANTLR=antlr4-python3-runtime==4.9.3  # omegaconf 2.3 and hydra-core 1.3 need 4.9.*; the .venv runs 4.9.3

wanted=("${core[@]}")
for group in "$@"; do
  case $group in
    train) wanted+=("${train[@]}") ;;
    ocr) wanted+=("${ocr[@]}") ;;
    *) echo "unknown group '$group' (expected: train, ocr)" >&2; exit 2 ;;
  esac
done

# Keep the folder out of git (and so out of the working tree that travels uncarried).
if ! git check-ignore -q "$OUT/x.whl" 2>/dev/null; then
  mkdir -p .git/info && echo "/$OUT/" >>.git/info/exclude
fi
rm -rf "$OUT" && mkdir -p "$OUT"

# The device notes' flags, exactly: pip matches each manylinux N exactly.
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$OUT" "${wanted[@]}"
"$PY" -m pip wheel -q --no-deps -w "$OUT" "$ANTLR"

count=$(ls "$OUT"/*.whl | wc -l)
expected=$((${#wanted[@]} + 1))
[[ $count -eq $expected ]] || { echo "expected $expected wheels in $OUT, found $count" >&2; exit 1; }
total=$(du -cb "$OUT"/*.whl | tail -1 | cut -f1)
tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
printf '%s: %d wheels, %.1f MiB (+ working tree %.1f MiB; the device carries at most 64 MiB)\n' \
  "$OUT" "$count" "$(awk "BEGIN{print $total/1048576}")" "$(awk "BEGIN{print $tree/1048576}")"
if ((total + tree > LIMIT)); then
  echo "too large to carry: drop a group" >&2
  exit 1
fi
