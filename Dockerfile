# GPU image: the official PyTorch image (CUDA + cuDNN) with this project on top.
# Default command: the test suite. Training: see README.md ("Docker").
#   docker build -t ibp-short-warmup .
#   docker run --rm --gpus all ibp-short-warmup                       # runs pytest
#   docker run --rm --gpus all -v $PWD/data:/data -v $PWD/runs:/work/runs ibp-short-warmup \
#       python ibp_short_warmup.py --dataset cifar10 --data-dir /data
# The base image already holds torch and torchvision (we test with torch 2.14.1); only the
# test tools are added. BASE can point at another official tag, e.g. one with torch 2.14.1.
ARG BASE=pytorch/pytorch:2.9.1-cuda12.8-cudnn9-runtime
FROM ${BASE}
WORKDIR /work
RUN python -m pip install --no-cache-dir hypothesis==6.170.17 pytest==9.2.0
COPY ibp_short_warmup.py test_ibp.py pytest.ini requirements.txt README.md ./
COPY tests_property ./tests_property
CMD ["python", "-m", "pytest"]
