#!/bin/bash
# Shared by round4.sh and round4_more.sh (round 4 of the ASR specialist on the lent H100): train / score / pack one variant.
source .xfer/dev.sh && unpack_payload || exit 1
R=/root/r4; mkdir -p $R; TL=${TL:-450}
F=runs/features/whisper_base_trimmed
COMMON="--config smollm2_135M/stage2_asr_full device=cuda data.train.manifest=$F/train18k/cuts.jsonl.gz
  lr_scheduler._component_=speechmapper_tune.schedules.warmup_cosine_schedule lr_scheduler.num_warmup_steps=100
  val_every_n_steps=500 save_every_n_steps=250 keep_last_n_checkpoints=2"
last() { echo $R/$1/checkpoints/$(cat $R/$1/checkpoints/latest); }
train() {  # NAME INIT STEPS [overrides]: at most TL seconds
  local n=$1 init=$2 steps=$3; shift 3
  timeout $TL python3 -m torchtune._cli.tune run speechmapper_adapt $COMMON output_dir=$R/$n projector_checkpoint=$init \
      max_steps=$steps lr_scheduler.num_training_steps=$steps "$@" > $R/$n.log 2>&1
  echo "train $n rc=$? last=$(last $n)"
}
score() {  # NAME: the demo's decoding of the 150 held-out utterances from its last checkpoint, then WER
  local n=$1
  python3 -m torchtune._cli.tune run speechmapper_generate --config smollm2_135M/generate device=cuda \
      projector_checkpoint=$(last $n) manifest=$F/test/cuts.jsonl.gz output_dir=$R/gen_$n 'prompt.assistant_prefix="Transcript:"' \
      stop_at_newline=True length_cap.tokens_per_second=4.0 length_cap.extra=4 batch_size=50 > $R/gen_$n.log 2>&1 &&
  python3 -m torchtune._cli.tune run speechmapper_eval --config eval/default output_dir=$R/eval_$n \
      "generations={$n: $R/gen_$n/generations.jsonl}" > $R/eval_$n.log 2>&1
  echo "score $n rc=$? $(last $n): $(python3 -c "import json; r=json.load(open('$R/eval_$n/results.json'))[0]; print(f\"WER {r['wer']:.1f} CER {r['cer']:.1f} stuck {r['stuck']}\")" 2>&1)"
}
wer() { python3 -c "import json; print(json.load(open('$R/eval_$1/results.json'))[0]['wer'])" 2>/dev/null || echo 999; }
pack() {  # NAME: last checkpoint (projector, config, LoRA adapters), curves, log, generations -> $OUT/NAME.tgz
  local n=$1 s=$(cat $R/$1/checkpoints/latest)
  tar -C $R --exclude=recipe_state.pt -czf $OUT/$n.tgz $n/checkpoints/$s $n/metrics.jsonl $n.log gen_$n/generations.jsonl eval_$n 2>/dev/null
}
vals() { for n in "$@"; do echo "$n: $(grep -h '"val' $R/$n/metrics.jsonl 2>/dev/null | tail -2 | tr '\n' ' ' | cut -c1-400)"; done; }
