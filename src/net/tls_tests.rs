//! Tests of `net/tls.rs`.

use super::*;

fn cert_with(uris: &[&str], dns: &[&str]) -> Vec<u8> {
    let mut params = rcgen::CertificateParams::default();
    for uri in uris {
        params
            .subject_alt_names
            .push(rcgen::SanType::URI((*uri).try_into().unwrap()));
    }
    for host in dns {
        params
            .subject_alt_names
            .push(rcgen::SanType::DnsName((*host).try_into().unwrap()));
    }
    let key = rcgen::KeyPair::generate().unwrap();
    params.self_signed(&key).unwrap().der().to_vec()
}

#[test]
fn a_broken_client_ca_is_reported_once_per_change() {
    let dir = tempfile::tempdir().unwrap();
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    let (cert, key, ca) = (
        dir.path().join("tls.crt"),
        dir.path().join("tls.key"),
        dir.path().join("ca.crt"),
    );
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.signing_key.serialize_pem()).unwrap();
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    let source = TlsSource::load(TlsSettings {
        cert: Some(cert),
        key: Some(key),
        client_ca: Some(ca.clone()),
        trust_domains: vec![],
        reload_interval: Duration::from_secs(1),
    })
    .unwrap();
    std::fs::write(&ca, "not a certificate").unwrap();
    for _ in 0..5 {
        assert!(!source.reload_if_changed());
    }
    assert_eq!(source.reload_failures(), 1, "logged on every tick");
    std::fs::write(&ca, "still not a certificate").unwrap();
    assert!(!source.reload_if_changed());
    assert!(!source.reload_if_changed());
    assert_eq!(source.reload_failures(), 2);
    std::fs::write(&ca, ck.cert.pem()).unwrap();
    assert!(source.reload_if_changed(), "a fixed file is picked up");
}

/// The SPIFFE ID spec's examples and rules (spiffe/spiffe, standards/
/// SPIFFE-ID.md, and the go-spiffe ID parser's test table).
#[test]
fn spiffe_ids_per_spec() {
    for valid in [
        "spiffe://trust-domain-name/path",
        "spiffe://example.org/ns/billing/sa/api",
        "spiffe://staging.example.com/payments/mysql",
        "spiffe://k8s-west.example.com/ns/staging/sa/default",
        "spiffe://a_b.c/x.y-z_1/A-Z",
        "spiffe://1.2.3.4/p",
    ] {
        assert!(parse_spiffe_id(valid).is_ok(), "{valid} refused");
    }
    for invalid in [
        "spiffe://prod.example/ns/billing/../../ops/sa/admin",
        "spiffe://prod.example/./a",
        "spiffe://prod.example/a/..",
        "spiffe://prod.example/a//b",
        "spiffe://prod.example/a/",
        "spiffe://prod.example/",
        "spiffe://prod.example",
        "spiffe:///path",
        "spiffe://Prod.Example/a",
        "spiffe://prod.example:8443/a",
        "spiffe://user@prod.example/a",
        "spiffe://prod.example/a?x=1",
        "spiffe://prod.example/a#f",
        "spiffe://prod.example/a%2Fb",
        "spiffe://prod.example/a b",
        "SPIFFE://prod.example/a",
        "https://prod.example/a",
        "spiffe://prod.example/\u{1b}[31m",
    ] {
        let err = parse_spiffe_id(invalid).unwrap_err();
        assert!(!crate::text::has_control(&err), "{err:?}");
    }
    let long_domain = format!("spiffe://{}/a", "d".repeat(256));
    assert!(parse_spiffe_id(&long_domain).is_err());
    let long = format!("spiffe://td/{}", "a".repeat(2048));
    assert!(parse_spiffe_id(&long).is_err());
}

#[test]
fn dns_identities() {
    assert_eq!(dns_identity("api.internal").unwrap(), "dns:api.internal");
    assert_eq!(dns_identity("API.Internal.").unwrap(), "dns:api.internal");
    for bad in [
        "spiffe://prod.example/ops/sa/admin",
        "*.internal",
        "-a.internal",
        "a..b",
        "",
        "a b",
        "dns:api.internal",
    ] {
        assert!(dns_identity(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn identities_from_sans() {
    let trusted = vec!["prod.example".to_owned()];
    let id = |uris: &[&str], dns: &[&str]| certificate_identity(&cert_with(uris, dns), &trusted);
    assert_eq!(
        id(&["spiffe://prod.example/ns/a/sa/b"], &["ignored.example"]).unwrap(),
        "spiffe://prod.example/ns/a/sa/b"
    );
    assert_eq!(
        id(&[], &["Billing.Internal"]).unwrap(),
        "dns:billing.internal"
    );
    // A DNS SAN spelled like a SPIFFE ID is no identity at all.
    assert!(
        id(&[], &["spiffe://prod.example/ops/sa/admin"])
            .unwrap_err()
            .contains("not a valid DNS name")
    );
    assert!(id(&[], &[]).unwrap_err().contains("no identity"));
    assert!(
        id(&["spiffe://prod.example/a", "spiffe://prod.example/b"], &[])
            .unwrap_err()
            .contains("2 URI SANs")
    );
    assert!(
        id(&["spiffe://other.example/a"], &[])
            .unwrap_err()
            .contains("not trusted")
    );
    assert!(
        id(&["https://prod.example/a"], &[])
            .unwrap_err()
            .contains("not a SPIFFE ID")
    );
    assert!(
        id(&["spiffe://prod.example"], &[])
            .unwrap_err()
            .contains("not a valid SPIFFE ID")
    );
    assert!(
        id(
            &["spiffe://prod.example/ns/billing/../../ops/sa/admin"],
            &[]
        )
        .unwrap_err()
        .contains("'..'")
    );
    assert!(
        id(&[], &["a.example", "b.example"])
            .unwrap_err()
            .contains("ambiguous")
    );
    // No trust-domain restriction configured: any domain the CA signs.
    assert!(certificate_identity(&cert_with(&["spiffe://other.example/a"], &[]), &[]).is_ok());
}
