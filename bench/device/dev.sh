#!/bin/bash
# Sourced at the start of every device command (`source .xfer/dev.sh`): stash the carried pieces,
# unpack the package folder, unpack the payload once all pieces are there, define T (= tune).
REPO=$PWD
mkdir -p /root/stash
for f in .xfer/c*/part*; do [ -e "$f" ] && mv -f "$f" /root/stash/; done
if [ -f .xfer/site/devsite.tar.xz ] && [ "$(cat /root/site/.ok 2>/dev/null)" != "$(md5sum < .xfer/site/devsite.tar.xz)" ]; then
  rm -rf /root/site && mkdir -p /root/site && tar -C /root/site -xJf .xfer/site/devsite.tar.xz \
    && md5sum < .xfer/site/devsite.tar.xz > /root/site/.ok
fi
[ -f /root/site/.ok ] || { echo "no package folder: a fresh machine needs .xfer/site carried again"; exit 3; }
ln -sfn "$REPO/configs" "$REPO/speechmapper_tune/configs"  # setup.cfg maps configs/ to speechmapper_tune.configs
export PYTHONPATH=/root/site:$REPO:$REPO/recipes SPEECHMAPPER_CACHE=/root/cache TQDM_MININTERVAL=30 PYTHONUNBUFFERED=1
T() { python3 -m torchtune._cli.tune "$@"; }
unpack_payload() {  # after every piece has been carried
  [ -f /root/payload.ok ] && return 0
  mkdir -p /root/payload && ( set -o pipefail; cat /root/stash/part* | xz -d -T0 | tar -C /root/payload -xf - ) \
    || { echo "payload incomplete"; return 4; }  # -T0: xz >= 5.4 decompresses the multi-block stream in parallel
  mkdir -p /root/cache && ln -sfn /root/payload/cache/smollm2_135M_instruct /root/cache/smollm2_135M_instruct
  for f in /root/payload/feats/*; do mkdir -p "$REPO/runs/features"; ln -sfn "$f" "$REPO/runs/features/$(basename "$f")"; done
  touch /root/payload.ok
}
echo "stash: $(ls /root/stash | tr '\n' ' ')"
