#!/bin/bash
# Round 4, second command, right after round4.sh on the same warm machine: the frozen-LLM variant
# of a/b/c with the lowest held-out WER goes on from its last checkpoint as e (fresh cosine, half its peak
# LR, STEPS more); the LoRA variant d goes on beside it as f the same way. Scored and packed as round4.sh.
source bench/device/round4_lib.sh
STEPS=${STEPS:-3000}
best=$(for n in a b c; do echo "$(wer $n) $n"; done | sort -n | head -1 | cut -d' ' -f2)
case $best in a) lr=3e-4;; *) lr=5e-4;; esac  # as in round4.sh
half=$(python3 -c "print($lr / 2)"); bs=$([ $best = c ] && echo 64 || echo 32)
echo "best frozen-LLM variant: $best (lr $lr, batch $bs) -> e at lr $half"
train e $(last $best) $STEPS optimizer.lr=$half batch_size=$bs &
train f $(last d) $STEPS optimizer.lr=1.5e-4 'lora={rank: 8, alpha: 16, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: False}' &
wait; vals e f
for n in e f; do score $n & done; wait
for n in e f; do pack $n; done; ls -la $OUT
