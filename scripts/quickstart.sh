#!/usr/bin/env bash
# The default job on a fresh machine: set up .venv, fine-tune all-MiniLM-L6-v2 into a Rotten Tomatoes teacher,
# distil it into a 3-layer student (TinyBERT-style losses), and print the side-by-side comparison.
# Extra arguments are passed to both recipes as config overrides (e.g. data.max_train_examples=500).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export HF_HUB_OFFLINE=${HF_HUB_OFFLINE:-1} TOKENIZERS_PARALLELISM=false
launch=(.venv/bin/accelerate launch --config_file recipes/accelerate/cpu.yaml)
start=$(date +%s)
"${launch[@]}" recipes/finetune_teacher.py --config recipes/teacher.yaml "$@"
"${launch[@]}" recipes/distill_student.py --config recipes/distill_tinybert.yaml "$@"
.venv/bin/python scripts/bench_models.py runs/teacher/model runs/student/model --json runs/comparison.json
echo "saved: runs/teacher/model (teacher), runs/student/model (student); total $(( $(date +%s) - start )) s"
