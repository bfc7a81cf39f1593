#!/usr/bin/env python3
"""An independent reader of TensorBoard event files (TFRecords of tensorflow.Event).

Framing and CRC-32C are implemented here (a table-driven Castagnoli CRC), and the
Event/Summary messages are decoded by python3-protobuf from event.proto in this
folder (compiled with protoc into a temporary folder). Nothing is shared with
dtrain's C++ writer.

    read_events.py --protoc protoc FILE   # prints one JSON object per event
"""
import argparse
import importlib
import json
import os
import struct
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))


def _crc32c_table():
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data):
    c = 0xFFFFFFFF
    for b in data:
        c = _TABLE[(c ^ b) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def masked_crc32c(data):
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


class CrcError(Exception):
    pass


def records(blob, name="<events>"):
    """Yields each record's data; raises CrcError naming the record and its offset."""
    pos, n = 0, 0
    while pos < len(blob):
        if len(blob) - pos < 12:
            raise CrcError(f"{name}: record {n} at byte {pos}: truncated header")
        header = blob[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        (length_crc,) = struct.unpack("<I", blob[pos + 8:pos + 12])
        if masked_crc32c(header) != length_crc:
            raise CrcError(f"{name}: record {n} at byte {pos}: length CRC mismatch")
        data = blob[pos + 12:pos + 12 + length]
        tail = blob[pos + 12 + length:pos + 16 + length]
        if len(data) != length or len(tail) != 4:
            raise CrcError(f"{name}: record {n} at byte {pos}: truncated data")
        if masked_crc32c(data) != struct.unpack("<I", tail)[0]:
            raise CrcError(f"{name}: record {n} at byte {pos}: data CRC mismatch")
        yield data
        pos += 16 + length
        n += 1


def load_event_module(protoc):
    out = tempfile.mkdtemp(prefix="tb_event_pb_")
    subprocess.run([protoc, f"--proto_path={HERE}", f"--python_out={out}", "event.proto"],
                   check=True)
    sys.path.insert(0, out)
    return importlib.import_module("event_pb2")


def read_events(path, event_pb2):
    """The file's events as dicts: wall_time, step, and file_version or scalars."""
    with open(path, "rb") as f:
        blob = f.read()
    events = []
    for data in records(blob, path):
        e = event_pb2.Event()
        e.ParseFromString(data)
        d = {"wall_time": e.wall_time, "step": e.step}
        if e.WhichOneof("what") == "file_version":
            d["file_version"] = e.file_version
        elif e.WhichOneof("what") == "session_log":
            d["session_log"] = event_pb2.SessionLog.SessionStatus.Name(e.session_log.status)
        elif e.WhichOneof("what") == "summary":
            d["scalars"] = {v.tag: v.simple_value for v in e.summary.value}
        events.append(d)
    return events


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--protoc", default="protoc")
    ap.add_argument("file")
    args = ap.parse_args()
    try:
        for e in read_events(args.file, load_event_module(args.protoc)):
            print(json.dumps(e))
    except CrcError as err:
        print(f"CRC error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
