# Stages `grpo`, `grpo_mixed`: torchrun under Flyte's Elastic plugin, on the training base
# (images/train-base.Dockerfile: DeepSpeed with its ops), plus the reward server's web stack
# for the sidecar reward server.
ARG BASE_IMAGE=flowrl-train-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
COPY --chown=flowrl:flowrl images/requirements/reward.txt images/requirements/reward.txt
RUN pip install --no-cache-dir -r images/requirements/reward.txt
USER 1000
