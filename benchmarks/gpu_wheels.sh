#!/usr/bin/env bash
# Wheels that benchmarks/gpu_check.sh needs on a lent GPU machine, fetched here into ./.whl (git-ignored
# through .git/info/exclude), to travel with the working tree (`carry: [".whl"]`).
#
# Why: the lent machine cannot reach any package index and has no room for our virtualenv (the
# tree that travels is capped at 64 MiB; torch alone is GBs). Its own python3 (3.12) already holds
# torch, torchvision, transformers, timm, huggingface_hub, safetensors, tokenizers, numpy, pillow,
# tqdm, pyyaml, msgpack, psutil, einops, ninja, py-cpuinfo, nvidia-ml-py and tensorboard; what it
# lacks is listed below, at the versions this project is tested with. deepspeed ships as an sdist
# only, so its (pure-Python, no ops compiled) wheel is built here.
set -euo pipefail
cd "$(dirname "$0")/.."
DEST=.whl
grep -qxF "/$DEST/" .git/info/exclude 2>/dev/null || echo "/$DEST/" >> .git/info/exclude
rm -rf "$DEST" && mkdir -p "$DEST"
PY=${MLIP_VENV:-.venv}/bin/python
[ -x "$PY" ] || PY=python3
PLATFORMS=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64)
PURE=(hjson==3.1.0 annotated-types==0.8.0 typing-inspection==0.4.5 pydantic==2.14.4
      open_clip_torch==3.3.0 ftfy==6.3.1 wcwidth==0.9.4 webdataset==1.0.2 braceexpand==0.1.7)
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${PLATFORMS[@]}" -d "$DEST" pydantic_core==2.50.5 "${PURE[@]}"
DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation -w "$DEST" deepspeed==0.19.8
ls -1 "$DEST"
du -sh "$DEST"
