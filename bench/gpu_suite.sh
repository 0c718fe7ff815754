#!/usr/bin/env bash
# shellcheck disable=SC2086,SC2046  # $PY, $IMG, the flag lists and the --resume test are word lists
# The GPU measurements of docs/benchmarks.md, in order of priority, each stopped at its time limit, resumable.
#
#   bench/gpu_suite.sh RESULTS [SECONDS]      # e.g. bench/gpu_suite.sh runs/gpu 520
#
# Items, in order (an item whose RESULTS/<item>.done exists is skipped, so a second run picks up at the first item
# not done; an item that cannot get its minimum time before SECONDS, default 540, have passed is left for later):
#   data        the synthetic set at Market-1501's counts (--preset market, 128×64 like Market's boxes), prepared
#               by the standard protocol (no validation identities), generated in parallel
#   step        bench/train_throughput.py: resnet50 + vae, 16×4 at 256×128, bf16, the tensor loader, with a
#               compiled row: ours on tensors / bare, ours with the loader / bare
#   model_step  bench/model_step.py on resnet50 (vae, none): the step's heads alone, kernel-running operators,
#               and the operators its host time goes to (--profile)
#   market      train.py --config configs/market_strong_baseline.yaml (resnet50, --ae-name none, BN-neck
#               embedding, label smoothing, erasing, 16×4 at 256×128, Adam 3.5e-4, warm-up then ×0.1 steps, bf16,
#               tensor loader) from scratch on that set, for MARKET_EPOCHS (default 12) with the 120-epoch schedule
#               scaled to them; seconds an epoch in metrics.jsonl
#   eval        bench/eval_timing.py on that model: embedding the 19,281 query and gallery images, ranking them
#               plain and re-ranked (test mAP of both)
#   grid        the seed's grid: resnet152 densenet121 vgg16_bn swin_b × none, vae, sae with degraded views, all
#               at once on the one GPU, GRID_EPOCHS (default 4) epochs each, then clean and corrupted test mAP
#
# Environment: ITEMS (the items to run, default all), STEP_FLAGS and MARKET_FLAGS (more train.py flags for the
# step bench and the market run, e.g. "--compile --compile-mode reduce-overhead"),
# PYTHON (default python3), DEVICE (cuda), IMG ("256 128"), WORKERS (12), MARKET_EPOCHS, GRID_EPOCHS,
# and for a small trial on the CPU DATA_ROOT (data/suite-market), prepare.py's flags for the data DATA_FLAGS
# (default: the market preset's own sizes) and the grid's runs GRID ("backbone,ae[,flags] ...").
set -u
RESULTS=${1:?usage: bench/gpu_suite.sh RESULTS [SECONDS]}
BUDGET=${2:-540}
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
IMG=${IMG:-256 128}
WORKERS=${WORKERS:-12}
DATA=${DATA_ROOT:-data/suite-market}
RAW=$DATA-raw
MARKET_EPOCHS=${MARKET_EPOCHS:-12}
GRID_EPOCHS=${GRID_EPOCHS:-4}
DATA_FLAGS=${DATA_FLAGS:-}
ITEMS=${ITEMS:-data step model_step market eval grid}
STEP_FLAGS=${STEP_FLAGS:-}
MARKET_FLAGS=${MARKET_FLAGS:-}
GRID=${GRID:-"resnet152,none resnet152,vae resnet152,sae,--degraded-views densenet121,none densenet121,vae
densenet121,sae,--degraded-views vgg16_bn,none vgg16_bn,vae vgg16_bn,sae,--degraded-views swin_b,none swin_b,vae
swin_b,sae,--degraded-views"}
mkdir -p "$RESULTS"
export PYTHONUNBUFFERED=1

# item NAME MIN_SECONDS MAX_SECONDS COMMAND...: run COMMAND under a time limit unless done; log in RESULTS/NAME.log
item() {
    local name=$1 least=$2 limit=$3 left rc
    shift 3
    case " $ITEMS " in *" $name "*) ;; *) return 0 ;; esac
    if [ -f "$RESULTS/$name.done" ]; then echo "== $name: done earlier"; return 0; fi
    left=$((BUDGET - SECONDS))
    if [ "$left" -lt "$least" ]; then echo "== $name: not run, ${left} s left of $BUDGET (needs $least)"; return 1; fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name: at most $limit s"
    local started=$SECONDS
    timeout --signal=INT --kill-after=30 "$limit" bash -c '"$@"' bash "$@" >"$RESULTS/$name.log" 2>&1
    rc=$?
    tail -n 25 "$RESULTS/$name.log"
    echo "== $name: exit $rc after $((SECONDS - started)) s"
    [ "$rc" -eq 0 ] && date -u +%FT%TZ >"$RESULTS/$name.done"
    return "$rc"
}

versions() {
    $PY -c "import torch, json; print(json.dumps({'torch': torch.__version__, 'cuda': torch.version.cuda,
'device': torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu'}))" >"$RESULTS/versions.json"
}

market_train() {
    local e=$MARKET_EPOCHS
    $PY train.py --config configs/market_strong_baseline.yaml --data "$DATA" --result-dir "$RESULTS/market" \
        --pretrained none --img-size $IMG --epochs "$e" --warmup-epochs "$(awk "BEGIN {print 10 * $e / 120}")" \
        --milestones "$(awk "BEGIN {print 40 * $e / 120}")" "$(awk "BEGIN {print 70 * $e / 120}")" \
        --device "$DEVICE" --workers "$WORKERS" --quiet $MARKET_FLAGS \
        $([ -f "$RESULTS/market/checkpoint.pt" ] && echo --resume)
}

# One grid run: train (resuming), then clean and corrupted test mAP into its eval/results.json.
grid_run() {
    local backbone=$1 ae=$2 extra=$3 dir
    dir="$RESULTS/grid/${backbone}_${ae}"
    $PY train.py --config configs/study.yaml --data "$DATA" --result-dir "$dir" --backbone-name "$backbone" \
        --ae-name "$ae" --img-size $IMG --epochs "$GRID_EPOCHS" --warmup-epochs 1 --amp --device "$DEVICE" \
        --workers 2 --quiet \
        --no-degraded-views $extra $([ -f "$dir/checkpoint.pt" ] && echo --resume) >"$dir.log" 2>&1 &&
        $PY eval.py --result-dir "$dir" --corrupt all --device "$DEVICE" --workers 2 --verify-pairs 0 >>"$dir.log" 2>&1
}

grid() {
    mkdir -p "$RESULTS/grid"
    local spec backbone ae extra pids=()
    for spec in $GRID; do
        IFS=, read -r backbone ae extra <<<"$spec"
        grid_run "$backbone" "$ae" "${extra:-}" &
        pids+=($!)
    done
    local failed=0 pid
    for pid in "${pids[@]}"; do wait "$pid" || failed=1; done
    return "$failed"
}

export RESULTS PY DEVICE IMG WORKERS DATA MARKET_EPOCHS GRID_EPOCHS GRID MARKET_FLAGS
export -f market_train grid_run grid
versions
item data 60 300 $PY prepare.py --synthetic "$RAW" --preset market $DATA_FLAGS --out "$DATA" --val-ids 0 \
    --workers "$(nproc)" --quiet || exit 1
item step 120 300 $PY bench/train_throughput.py --device "$DEVICE" --data "$DATA" --workers "$WORKERS" \
    --compile-row --rounds 3 --steps 30 --warmup 5 --img-size $IMG --json "$RESULTS/step_resnet50.json" -- $STEP_FLAGS
item model_step 45 120 $PY bench/model_step.py --device "$DEVICE" --backbones resnet50 --ae vae none --batch 64 \
    --img-size $IMG --profile --json "$RESULTS/model_step_resnet50.json"
item market 90 300 market_train
item eval 45 200 $PY bench/eval_timing.py --result-dir "$RESULTS/market" --device "$DEVICE" --workers "$WORKERS" \
    --batch-size 256 --json "$RESULTS/eval_timing.json"
item grid 240 3600 grid
echo "== suite: $SECONDS s; results in $RESULTS"
