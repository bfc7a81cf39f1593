#!/usr/bin/env python3
"""An independent safetensors reader (struct only, no numpy/torch) for test_checkpoint.

usage: safetensors_reader.py FILE.safetensors REFERENCE.json

REFERENCE.json is what the C++ side wrote from the model's state_dict on its own:
{name: {"dtype": "f32", "shape": [...], "hex": raw little-endian bytes, "values": [...]}}.
Parses the file by hand (8-byte little-endian header length, JSON header, data) and
checks that it holds exactly those tensors with identical dtype, shape, bytes and
float values. Exit 0 when identical, 1 with the first difference otherwise.
"""
import json
import struct
import sys

DTYPES = {"F32": ("f32", "<f", 4), "F64": ("f64", "<d", 8), "I64": ("i64", "<q", 8),
          "I32": ("i32", "<i", 4), "U8": ("u8", "<B", 1), "F16": ("f16", "<e", 2)}


def fail(msg):
    print("safetensors_reader: " + msg)
    sys.exit(1)


def main():
    if len(sys.argv) != 3:
        fail("usage: safetensors_reader.py FILE REFERENCE.json")
    with open(sys.argv[1], "rb") as f:
        blob = f.read()
    with open(sys.argv[2]) as f:
        ref = json.load(f)
    if len(blob) < 8:
        fail("file shorter than the 8-byte header length")
    (hlen,) = struct.unpack("<Q", blob[:8])
    if 8 + hlen > len(blob):
        fail("header length %d runs past the file (%d bytes)" % (hlen, len(blob)))
    header = json.loads(blob[8:8 + hlen].decode("utf-8"))
    data = blob[8 + hlen:]
    header.pop("__metadata__", None)
    if sorted(header) != sorted(ref):
        fail("tensor names differ: file %s, reference %s" % (sorted(header), sorted(ref)))
    end_max = 0
    for name, info in header.items():
        want = ref[name]
        if info["dtype"] not in DTYPES:
            fail("%s: unknown dtype %s" % (name, info["dtype"]))
        ours, fmt, size = DTYPES[info["dtype"]]
        if ours != want["dtype"]:
            fail("%s: dtype %s, reference %s" % (name, info["dtype"], want["dtype"]))
        if info["shape"] != want["shape"]:
            fail("%s: shape %s, reference %s" % (name, info["shape"], want["shape"]))
        begin, end = info["data_offsets"]
        count = 1
        for d in info["shape"]:
            count *= d
        if end - begin != count * size or end > len(data):
            fail("%s: data_offsets [%d, %d) do not fit %d elements" % (name, begin, end, count))
        end_max = max(end_max, end)
        raw = data[begin:end]
        if raw.hex() != want["hex"]:
            fail("%s: bytes differ from the reference" % name)
        if ours == "f32":
            values = struct.unpack("<%d%s" % (count, fmt[1]), raw)
            for i, (a, b) in enumerate(zip(values, want["values"])):
                if a != b:
                    fail("%s[%d]: %r, reference %r" % (name, i, a, b))
    if end_max != len(data):
        fail("data section is %d bytes, tensors cover %d" % (len(data), end_max))
    print("safetensors_reader: %d tensors identical" % len(header))


if __name__ == "__main__":
    main()
