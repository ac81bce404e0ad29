#!/usr/bin/env bash
# Regenerate cypq/proto/lopq_model_pb2.py from lopq_model.proto.
# protoc 3.21 (grpcio-tools 1.49.1) writes code that runs on every protobuf runtime cypq allows
# (>= 4.21, checked in tests/test_lopq_proto.py); newer protoc pins a newer minimum runtime.
set -euo pipefail
cd "$(dirname "$0")/../cypq/proto"
venv="$(mktemp -d)/venv"
python3 -m venv "$venv"
"$venv/bin/pip" install -q "grpcio-tools==1.49.1"
"$venv/bin/python" -m grpc_tools.protoc -I. --python_out=. lopq_model.proto
# cypq's messages live in a descriptor pool of their own, so that a process may also load LOPQ's
# generated module (same file name in the default pool).
sed -i 's/^DESCRIPTOR = _descriptor_pool.Default().AddSerializedFile(/# cypq'"'"'s own pool (not the default one): LOPQ'"'"'s generated module registers a file of the same\n# name, lopq_model.proto, in the default pool, and both must load in one process.\nPOOL = _descriptor_pool.DescriptorPool()\nDESCRIPTOR = POOL.AddSerializedFile(/' lopq_model_pb2.py
