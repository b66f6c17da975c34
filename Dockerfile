# syntax=docker/dockerfile:1
# Multi-stage build of a minimal, non-root keybroker image.
#   docker build -t keybroker:dev .
# The build stage needs no system protoc (protoc-bin-vendored).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock build.rs ./
COPY proto proto
COPY benches benches
COPY bench bench
COPY migrations migrations
COPY src src
RUN cargo build --release --locked --bin keybroker \
 && strip target/release/keybroker

# distroless/cc: glibc and CA certificates, no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/keybroker /usr/local/bin/keybroker
# 65532 = nonroot in distroless; the chart also sets runAsNonRoot and a
# read-only root filesystem (data goes to a mounted volume).
USER 65532:65532
EXPOSE 50051 9090
# Listening beyond loopback needs TLS: set KEYBROKER_TLS_CERT, _KEY,
# _CLIENT_CA and KEYBROKER_AUTHZ_POLICY (or KEYBROKER_INSECURE_PLAINTEXT=true
# only behind a mesh that terminates mTLS).
ENTRYPOINT ["/usr/local/bin/keybroker"]
CMD ["serve", "--listen", "0.0.0.0:50051", "--metrics-listen", "0.0.0.0:9090", "--data-dir", "/var/lib/keybroker", "--log-format", "json"]
