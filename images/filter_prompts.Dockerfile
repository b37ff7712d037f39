# Stage `filter_prompts`: sample groups with the base model and score them with the reward models.
# Needs nothing beyond the shared runtime (images/cuda-base.Dockerfile).
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
USER 1000
