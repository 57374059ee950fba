#!/usr/bin/env bash
# The GPU session's one prepared call (torch + triton only, under 8 minutes on an H200): the
# expert-kernel table, then the training-step table of MoEUT-244M (Triton and PyTorch paths)
# and dense-244M. Both go to docs/benchmarks.md.
#
#     bash bench/gpu.sh            # on the device tool: run(command="bash bench/gpu.sh", timeout_s=540)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
python -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 270 python bench/kernels.py --repeats 3
timeout 240 python bench/train_step.py --gpu --steps 3
