//! The network edge: listeners and connection limits ([`incoming`]), TLS and
//! caller identity ([`tls`]).

pub mod incoming;
pub mod tls;
