# Stages `opd`, `opd_offpolicy`: torchrun under Flyte's Elastic plugin. Needs nothing beyond
# the training base (images/train-base.Dockerfile: DeepSpeed with its ops).
ARG BASE_IMAGE=flowrl-train-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
USER 1000
