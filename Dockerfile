# distillery on a GPU host: CUDA runtime, the CUDA build of the pinned torch, non-root.
# The model folder is a volume; its default content is the embedded toy model and adapters.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 distillery \
    && useradd --create-home --uid 10001 --gid 10001 distillery \
    && install -d -o 10001 -g 10001 /var/cache/distillery

WORKDIR /app
# Dependencies first (cached layer): torch 2.13.0 from PyPI is its CUDA build on linux x86_64.
# The lock's versions, except triton: torch's CUDA build brings the triton it was built against.
COPY pyproject.toml README.md constraints.txt ./
RUN grep -v '^triton==' constraints.txt > /tmp/constraints.txt \
    && python3 -m venv /opt/venv && /opt/venv/bin/pip install -c /tmp/constraints.txt torch==2.13.0
COPY distillery distillery
RUN /opt/venv/bin/pip install -c /tmp/constraints.txt .
COPY --chown=distillery:distillery models /models

ENV PATH=/opt/venv/bin:$PATH \
    DISTILLERY_MODEL_PATH=/models/toy \
    DISTILLERY_ADAPTERS_ROOT=/models/adapters \
    DISTILLERY_DEVICE=cuda
# Everything the libraries cache goes under /var/cache/distillery (a writable folder here; an emptyDir in
# deploy/k8s/, whose root filesystem is read-only): Hugging Face downloads, Triton kernels, Inductor code,
# CUDA's JIT cache, matplotlib's config. No .pyc written at run time.
ENV XDG_CACHE_HOME=/var/cache/distillery \
    HF_HOME=/var/cache/distillery/huggingface \
    TRITON_HOME=/var/cache/distillery \
    TRITON_CACHE_DIR=/var/cache/distillery/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/distillery/torchinductor \
    CUDA_CACHE_PATH=/var/cache/distillery/nv \
    MPLCONFIGDIR=/var/cache/distillery/matplotlib \
    PYTHONDONTWRITEBYTECODE=1
VOLUME ["/models"]
# Numeric, so that Kubernetes' runAsNonRoot can check it (deploy/k8s/deployment.yaml runs as 10001 too).
USER 10001:10001
EXPOSE 8000
# /healthz answers once the process listens (deploy/k8s allows 15 min for a real model to get there).
HEALTHCHECK --interval=15s --timeout=3s --start-period=600s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["distillery", "serve", "--host", "0.0.0.0", "--port", "8000"]
