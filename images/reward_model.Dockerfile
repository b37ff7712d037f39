# Stage `reward_model` (training the reward models) and the reward server that
# serves them to GRPO: adds the server's web stack (images/requirements/reward.txt).
ARG BASE_IMAGE=flowrl-cuda-base:latest
FROM ${BASE_IMAGE}
WORKDIR /app
COPY --chown=flowrl:flowrl images/requirements/reward.txt images/requirements/reward.txt
RUN pip install --no-cache-dir -r images/requirements/reward.txt
EXPOSE 8000
USER 1000
