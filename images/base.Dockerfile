# Stage `base`: needs nothing beyond the shared runtime.
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
USER flowrl
WORKDIR /app
