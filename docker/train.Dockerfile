# The training image: the project's model code and what its training entry point imports
# (docker/train-requirements.txt, pinned as in requirements.lock), for CIRCOT_TRAINING_LAUNCHER=kubernetes
# (the pod runs `python -m torch.distributed.run ... -m model_code.model.recipes ... --pipes` in /app).
#
#   docker build -f docker/train.Dockerfile -t registry.example/circot-train:1 .
#   docker push registry.example/circot-train:1
#   CIRCOT_K8S_IMAGE=registry.example/circot-train:1 CIRCOT_TRAINING_LAUNCHER=kubernetes make run
#
# PyPI's torch wheels for Linux carry their CUDA libraries: the pod needs a GPU node's driver only.
FROM python:3.11-slim
ENV PYTHONUNBUFFERED=1 PYTHONPATH=/app HF_HUB_OFFLINE=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY requirements.lock docker/train-requirements.txt /tmp/
RUN pip install -r /tmp/train-requirements.txt -c /tmp/requirements.lock
COPY model_code/ /app/model_code/
