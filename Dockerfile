# The datadiet image: the API and the trainer are the same image with different commands.
FROM python:3.11-slim
WORKDIR /srv/datadiet
COPY pyproject.toml README.md ./
COPY app app
COPY datadiet datadiet
COPY store store
COPY trainer trainer
# CPU torch by default; build with --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu124 for CUDA
ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
RUN pip install --no-cache-dir --index-url "$TORCH_INDEX" "torch==2.13.0" \
 && pip install --no-cache-dir .
ENV DATADIET_DATA_DIR=/data
VOLUME /data
EXPOSE 8000
CMD ["datadiet", "serve", "--host", "0.0.0.0", "--port", "8000"]
