# Stage `bench`: sample every model on the bench split, judge, fit the arenas, write the report.
# Needs nothing beyond the shared runtime (images/cuda-base.Dockerfile).
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
USER 1000
