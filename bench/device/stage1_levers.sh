#!/bin/bash
# Stage-1 levers side by side on a lent GPU (README.md here: carry .xfer first, with the payload packed from
# runs/features/whisper_base_trimmed and runs/features/stage1_levers). Four stage1_full runs from scratch share
# the GPU for TL s, written-form targets in all:  a: as stage1_full   b: 6 layers per block (the paper's depth)
#   c: + CTC over the embedding table (weight 0.3)   d: the 31-voice corpus + reverb/telephone copies (train manifest
# runs/features/stage1_levers/train: BENCHMARKS.md, "Stage-1 levers").
# Each is scored zero-shot on the dev voices; the best by dev WER alone is then scored on the test voices, once.
source .xfer/dev.sh && unpack_payload || exit 1
R=/root/s1; mkdir -p $R; TL=${TL:-420}; STEPS=${STEPS:-8000}
F=runs/features/whisper_base_trimmed
last() { echo $R/$1/checkpoints/$(cat $R/$1/checkpoints/latest); }
train() {  # NAME [overrides]: at most TL seconds; the cosine schedule spans STEPS
  local n=$1; shift
  timeout $TL python3 -m torchtune._cli.tune run speechmapper_pretrain --config smollm2_135M/stage1_full device=cuda \
      output_dir=$R/$n max_steps=$STEPS val_every_n_steps=1000 save_every_n_steps=1000 data.target_text=written \
      data.num_workers=3 "$@" > $R/$n.log 2>&1
  echo "train $n rc=$? last=$(last $n)"
}
score() {  # NAME SPLIT: the demo's zero-shot decoding of the split from the last checkpoint, then WER
  local n=$1 s=$2
  python3 -m torchtune._cli.tune run speechmapper_generate --config smollm2_135M/generate prompt=null device=cuda \
      projector_checkpoint=$(last $n) manifest=$F/$s/cuts.jsonl.gz output_dir=$R/gen_${n}_$s stop_at_newline=True \
      length_cap.tokens_per_second=4.0 length_cap.extra=4 batch_size=50 > $R/gen_${n}_$s.log 2>&1 &&
  python3 -m torchtune._cli.tune run speechmapper_eval --config eval/default output_dir=$R/eval_${n}_$s \
      "generations={$n: $R/gen_${n}_$s/generations.jsonl}" > $R/eval_${n}_$s.log 2>&1
  echo "score $n $s: $(python3 -c "import json; r=json.load(open('$R/eval_${n}_$s/results.json'))[0]; print(f\"WER {r['wer']:.1f} CER {r['cer']:.1f} stuck {r['stuck']}\")" 2>&1)"
}
wer() { python3 -c "import json; print(json.load(open('$R/eval_$1_dev/results.json'))[0]['wer'])" 2>/dev/null || echo 999; }
train a &
train b model.num_layers=6 &
train c loss.ctc_weight=0.3 &
train d data.train_manifest=runs/features/stage1_levers/train/cuts.jsonl.gz &
wait
for n in a b c d; do score $n dev & done; wait
best=$(for n in a b c d; do echo "$(wer $n) $n"; done | sort -n | head -1 | cut -d' ' -f2)
echo "best on dev: $best"; score $best test
for n in a b c d; do s=$(cat $R/$n/checkpoints/latest)
  tar -C $R --exclude=recipe_state.pt -czf $OUT/$n.tgz $n/checkpoints/$s $n/metrics.jsonl $n.log gen_${n}_dev eval_${n}_dev gen_${n}_test eval_${n}_test 2>/dev/null
done; ls -la $OUT
