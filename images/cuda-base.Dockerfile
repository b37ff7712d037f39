# Shared runtime for every stage image: CUDA 12.8 + cuDNN, Python 3.11,
# torch built for CUDA, the project's pinned dependencies and flowrl itself.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu128

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && python3.11 -m venv /opt/venv

RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}"

WORKDIR /app
COPY requirements/cpu.txt requirements/cpu.txt
# Same pins as the CPU environment, torch excepted (installed above for CUDA).
RUN grep -v '^torch==' requirements/cpu.txt > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt

COPY pyproject.toml README.md ./
COPY flowrl flowrl
COPY tasks tasks
COPY pipelines pipelines
COPY configs configs
RUN pip install --no-deps .

RUN useradd --create-home --uid 1000 flowrl
USER flowrl
