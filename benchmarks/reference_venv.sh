#!/usr/bin/env bash
# Build a virtualenv in which the public Lever-Plus reference trainer (lever_lm.workflows.grpo_post_train) imports
# and runs on the CPU, for the side-by-side throughput benchmark:
#
#   bash benchmarks/reference_venv.sh /path/to/refvenv
#   python benchmarks/train_throughput.py --preset --reference-path /path/to/Lever-Plus \
#       --reference-python /path/to/refvenv/bin/python
#
# The reference's own requirements (torch 2.0.1 with CUDA, transformers 4.28, an openicl that wants an old
# huggingface_hub) do not install beside leverplus's, and leverplus's environment must never receive them. Its
# training path touches only torch; the rest are imported at module load through open_mmicl and lever_lm.models,
# so current releases serve, and the packages whose pins conflict go in without their dependency pins. torch and
# torchvision are a matching pair from PyPI (torchvision's extension needs the torch it was built against; no
# CPU-only torchvision wheel is on the package registries this machine reaches). Checked on 2026-12-02 against
# the reference at c228df3: the trainer imports and trains.
set -euo pipefail
venv="${1:?usage: bash benchmarks/reference_venv.sh VENV_DIR}"
python3 -m venv "$venv"
pip="$venv/bin/pip"
"$pip" install -q --upgrade pip
"$pip" install -q "torch==2.14.1" "torchvision==0.29.1"
"$pip" install -q "numpy==2.4.6" "tqdm==4.70.1" "loguru==0.7.3" "more-itertools==11.2.1" "omegaconf==2.4.0" \
    "pillow==13.0.0" "requests==2.34.2" "transformers==5.24.0" "huggingface_hub==1.33.0" "datasets==5.0.1" \
    "faiss-cpu==1.15.1" "einops==0.8.2" "einops-exts==0.0.4" "accelerate==1.16.0" "rank-bm25==0.2.2" \
    "nltk==3.10.4" "sentence-transformers==6.3.0" "evaluate==0.4.6" "openai==3.57.0" "ftfy==6.3.1" \
    "scikit-learn==1.9.1" "torch==2.14.1"
# pins of these would pull torch 2.0.1 / transformers 4.28: installed without their dependency pins
"$pip" install -q --no-deps "open_clip_torch==3.3.0" "open-flamingo==2.0.1" "openicl==0.1.8" "peft==0.21.2" \
    "qwen-vl-utils==0.0.14"
"$venv/bin/python" -c "import torch, transformers; print('reference venv:', torch.__version__, transformers.__version__)"
