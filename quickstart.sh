#!/usr/bin/env bash
# The whole pipeline on the Fashion-MNIST subset shipped in assets/ (no download), sized for a
# 2-core CPU (README.md, "What the quickstart does", says how long it takes): train experts, distill one image per class, then evaluate the
# distilled set beside one random real image per class. Everything lands in $OUT (default
# quickstart/), started afresh. The sizes below can be overridden from the environment.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-.venv/bin/python}
out=${OUT:-quickstart}
model=${MODEL:-ConvNetW32}
experts=${EXPERTS:-4}
train_epochs=${TRAIN_EPOCHS:-8}
iterations=${ITERATIONS:-200}
eval_epochs=${EVAL_EPOCHS:-300}

# Start afresh, deleting only what an earlier quickstart made: OUT is marked as ours when created.
if [ -e "$out" ] && [ ! -e "$out/.quickstart" ]; then
    echo "error: OUT=$out exists and was not made by quickstart.sh; give a new folder" >&2
    exit 1
fi
rm -rf "$out/buffers" "$out/distilled" "$out/results.json"
mkdir -p "$out" && touch "$out/.quickstart"
data=(--dataset FashionMNIST-mini --model "$model")
"$python" buffer.py "${data[@]}" --buffer_path "$out/buffers" --num_experts "$experts" --train_epochs "$train_epochs"
"$python" distill.py "${data[@]}" --buffer_path "$out/buffers" --save_path "$out/distilled" --ipc 1 \
    --syn_steps 20 --expert_epochs 2 --max_start_epoch $((train_epochs / 2)) --lr_img 1000 --lr_lr 1e-05 \
    --lr_teacher 0.01 --Iteration "$iterations" --eval_it 100 --num_eval 2 --epoch_eval_train "$eval_epochs"
"$python" eval.py "${data[@]}" --syn_path "$out/distilled" --iteration "$iterations" --baseline random --ipc 1 \
    --epoch_eval_train "$eval_epochs" --out "$out/results.json"
echo "distilled images: $out/distilled/synthetic_$iterations.png; curves: $out/distilled/curves.png; rows: $out/results.json"
