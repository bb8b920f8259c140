#!/usr/bin/env bash
# docs/benchmarks.md section 6 in one go on a CUDA machine: the GPU tests, where a step's time goes, the engine's
# throughput on a random 1B-shape model, speed and memory to 1M tokens (famserve BSWA and FAM against HF), quality
# at full scale, and perplexity over a document of 2.9M tokens (bench/texts.py --long data/long).
#
#   bench/gpu_suite.sh MODEL.gguf OUT_DIR [TEXTS_DIR] [STAGE ...]
#   stages (default: all but long): tests profile throughput speed chunk graphs quality long trainstep
#   (trainstep: what one `famserve train` step costs at the serving shape, merged against unmerged LoRA)
#
# The device tool carries at most 64 MiB a call and SmolLM2's GGUF is 94 MiB: split it (`split -n 2`), carry one half
# per call, and copy each to /tmp on the device in its call (a carried path is gone from the checkout by the next
# call; /tmp stays while the machine is warm, 30 s between calls), then `cat` the halves and check the sha256.
#
# Runs from a checkout without installing famserve (only torch, transformers, safetensors, tokenizers, gguf and
# jinja2 are needed). Each stage has its own time limit (seconds, from the environment) so that one slow stage
# cannot eat the others' time; every stage writes its JSON as it goes, so a stage cut short keeps what it measured.
set -uo pipefail
model=${1:?usage: bench/gpu_suite.sh MODEL OUT_DIR [TEXTS_DIR] [STAGE ...]}
out=${2:?usage: bench/gpu_suite.sh MODEL OUT_DIR [TEXTS_DIR] [STAGE ...]}
texts=${3:-data/texts}
shift $(( $# < 3 ? $# : 3 ))
stages=${*:-tests profile throughput speed chunk graphs quality}
py=${PYTHON:-python3}
cd "$(dirname "$0")/.."
mkdir -p "$out"
export PYTHONUNBUFFERED=1

if ! "$py" -c "import famserve.engine" 2>/dev/null; then
    # The folders engine/, server/, clients/ are the packages famserve.engine, ... (pyproject's package-dir).
    ns=$(mktemp -d)/ns
    mkdir -p "$ns/famserve"
    for pkg in engine server clients; do ln -s "$PWD/$pkg" "$ns/famserve/$pkg"; done
    export PYTHONPATH="$ns${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$py" -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"

stage() {  # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    echo "=== $name (limit ${limit} s) $(date -u +%T)"
    timeout --signal=INT --kill-after=10 "$limit" "$@"
    echo "=== $name: exit $? $(date -u +%T)"
}

for s in $stages; do
    case $s in
    tests)
        stage tests "${TESTS_LIMIT:-120}" "$py" -m pytest tests/engine/test_cuda.py -m gpu -q -p no:cacheprovider \
            2>&1 | tee "$out/gpu-tests.txt" ;;
    profile)
        stage profile "${PROFILE_LIMIT:-90}" "$py" bench/profile_step.py --device cuda --dtype bfloat16 \
            --out "$out/profile_step.json" ;;
    throughput)  # and BSWA with every decode step eager, the baseline of the CUDA graphs
        for run in ${THROUGHPUT_RUNS:-bswa fam bswa-eager}; do
            stage "throughput $run" "${THROUGHPUT_LIMIT:-90}" "$py" bench/throughput.py --random-shape llama-1b \
                --mode "${run%-eager}" --device cuda --dtype bfloat16 --streams "${STREAMS:-1,4,16,32}" \
                --repeats 3 $([ $run = bswa-eager ] && echo --no-cuda-graphs) --out "$out/throughput_llama1b_$run.json"
        done ;;
    speed)
        stage speed "${SPEED_LIMIT:-300}" "$py" bench/engine_speed.py --model "$model" --device cuda \
            --dtype bfloat16 --systems hf,bswa,fam --contexts 1024,8192,32768,131072,1048576 --repeats 3 \
            --repeat-max-context 131072 --hf-max-context 131072 --out "$out/engine_speed_gpu.json" \
            --plot-dir "$out" --plot-prefix bench_gpu ;;
    chunk)  # run G found every step launch-bound (a 512-token step costs what a 1-token one does): eight BSWA
        # blocks a pass (8192: FamModel.prefill_blocks), FAM one whole block a step; the `graphs` stage has 512
        stage "chunk 8192" "${CHUNK_LIMIT:-90}" "$py" bench/engine_speed.py --model "$model" --device cuda \
            --dtype bfloat16 --systems bswa,fam --contexts 8192,32768 --decode-tokens 16 --repeats 3 \
            --prefill-chunk 8192 --no-roofline --out "$out/engine_speed_chunk8192.json" --plot-dir "" ;;
    graphs)  # one stream's decode replayed from CUDA graphs (the default on CUDA) against eager steps, HF beside
        for graphs in ${GRAPHS_MODES:-on off}; do
            systems=hf,bswa,fam flag=  # HF first: run I's time limit stopped it when it came last
            [ $graphs = off ] && systems=bswa,fam flag=--no-cuda-graphs
            stage "graphs $graphs" "${GRAPHS_LIMIT:-150}" "$py" bench/engine_speed.py --model "$model" \
                --device cuda --dtype bfloat16 --systems $systems --contexts 1024,32768 --decode-tokens 128 \
                --repeats 3 --no-roofline $flag --out "$out/engine_speed_graphs_$graphs.json" --plot-dir ""
        done ;;
    quality)
        stage quality "${QUALITY_LIMIT:-300}" "$py" bench/quality.py --model "$model" --device cuda \
            --dtype bfloat16 --modes bswa,full,bswa-nosink --texts-dir "$texts" \
            --books "${BOOKS:-warofworlds,prideprejudice,mobydick}" \
            --passkey-lengths 1024,4096,16384,32768,131072 --passkey-trials "${PASSKEY_TRIALS:-10}" \
            --passkey-batch 10 --out "$out/quality_gpu.json" --plot-dir "" ;;
    long)
        stage long "${LONG_LIMIT:-400}" "$py" bench/quality.py --model "$model" --device cuda --dtype bfloat16 \
            --modes "${LONG_MODES:-bswa,full}" --texts-dir "${LONG_TEXTS:-data/long}" \
            --books "${LONG_BOOKS:-treasuryofdavid}" --skip-passkey --out "$out/quality_long.json" --plot-dir "" ;;
    trainstep)
        stage trainstep "${TRAINSTEP_LIMIT:-180}" "$py" bench/train_step.py --model "$model" --device cuda \
            --precision bfloat16 --configs 1024,3,64,4,6144 --batch-size 4 --variants current,unmerged --rounds 3 \
            --profile --out "$out/train_step_gpu.json" ;;
    *) echo "unknown stage $s (tests profile throughput speed chunk graphs quality long trainstep)"; exit 2 ;;
    esac
done
