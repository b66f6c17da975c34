//! Integration tests, one binary (one link) for all of them.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod admin;
mod aws;
mod aws_support;
mod clients;
mod common;
mod data_plane;
mod gcp;
mod gcp_fake;
mod grpcurl;
mod hardening;
mod helm;
mod process;
mod proto_hygiene;
mod registry;
mod revocation;
mod security;
mod trust_boundary;
