# dporm on CPU. Build: docker build -t dporm .   Run: docker run --rm dporm --help
FROM python:3.11-slim
ARG TORCH_SPEC="torch==2.13.0"
WORKDIR /app
# g++: torch.compile builds bf16-paired's fused CPU kernels with it (without it they run eagerly, slower)
RUN apt-get update && apt-get install -y --no-install-recommends g++ && rm -rf /var/lib/apt/lists/*
COPY pyproject.toml README.md ./
COPY dpo dpo
COPY kernels kernels
COPY server server
RUN pip install --no-cache-dir "${TORCH_SPEC}" && pip install --no-cache-dir .
ENV HF_HUB_OFFLINE=1 DPORM_CACHE_DIR=/cache
VOLUME /cache
ENTRYPOINT ["dporm"]
