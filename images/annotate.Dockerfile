# Stage `annotate`: sample the base model and label the samples.
# Needs nothing beyond the shared runtime (images/cuda-base.Dockerfile).
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
USER 1000
