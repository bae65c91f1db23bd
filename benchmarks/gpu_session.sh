#!/usr/bin/env bash
# One GPU session in one call: install the carried wheels (bitsandbytes, pydantic; see docs/gpu-validation.md), run
# the GPU-marked tests, then gpu_validate.py over a small, an 8B and a 7B model. Everything lands in $OUT, row by
# row, so a run stopped at its time limit still returns what it measured.
#   OUT=/tmp/out VALIDATE_S=420 bash benchmarks/gpu_session.sh
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
timeout "${PYTEST_S:-120}" python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/pytest.log"
timeout "${VALIDATE_S:-420}" python3 -m benchmarks.gpu_validate \
  --models ${MODELS:-meta-llama/Llama-3.2-1B-Instruct meta-llama/Llama-3.1-8B Qwen/Qwen2.5-7B-Instruct} \
  --schemes bf16 int8 int4 --max-model-len 4096 --max-num-seqs 4 \
  --jsonl "$OUT/rows.jsonl" --out "$OUT/gpu-validation.md" 2>&1 | tee "$OUT/validate.log"
