#!/usr/bin/env python3
"""keybroker from Python: generate a data key for a tenant, unwrap it (alone
and in a batch), print the key id. Uses a client generated from proto/ with grpcio-tools:

    python -m grpc_tools.protoc -I proto --python_out=sdk --grpc_python_out=sdk \
        proto/keybroker/v1/broker.proto proto/keybroker/v1/admin.proto
    PYTHONPATH=sdk python examples/python/generate_and_unwrap.py --server 127.0.0.1:50051 --tenant acme

--bad-input sends a wrapped key that is not one and prints the status code,
so clients in every language can be checked to see the same codes.
"""

import argparse
import json
import sys

import grpc

from keybroker.v1 import broker_pb2, broker_pb2_grpc


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--server", default="127.0.0.1:50051")
    parser.add_argument("--tenant", required=True)
    parser.add_argument("--bad-input", action="store_true")
    args = parser.parse_args()

    with grpc.insecure_channel(args.server) as channel:
        client = broker_pb2_grpc.KeyBrokerStub(channel)
        context = {"table": "orders"}
        if args.bad_input:
            try:
                client.UnwrapKey(
                    broker_pb2.UnwrapKeyRequest(
                        tenant_id=args.tenant, wrapped_key=b"not a wrapped key", context=context
                    )
                )
            except grpc.RpcError as err:
                print(json.dumps({"code": err.code().name, "message": err.details()}))
                return 0
            print(json.dumps({"code": "OK"}))
            return 1

        generated = client.GenerateDataKey(
            broker_pb2.GenerateDataKeyRequest(tenant_id=args.tenant, context=context)
        )
        unwrapped = client.UnwrapKey(
            broker_pb2.UnwrapKeyRequest(
                tenant_id=args.tenant, wrapped_key=generated.wrapped_key, context=context
            )
        )
        if unwrapped.plaintext != generated.plaintext:
            print("unwrapped key differs from the generated key", file=sys.stderr)
            return 1
        # A batch: each item answers on its own (a bad one with its status).
        batch = client.BatchUnwrapKey(
            broker_pb2.BatchUnwrapKeyRequest(
                items=[
                    broker_pb2.UnwrapKeyRequest(
                        tenant_id=args.tenant, wrapped_key=generated.wrapped_key, context=context
                    ),
                    broker_pb2.UnwrapKeyRequest(tenant_id=args.tenant, wrapped_key=b"not one"),
                ]
            )
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
