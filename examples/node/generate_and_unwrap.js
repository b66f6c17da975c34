#!/usr/bin/env node
// keybroker from Node: generate a data key for a tenant, unwrap it (alone and
// in a batch), print the key id. @grpc/proto-loader reads proto/ at run time (no code generation):
//
//   cd examples/node && npm ci
//   node generate_and_unwrap.js --server 127.0.0.1:50051 --tenant acme
//
// --bad-input sends a wrapped key that is not one and prints the status code.
//
// Every call says why it uses the tenant's key (an access justification):
// the tenant's access policy may refuse calls without one, and the reason
// lands in the audit log and the customer's key access log. This example
// acts for the tenant's own users: ACCESS_REASON_CUSTOMER_INITIATED.
//
// Every call carries the tenant in the x-keybroker-tenant header, which a
// ring-hash load balancer in front of a fleet (Envoy, docs/fleet.md)
// hashes so each tenant's calls reach one replica. (@grpc/grpc-js has no
// ring_hash policy outside xDS; grpcio and grpc-go hash it in the client.)
'use strict';

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

function arg(name, fallback) {
  const i = process.argv.indexOf(`--${name}`);
  return i >= 0 ? process.argv[i + 1] : fallback;
}

const server = arg('server', '127.0.0.1:50051');
const tenant = arg('tenant');
const badInput = process.argv.includes('--bad-input');
if (!tenant) {
  console.error('usage: generate_and_unwrap.js --server HOST:PORT --tenant ID [--bad-input]');
  process.exit(2);
}

const protoRoot = path.join(__dirname, '..', '..', 'proto');
const definition = protoLoader.loadSync('keybroker/v1/broker.proto', {
  includeDirs: [protoRoot],
  keepCase: true,
  enums: String,
  defaults: true,
});
const { keybroker } = grpc.loadPackageDefinition(definition);
const client = new keybroker.v1.KeyBroker(server, grpc.credentials.createInsecure());

// On every call, so a ring hash keyed on it never fails closed.
const tenantHeader = new grpc.Metadata();
tenantHeader.set('x-keybroker-tenant', tenant);

const call = (method, request) =>
  new Promise((resolve, reject) =>
    client[method](request, tenantHeader, (err, reply) => (err ? reject(err) : resolve(reply))),
  );

const codeName = (code) => Object.keys(grpc.status).find((k) => grpc.status[k] === code);

async function main() {
  const context = { table: 'orders' };
  // Why the key is used; the authorization policy must let this caller claim
  // the reason, and the tenant's access policy must accept it.
  const justification = { reason: 'ACCESS_REASON_CUSTOMER_INITIATED' };
  if (badInput) {
    try {
      await call('UnwrapKey', {
        tenant_id: tenant,
        wrapped_key: Buffer.from('not a wrapped key'),
        context,
        justification,
      });
      console.log(JSON.stringify({ code: 'OK' }));
      return 1;
    } catch (err) {
      console.log(JSON.stringify({ code: codeName(err.code), message: err.details }));
      return 0;
    }
  }
  const generated = await call('GenerateDataKey', { tenant_id: tenant, context, justification });
  const unwrapped = await call('UnwrapKey', {
    tenant_id: tenant,
    wrapped_key: generated.wrapped_key,
    context,
    justification,
  });
  if (!Buffer.from(unwrapped.plaintext).equals(Buffer.from(generated.plaintext))) {
    console.error('unwrapped key differs from the generated key');
    return 1;
  }
  // A batch: each item answers on its own (a bad one with its status).
  const batch = await call('BatchUnwrapKey', {
    items: [
      { tenant_id: tenant, wrapped_key: generated.wrapped_key, context, justification },
      { tenant_id: tenant, wrapped_key: Buffer.from('not one'), justification },
    ],
  });
  if (!Buffer.from(batch.results[0].response.plaintext).equals(Buffer.from(generated.plaintext))) {
    console.error('the batch unwrapped another key');
    return 1;
  }
  const key = generated.key;
  console.log(
    JSON.stringify({
      key_id: `${key.key_binding}/${key.provider_key_version}`,
      key_binding: key.key_binding,
      provider: key.provider,
      plaintext_bytes: unwrapped.plaintext.length,
      batch_codes: batch.results.map((r) => codeName(r.status.code)),
    }),
  );
  return 0;
}

main()
  .then((code) => {
    client.close();
    process.exit(code);
  })
  .catch((err) => {
    console.error(`${codeName(err.code) ?? 'ERROR'}: ${err.details ?? err.message}`);
    process.exit(1);
  });
