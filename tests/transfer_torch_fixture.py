#!/usr/bin/env python3
"""Fixture for test_transfer: a torch model with seed-cnn's layers under torch's names.

usage: transfer_torch_fixture.py OUT_DIR

Writes, in OUT_DIR:
  torch_cnn.safetensors  its state_dict (features.0/3/6 convs, classifier.0/2 linears),
                         written by hand (8-byte LE header length, JSON header, raw data)
  logits.json            {"input": [2*1*28*28 floats], "logits": [2*10 floats]} from torch
  half.safetensors       "h" as F16 and "b" as BF16
  half.json              {"h": [...], "b": [...]} the same values as torch's .float()
"""
import json
import os
import struct
import sys

import torch
from torch import nn


def write_safetensors(path, tensors):
    names = {torch.float32: "F32", torch.float64: "F64", torch.float16: "F16",
             torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        t = t.detach().contiguous().cpu()
        raw = t.view(torch.uint8).numpy().tobytes() if t.dtype == torch.bfloat16 else \
            t.numpy().tobytes()
        header[name] = {"dtype": names[t.dtype], "shape": list(t.shape),
                        "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    header["__metadata__"] = {"format": "pt"}
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)) + text + b"".join(blobs))


def main():
    out = sys.argv[1]
    torch.manual_seed(7)
    features = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                             nn.Conv2d(64, 64, 3), nn.ReLU())
    classifier = nn.Sequential(nn.Linear(576, 64), nn.ReLU(), nn.Linear(64, 10))
    model = nn.Module()
    model.features, model.classifier = features, classifier
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        logits = classifier(torch.flatten(features(x), 1))
    write_safetensors(os.path.join(out, "torch_cnn.safetensors"), model.state_dict())
    with open(os.path.join(out, "logits.json"), "w") as f:
        json.dump({"input": x.flatten().tolist(), "logits": logits.flatten().tolist()}, f)
    h = (torch.randn(3, 5) * 100).half()
    h[0, 0] = 6e-8  # a subnormal half
    b = torch.randn(4).bfloat16()
    write_safetensors(os.path.join(out, "half.safetensors"), {"h": h, "b": b})
    with open(os.path.join(out, "half.json"), "w") as f:
        json.dump({"h": h.float().flatten().tolist(), "b": b.float().flatten().tolist()}, f)


if __name__ == "__main__":
    main()
