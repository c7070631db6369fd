# dporm. Build: docker build -t dporm .   Run: docker run --rm dporm --help
# The default index's Linux torch wheel is the CUDA build (GPU-ready, several GB); for a small CPU-only
# image pass a CPU wheel index: docker build --build-arg TORCH_INDEX_URL=<index> -t dporm .
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
WORKDIR /app
# g++: torch.compile builds bf16-paired's fused CPU kernels with it (without it they run eagerly, slower)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY dpo dpo
COPY kernels kernels
COPY server server
RUN pip install --no-cache-dir ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" \
    && pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 DPORM_CACHE_DIR=/cache
VOLUME /cache
ENTRYPOINT ["dporm"]
