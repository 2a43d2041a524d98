#!/bin/bash
# Round 4 of the shipped ASR specialist, first command on the lent H100 (README.md here; every piece
# carried first). Four continuations of round 3's step 700 on the 18000 utterances share the GPU for TL s,
# cosine to 0 after 100 warmup steps:  a: lr 3e-4   b: lr 5e-4   c: lr 5e-4, batch 64   d: a + LoRA r8 on q/v.
# Each is then scored on the 150 held-out utterances and packed into $OUT.
source bench/device/round4_lib.sh
INIT=/root/payload/extra/r3_step_700
train a $INIT 2200 optimizer.lr=3e-4 &
train b $INIT 2200 optimizer.lr=5e-4 &
train c $INIT 1100 optimizer.lr=5e-4 batch_size=64 &
train d $INIT 2200 optimizer.lr=3e-4 'lora={rank: 8, alpha: 16, dropout: 0.0, attn_modules: [q_proj, v_proj], apply_to_mlp: False}' &
wait; vals a b c d
for n in a b c d; do score $n & done; wait
for n in a b c d; do pack $n; done; ls -la $OUT
