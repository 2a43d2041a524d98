#!/bin/bash
# Pack what the recipes need on the lent GPU machine (no package index, no model hub there) into
# pieces that fit the device tool's 64-MiB carry limit. Run from the repo root, after `make install`.
#   bash bench/device/pack.sh [FEATURE_DIR ...] [-- EXTRA_DIR ...]
# Writes .xfer/site/devsite.tar.xz (Python packages the GPU image lacks), .xfer/cNN/partNN
# (the SmolLM2 conversion as bf16, the feature folders, extra folders such as a checkpoint),
# and copies dev.sh / smoke.sh beside them. .xfer/ is git-ignored. See README.md here.
set -euo pipefail
REPO=$(pwd); VENV=${VENV:-.venv}; PY=$VENV/bin/python
SP=$($PY -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
FEATS=(); EXTRA=(); after=0
for a in "$@"; do
  if [ "$a" = "--" ]; then after=1; elif [ $after = 1 ]; then EXTRA+=("$a"); else FEATS+=("$a"); fi
done
rm -rf .xfer .devsite && mkdir -p .xfer/site .devsite
# pure-Python packages the image lacks: copied with their metadata (some read their own version)
for p in datasets dill httpcore2 httpx2 huggingface_hub intervaltree jiwer lhotse omegaconf pycparser torchdata torchtune \
         truststore kagglehub kagglesdk; do cp -r "$SP/$p" "$SP"/$p-*.dist-info .devsite/; done
# compiled ones as wheels for the image's Python 3.12
$PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .xfer/whl \
    cytoolz==1.2.0 cffi==2.1.1 multiprocess==0.70.19 rapidfuzz==3.14.6 soundfile==0.14.0 torchao==0.13.0
for w in .xfer/whl/*.whl; do (cd .devsite && python3 -m zipfile -e "$REPO/$w" .); done
find .devsite -name __pycache__ -prune -exec rm -rf {} +
tar -C .devsite -cJf .xfer/site/devsite.tar.xz . && rm -rf .devsite .xfer/whl
# payload: the LLM as bf16 (the recipes run it in bf16; the fp32 cache does not fit the carry budget)
stage=$(mktemp -d); mkdir -p "$stage/cache" "$stage/feats" "$stage/extra"
$PY - "$stage/cache" <<'PY'
import shutil, sys, torch
from pathlib import Path
from safetensors.torch import load_file, save_file
from speechmapper_tune.assets import smollm2_dir
src, out = smollm2_dir(), Path(sys.argv[1]) / "smollm2_135M_instruct"
shutil.copytree(src, out, ignore=shutil.ignore_patterns("model.safetensors"))
save_file({k: v.to(torch.bfloat16).contiguous() for k, v in load_file(src / "model.safetensors").items()},
          str(out / "model.safetensors"), metadata={"format": "pt"})
PY
for f in "${FEATS[@]}"; do ln -s "$REPO/$f" "$stage/feats/$(basename "$f")"; done
for e in "${EXTRA[@]}"; do ln -s "$REPO/$e" "$stage/extra/$(basename "$e")"; done
(cd "$stage" && tar -chf - cache feats extra | xz -1 -T0 > payload.tar.xz)
# pieces fit the 64-MiB carry limit beside the tracked tree (which travels with every call; ~30 MiB with the
# shipped projectors), with 3 MiB to spare; the first travels with the package folder, so it is smaller.
TRACKED=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{s += $1} END {print s}')
PIECE=${PIECE_BYTES:-$(( (64 - 3) * 1048576 - TRACKED ))}
FIRST=${FIRST_BYTES:-$(( PIECE - $(stat -c %s .xfer/site/devsite.tar.xz) ))}
echo "tracked tree $((TRACKED / 1048576)) MiB: pieces of $PIECE bytes, the first $FIRST"
head -c $FIRST "$stage/payload.tar.xz" > "$stage/p0"; tail -c +$((FIRST + 1)) "$stage/payload.tar.xz" > "$stage/rest"
mkdir -p .xfer/c10 && mv "$stage/p0" .xfer/c10/part10
split -b $PIECE -d -a 2 --numeric-suffixes=11 "$stage/rest" "$stage/part"
for f in "$stage"/part*; do n=${f##*part}; mkdir -p .xfer/c$n && mv "$f" .xfer/c$n/; done
cp bench/device/dev.sh bench/device/smoke.sh .xfer/  # round4*.sh are tracked: they travel anyway
rm -rf "$stage"; ls .xfer
echo "feature manifests keep absolute paths: on the device they resolve through $REPO/runs/features symlinks (dev.sh)"
