#!/usr/bin/env python3
"""keybroker from Python: generate a data key for a tenant, unwrap it (alone
and in a batch), print the key id. Uses a client generated from proto/ with grpcio-tools:

    python -m grpc_tools.protoc -I proto --python_out=sdk --grpc_python_out=sdk \
        proto/keybroker/v1/broker.proto proto/keybroker/v1/admin.proto
    PYTHONPATH=sdk python examples/python/generate_and_unwrap.py --server 127.0.0.1:50051 --tenant acme

--bad-input sends a wrapped key that is not one and prints the status code,
so clients in every language can be checked to see the same codes.

Every call says why it uses the tenant's key (an access justification): the
tenant's access policy may refuse calls without one, and the reason lands in
the audit log and the customer's key access log. This example acts for the
tenant's own users: ACCESS_REASON_CUSTOMER_INITIATED.

Every call carries the tenant in the x-keybroker-tenant header. Against a
fleet, give a multi-address target and the shipped service config, and each
tenant's calls go to one replica (docs/fleet.md):

    PYTHONPATH=sdk python examples/python/generate_and_unwrap.py --tenant acme \
        --server ipv4:10.0.0.1:50051,10.0.0.2:50051 \
        --service-config examples/grpc-service-config.json
"""

import argparse
import json
import os
import sys

# grpcio before the ring_hash request_hash_header became default reads
# this at start-up; without it every ring_hash call fails INTERNAL "hash
# attribute not present". Harmless on releases that no longer need it.
os.environ.setdefault("GRPC_EXPERIMENTAL_RING_HASH_SET_REQUEST_HASH_KEY", "true")

import grpc  # noqa: E402  (after the environment it reads)

AFFINITY_HEADER = "x-keybroker-tenant"

from keybroker.v1 import broker_pb2, broker_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--bad-input", action="store_true")
    parser.add_argument("--service-config", help="gRPC service config (JSON file)")
    args = parser.parse_args()

    options = []
    if args.service_config:
        with open(args.service_config, encoding="utf-8") as f:
            options.append(("grpc.service_config", f.read()))
    if "," in args.server:
        # A multi-address target would go out as the :authority, which
        # HTTP/2 servers refuse: name the service instead.
        options.append(("grpc.default_authority", "keybroker"))
    with grpc.insecure_channel(args.server, options=options) as channel:
        client = broker_pb2_grpc.KeyBrokerStub(channel)
        # On every call: a ring_hash policy keyed on it never fails closed.
        tenant_header = [(AFFINITY_HEADER, args.tenant)]
        context = {"table": "orders"}
        # Why the key is used; the authorization policy must let this caller
        # claim the reason, and the tenant's access policy must accept it.
        why = broker_pb2.AccessJustification(
            reason=broker_pb2.ACCESS_REASON_CUSTOMER_INITIATED
        )
        if args.bad_input:
            try:
                client.UnwrapKey(
                    broker_pb2.UnwrapKeyRequest(
                        tenant_id=args.tenant,
                        wrapped_key=b"not a wrapped key",
                        context=context,
                        justification=why,
                    ),
                    metadata=tenant_header,
                )
            except grpc.RpcError as err:
                print(json.dumps({"code": err.code().name, "message": err.details()}))
                return 0
            print(json.dumps({"code": "OK"}))
            return 1

        generated = client.GenerateDataKey(
            broker_pb2.GenerateDataKeyRequest(
                tenant_id=args.tenant, context=context, justification=why
            ),
            metadata=tenant_header,
        )
        unwrapped = client.UnwrapKey(
            broker_pb2.UnwrapKeyRequest(
                tenant_id=args.tenant,
                wrapped_key=generated.wrapped_key,
                context=context,
                justification=why,
            ),
            metadata=tenant_header,
        )
        if unwrapped.plaintext != generated.plaintext:
            print("unwrapped key differs from the generated key", file=sys.stderr)
            return 1
        # A batch: each item answers on its own (a bad one with its status).
        batch = client.BatchUnwrapKey(
            broker_pb2.BatchUnwrapKeyRequest(
                items=[
                    broker_pb2.UnwrapKeyRequest(
                        tenant_id=args.tenant,
                        wrapped_key=generated.wrapped_key,
                        context=context,
                        justification=why,
                    ),
                    broker_pb2.UnwrapKeyRequest(
                        tenant_id=args.tenant, wrapped_key=b"not one", justification=why
                    ),
                ]
            ),
            metadata=tenant_header,
        )
        code_names = {c.value[0]: c.name for c in grpc.StatusCode}
        batch_codes = [code_names[r.status.code] for r in batch.results]
        if batch.results[0].response.plaintext != generated.plaintext:
            print("the batch unwrapped another key", file=sys.stderr)
            return 1
        key = generated.key
        # The key id: which key binding (and provider version) protects it.
        print(
            json.dumps(
                {
                    "key_id": f"{key.key_binding}/{key.provider_key_version}",
                    "key_binding": key.key_binding,
                    "provider": broker_pb2.Provider.Name(key.provider),
                    "plaintext_bytes": len(unwrapped.plaintext),
                    "batch_codes": batch_codes,
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
