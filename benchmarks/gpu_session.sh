#!/usr/bin/env bash
# One GPU session in one call: install the carried wheels (`python -m benchmarks.gpu_wheels` fills .whl/ here:
# bitsandbytes for the machine's CUDA, pydantic; see docs/gpu-validation.md), then the phases in $PHASES, each under
# its own timeout. Everything lands in $OUT, row by row, so a run stopped at its time limit keeps what it measured.
#   tests     the GPU-marked tests (PYTEST_S, 120 s)
#   speed     gpu_speed.py: the transformers engine's TTFT/TPOT/tokens/s at 1/8/32 sequences, a 1B and an 8B model,
#             bf16/int8/int4, beside the speed model's prediction (SPEED_S, 240 s)
#   heldout   gpu_validate.py on models and a context the memory calibration did not use (Mistral-7B, Qwen3-8B,
#             gemma-2-9b at 8k tokens): an independent check of the constants as they stand (HELDOUT_S, 300 s)
#   calibrate gpu_validate.py on the calibration's own models (Llama-3.2-1B, Llama-3.1-8B, Qwen2.5-7B at 4k)
#             (VALIDATE_S, 420 s)
#   OUT=/tmp/out bash benchmarks/gpu_session.sh                      # PHASES="speed heldout": 540 s at most
#   OUT=/tmp/out PHASES="tests calibrate" bash benchmarks/gpu_session.sh
set -u
OUT=${OUT:-/tmp/gpuplan-gpu-out}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/smi.txt"
python3 -c "import torch, transformers, bitsandbytes, pydantic; print('torch', torch.__version__, 'transformers',
transformers.__version__, 'bitsandbytes', bitsandbytes.__version__, 'pydantic', pydantic.__version__)" 2>&1 \
  | tee -a "$OUT/smi.txt"
python3 - <<'PY' 2>&1 | tee -a "$OUT/smi.txt"
import torch
a = torch.randn(256, 256, device="cuda", dtype=torch.bfloat16)
torch.cuda.synchronize()
before = torch.cuda.memory_allocated()
c = a @ a
torch.cuda.synchronize()
print("allocator bytes taken by the first bf16 matmul beyond its output (cuBLAS workspace):",
      torch.cuda.memory_allocated() - before - c.numel() * c.element_size())
PY
for phase in ${PHASES:-speed heldout}; do
  case "$phase" in
    tests)
      timeout "${PYTEST_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.log" ;;
    speed)
      timeout "${SPEED_S:-240}" python3 -m benchmarks.gpu_speed \
        --models ${SPEED_MODELS:-meta-llama/Llama-3.1-8B meta-llama/Llama-3.2-1B-Instruct} --schemes bf16 int8 int4 \
        --batches 1 8 32 --input-tokens 512 --output-tokens 128 \
        --jsonl "$OUT/speed.jsonl" --out "$OUT/gpu-speed.md" 2>&1 | tee "$OUT/speed.log" ;;
    heldout)
      timeout "${HELDOUT_S:-300}" python3 -m benchmarks.gpu_validate \
        --models ${HELDOUT_MODELS:-mistralai/Mistral-7B-Instruct-v0.3 Qwen/Qwen3-8B google/gemma-2-9b-it} \
        --schemes bf16 int8 int4 --max-model-len 8192 --max-num-seqs 2 \
        --jsonl "$OUT/heldout.jsonl" --out "$OUT/gpu-heldout.md" 2>&1 | tee "$OUT/heldout.log" ;;
    calibrate)
      timeout "${VALIDATE_S:-420}" python3 -m benchmarks.gpu_validate \
        --models ${MODELS:-meta-llama/Llama-3.2-1B-Instruct meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B-Instruct} \
        --schemes bf16 int8 int4 --max-model-len 4096 --max-num-seqs 4 \
        --jsonl "$OUT/rows.jsonl" --out "$OUT/gpu-validation.md" 2>&1 | tee "$OUT/validate.log" ;;
    *) echo "unknown phase $phase (tests, speed, heldout, calibrate)" | tee -a "$OUT/smi.txt" ;;
  esac
done
