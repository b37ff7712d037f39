# Under the training images (grpo, opd): DeepSpeed and its optimizer ops, on the devel
# flavour of the shared base (flowrl-cuda-devel: nvcc, g++, Python's headers).
# - FusedAdam, the GPU optimizer, is compiled here for TORCH_CUDA_ARCH_LIST (A100, H100;
#   PTX for later GPUs). No GPU is visible during `docker build`, so DS_ACCELERATOR names
#   the accelerator to build for.
# - CPU Adam, which ZeRO's optimizer offload runs, is compiled just in time on the node that
#   first runs it (into ~/.cache/torch_extensions): DeepSpeed compiles it with -march=native,
#   so a copy built here would carry the build host's CPU instructions. The build compiles it
#   once into a throwaway folder to prove the toolchain works.
# The build fails when either op cannot be built; ds_report writes the op table into its log.
ARG BASE_IMAGE=flowrl-cuda-devel:latest
FROM ${BASE_IMAGE}
WORKDIR /app
ARG TORCH_CUDA_ARCH_LIST="8.0;9.0+PTX"
ENV DS_ACCELERATOR=cuda
COPY --chown=flowrl:flowrl images/requirements/train.txt images/requirements/train.txt
# DeepSpeed's sdist imports torch and ninja while it builds: its requirements go in first.
RUN sed '/^deepspeed==/d' images/requirements/train.txt > /tmp/train-deps.txt \
    && pip install --no-cache-dir -r /tmp/train-deps.txt \
    && DS_BUILD_OPS=0 DS_BUILD_FUSED_ADAM=1 \
       pip install --no-cache-dir --no-build-isolation --no-deps -r images/requirements/train.txt \
    && rm /tmp/train-deps.txt
RUN ds_report \
    && python -c "from deepspeed.git_version_info import accelerator_name as a, installed_ops as ops; \
assert a == 'cuda' and ops['fused_adam'], f'FusedAdam not prebuilt for cuda: {a!r} {ops}'" \
    && TORCH_EXTENSIONS_DIR=/tmp/ds-jit-check python -c "from deepspeed.ops.op_builder.cpu import CPUAdamBuilder; \
CPUAdamBuilder().load()" \
    && rm -rf /tmp/ds-jit-check
USER 1000
