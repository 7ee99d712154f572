# distillery on a GPU host: CUDA runtime, the CUDA build of the pinned torch, non-root.
# The model folder is a volume; its default content is the embedded toy model and adapters.
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 10001 distillery

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
VOLUME ["/models"]
USER distillery
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:8000/healthz || exit 1
CMD ["distillery", "serve", "--host", "0.0.0.0", "--port", "8000"]
