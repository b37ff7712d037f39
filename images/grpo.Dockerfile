# Stages `grpo_t2i`, `grpo_edit`, `grpo_mixed`: torchrun under Flyte's Elastic plugin.
# Adds DeepSpeed (ZeRO for full-parameter Qwen-Image training; built without
# precompiled ops, which are compiled just in time when a config asks for
# them) and the reward server's stack for the sidecar reward server.
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
ENV DS_BUILD_OPS=0
COPY --chown=flowrl:flowrl images/requirements/reward.txt images/requirements/train.txt images/requirements/
RUN pip install --no-cache-dir -r images/requirements/reward.txt \
    && pip install --no-cache-dir --no-build-isolation -r images/requirements/train.txt
USER 1000
