# Stages `opd`, `opd_offpolicy`: torchrun under Flyte's Elastic plugin; adds DeepSpeed
# (built without precompiled ops, see grpo.Dockerfile).
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
ENV DS_BUILD_OPS=0
COPY --chown=flowrl:flowrl images/requirements/train.txt images/requirements/train.txt
RUN pip install --no-cache-dir --no-build-isolation -r images/requirements/train.txt
USER 1000
