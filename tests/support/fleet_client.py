"""The fleet test's client (tests/it/fleet.rs): grpcio with a service config
over a multi-address target, as docs/fleet.md tells platform teams to
run it. Reads wrapped keys (JSON lines: tenant, wrapped_key, plaintext, all
base64 but the tenant), sends the tenant in the affinity header on every
call, prints one JSON object.

    fleet_client.py --target ipv4:127.0.0.1:7001,127.0.0.2:7002 \
        --service-config examples/grpc-service-config.json --items deks.jsonl \
        unwrap-all
    ... load --seconds 6

unwrap-all: every item --repeat times (all items, then all again: the
reads a platform makes of the same data over time), 64 calls in flight;
counts by status code; a plaintext that differs from the generated one is
counted as "MISMATCH".
load: items round and round for --seconds; counts by status code per
half-second slot, so the test sees when failures happened.
"""

import argparse
import base64
import collections
import json
import os
import sys
import threading
import time

# grpcio releases that still gate ring_hash's request_hash_header read this
# at start-up (docs/fleet.md); our clients set it so the ring never fails
# closed with INTERNAL "hash attribute not present".
os.environ.setdefault("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")

import grpc  # noqa: E402

from keybroker.v1 import broker_pb2, broker_pb2_grpc  # noqa: E402

AFFINITY_HEADER = "x-keybroker-tenant"
THREADS = 16
IN_FLIGHT = 64


def read_items(path):
    items = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                items.append(
                    (
                        entry["tenant"],
                        base64.b64decode(entry["wrapped_key"]),
                        base64.b64decode(entry["plaintext"]),
                    )
                )
    return items


def request(item):
    tenant, wrapped, _ = item
    return broker_pb2.UnwrapKeyRequest(tenant_id=tenant, wrapped_key=wrapped)


def outcome(item, future):
    try:
        reply = future.result()
    except grpc.RpcError as err:
        return err.code().name
    return "OK" if reply.plaintext == item[2] else "MISMATCH"


def unwrap(stub, item):
    tenant, wrapped, plaintext = item
    try:
        reply = stub.UnwrapKey(
            broker_pb2.UnwrapKeyRequest(tenant_id=tenant, wrapped_key=wrapped),
            metadata=[(AFFINITY_HEADER, tenant)],
            timeout=10,
        )
    except grpc.RpcError as err:
        return err.code().name
    return "OK" if reply.plaintext == plaintext else "MISMATCH"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--target", required=True)
    parser.add_argument("--service-config", required=True)
    parser.add_argument("--items", required=True)
    parser.add_argument("mode", choices=["unwrap-all", "load"])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--repeat", type=int, default=1)
    args = parser.parse_args()

    with open(args.service_config, encoding="utf-8") as f:
        service_config = f.read()
    items = read_items(args.items)
    # A valid authority: over a multi-address target grpcio would send the
    # comma-joined list, which HTTP/2 servers (h2) reset. In a cluster the
    # headless Service's DNS name is the target and the authority.
    channel = grpc.insecure_channel(
        args.target,
        options=[
            ("grpc.service_config", service_config),
            ("grpc.default_authority", "keybroker.fleet.test"),
        ],
    )
    # No channel_ready_future: ring_hash connects lazily, per pick.
    stub = broker_pb2_grpc.KeyBrokerStub(channel)

    if args.mode == "unwrap-all":
        started = time.monotonic()
        codes = collections.Counter()
        in_flight = collections.deque()
        for item in items * args.repeat:
            call = stub.UnwrapKey.future(
                request(item), metadata=[(AFFINITY_HEADER, item[0])], timeout=10
            )
            in_flight.append((item, call))
            if len(in_flight) >= IN_FLIGHT:
                codes[outcome(*in_flight.popleft())] += 1
        while in_flight:
            codes[outcome(*in_flight.popleft())] += 1
        print(
            json.dumps(
                {"codes": dict(codes), "seconds": round(time.monotonic() - started, 3)}
            )
        )
        return 0

    slots = collections.defaultdict(collections.Counter)
    lock = threading.Lock()
    started = time.monotonic()
    deadline = started + args.seconds

    def worker(offset):
        n = offset
        while time.monotonic() < deadline:
            code = unwrap(stub, items[n % len(items)])
            slot = int((time.monotonic() - started) * 2)
            with lock:
                slots[slot][code] += 1
            n += THREADS

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(json.dumps({"slots": {str(k): dict(v) for k, v in sorted(slots.items())}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
