# DeepSeek-V4 on Triton Inference Server: the NGC image (tritonserver + python backend + CUDA)
# with this project installed. Build: docker build -t deepseek-v4-triton .
# Run:   docker run --gpus all -p8000:8000 -p8001:8001 -v /path/to/checkpoint:/ckpt deepseek-v4-triton
FROM nvcr.io/nvidia/tritonserver:25.10-py3

WORKDIR /opt/deepseek-v4-triton
COPY pyproject.toml README.md ./
COPY kernels kernels
COPY backend backend
RUN pip install --no-cache-dir torch safetensors tokenizers "numpy<2" && pip install --no-cache-dir --no-deps .
COPY model_repository model_repository

ENV DSV4_CACHE_DIR=/opt/deepseek-v4-triton/cache
CMD ["tritonserver", "--model-repository=/opt/deepseek-v4-triton/model_repository"]
