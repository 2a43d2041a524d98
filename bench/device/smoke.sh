#!/bin/bash
# The CUDA check (about 1.5 min with the machine's start): tiny stage 1 with bf16 autocast, tiny
# stage 2 with the bf16 LLM, generation, all with device=cuda through the real recipes.
source .xfer/dev.sh
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; python3 -V
python3 -c "import torch, torchtune, lhotse, speechmapper_adapt; print('torch', torch.__version__, torch.cuda.is_available())"
S=/root/smoke; rm -rf $S; set -e
T run speechmapper_pretrain --config tiny/stage1 output_dir=$S/s1 max_steps=10 device=cuda dtype=bf16 val_every_n_steps=5 save_every_n_steps=10
mkdir -p $S/s2 && cp -r $S/s1/data $S/s2/data
T run speechmapper_adapt --config tiny/stage2 output_dir=$S/s2 projector_checkpoint=$S/s1/checkpoints/step_10 from_scratch=False \
    max_steps=10 device=cuda llm.dtype=bf16 val_every_n_steps=5 save_every_n_steps=10
T run speechmapper_generate --config tests/configs/tiny/generate.yaml projector_checkpoint=$S/s2/checkpoints/step_10 \
    manifest=$S/s1/data/val.jsonl.gz llm.checkpoint=$S/s1/data/llm output_dir=$S/gen device=cuda llm.dtype=bf16
echo SMOKE_OK
