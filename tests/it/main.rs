//! Integration tests, one binary (one link) for all of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod access;
mod aws;
mod aws_support;
mod azure;
mod batch;
mod byok;
mod clients;
mod common;
mod control_plane;
mod data_plane;
mod defenses;
mod fakes;
mod fleet;
mod gcp;
mod grpcurl;
mod helm;
mod hierarchy;
mod image;
mod lifecycle;
mod lifecycle_model;
mod outage;
mod pg_cluster;
mod pkcs11;
mod process;
mod proto_hygiene;
mod registry;
mod retirement;
mod revocation;
mod security;
mod trust_boundary;
mod vault;
