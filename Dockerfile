# Image: python:3.11-slim (the Python CI runs) + requirements.txt and requirements-plot.txt, the
# pins CI installs; torch's PyPI wheel carries its CUDA libraries, so it trains on a GPU as well.
# Default command: the test suite, as .ci/run runs it. Training: see README.md ("Docker").
#   docker build -t ibp-short-warmup .
#   docker run --rm --gpus all ibp-short-warmup                       # runs pytest
#   docker run --rm --gpus all -v $PWD/data:/data -v $PWD/runs:/work/runs ibp-short-warmup \
#       python ibp_short_warmup.py --dataset cifar10 --data-dir /data
# The files are the build context less .dockerignore (runs/, data/, .venv, .git, caches).
# g++: CI also runs the torch.compile test (THOROUGH_TESTS=1), and inductor compiles C++ on the CPU.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 THOROUGH_TESTS=1
RUN apt-get update && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /work
COPY requirements.txt requirements-plot.txt ./
RUN python -m pip install --no-cache-dir -r requirements.txt -r requirements-plot.txt
COPY . ./
CMD ["python", "-m", "pytest"]
