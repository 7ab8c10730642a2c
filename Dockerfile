# elmreg worker/scheduler image. torch is pinned to the version elmreg is tested with; on Linux this is the
# CUDA build, so the same image serves GPU workers (run with --gpus all) and CPU-only ones.
FROM python:3.11-slim
WORKDIR /app
RUN pip install --no-cache-dir torch==2.13.0
COPY . /app
RUN pip install --no-cache-dir /app
ENTRYPOINT ["elmreg"]
CMD ["--help"]
