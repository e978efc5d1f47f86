# The fedlesion node on an NVIDIA GPU: ONNX Runtime with CUDA (cuDNN 9, CUDA 12), no torch, no MONAI.
# Build:  docker build -t fedlesion-node .
# Run:    docker run --gpus all -p 11112:11112 -p 127.0.0.1:8080:8080 -v fedlesion-data:/data fedlesion-node
# Settings: mount a TOML file and set FEDLESION_CONFIG, or use FEDLESION_SECTION__KEY variables (design.md §1).
FROM nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

ARG ONNXRUNTIME_GPU_VERSION=1.31.1

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

# Ubuntu 24.04's Python is 3.12 (fedlesion needs >= 3.11); curl is for the healthcheck only.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv curl ca-certificates \
    && rm -rf /var/lib/apt/lists/*

RUN groupadd --system --gid 10001 fedlesion \
    && useradd --system --uid 10001 --gid fedlesion --home-dir /data --no-create-home --shell /usr/sbin/nologin fedlesion

WORKDIR /opt/fedlesion
COPY pyproject.toml README.md ./
COPY fedlesion ./fedlesion
COPY models ./models
COPY inference ./inference
COPY dicom_gateway ./dicom_gateway
COPY training ./training

# The gpu extra, never cpu: onnxruntime-gpu pinned to the version the node is tested with (same as the cpu
# wheel), and both ONNX Runtime distributions in one environment would stop the node at start-up.
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install ".[gpu]" "onnxruntime-gpu==${ONNXRUNTIME_GPU_VERSION}" \
    && /opt/venv/bin/python -c "import onnxruntime, importlib.util as u; assert u.find_spec('torch') is None; print(onnxruntime.get_available_providers())"

ENV PATH=/opt/venv/bin:$PATH \
    FEDLESION_STORAGE__DATA_DIR=/data \
    FEDLESION_NODE__WEB_HOST=0.0.0.0 \
    FEDLESION_NODE__DICOM_PORT=11112 \
    FEDLESION_NODE__WEB_PORT=8080

RUN mkdir -p /data && chown fedlesion:fedlesion /data
VOLUME ["/data"]
USER fedlesion

# DICOM (C-STORE in) and the web page.
EXPOSE 11112 8080

HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD curl --fail --silent --max-time 4 http://127.0.0.1:${FEDLESION_NODE__WEB_PORT}/healthz || exit 1

STOPSIGNAL SIGTERM
CMD ["fedlesion", "node"]
