#!/usr/bin/env bash
# The main job on the embedded Fashion-MNIST subset (no download). For now: the random real
# subset baseline of the evaluation protocol, 10 images per class, on a ConvNet.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-.venv/bin/python}
"$python" - <<'PY'
import torch
import utils
from networks import get_network

utils.set_seed(0)
data = utils.get_dataset("FashionMNIST-mini")
idx = torch.cat([c[torch.randperm(len(c))[:10]] for c in utils.images_per_class(data.labels_train, data.num_classes)])
net = get_network("ConvNet", data.channel, data.num_classes, data.im_size)
train_acc, test_acc = utils.evaluate_synset(net, data.images_train[idx], data.labels_train[idx], data.images_test,
                                            data.labels_test, lr=0.01, epochs=300, log=print)
print(f"random real subset, 10 per class, ConvNet: test accuracy {test_acc:.3f}")
PY
