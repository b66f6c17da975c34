//! AWS test parts: a real moto server on loopback, and helpers around it.
//! The fault server for what moto does not enforce is in `fakes::aws`.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;

use aws_config::BehaviorVersion;
use keybroker::kms::aws::{AwsKms, AwsSettings};
use keybroker::proto;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::common::repo_root;

pub(crate) const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/customer-keybroker-access";

pub(crate) const TENANT: &str = "acme";

/// LinkKey for an AWS key of the test tenant, trusted through ROLE_ARN.
pub(crate) fn link_request(
    name: &str,
    key_arn: &str,
    replicas: &[&str],
    primary: bool,
) -> proto::LinkKeyRequest {
    proto::LinkKeyRequest {
        tenant_id: TENANT.into(),
        name: name.into(),
        description: "customer key".into(),
        provider: proto::Provider::AwsKms.into(),
        key_reference: key_arn.into(),
        region: key_arn.split(':').nth(3).unwrap().into(),
        role_arn: ROLE_ARN.into(),
        service_account: String::new(),
        make_primary: primary,
        replica_regions: replicas.iter().map(|r| r.to_string()).collect(),
        vault_approle: None,
        azure_tenant_id: String::new(),
        vault_jwt: None,
    }
}

/// Static test credentials for the platform identity.
pub(crate) fn test_sdk_config(region: &str) -> aws_config::SdkConfig {
    aws_config::SdkConfig::builder()
        .behavior_version(BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()))
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new(
                    "AKIATEST",
                    "test-secret",
                    None,
                    None,
                    "test",
                ),
            ),
        )
        .build()
}

pub(crate) struct Moto {
    child: Child,
    pub(crate) url: String,
    pub(crate) recording: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Moto {
    pub(crate) fn start() -> Self {
        let python = repo_root().join(".tools/venv/bin/python");
        assert!(
            python.exists(),
            "moto is not installed: run scripts/test.sh (it installs moto[server] into .tools/venv)"
        );
        let dir = tempfile::tempdir().unwrap();
        let recording = dir.path().join("recording.jsonl");
        let mut child = Command::new(python)
            .arg(repo_root().join("tests/support/moto_server.py"))
            .env("MOTO_RECORDER_FILEPATH", &recording)
            .env("MOTO_ENABLE_RECORDING", "")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting moto");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port: u16 = line.trim().parse().unwrap_or_else(|_| {
            panic!("moto did not report a port (got {line:?}); is moto[server] installed in .tools/venv?")
        });
        Self {
            child,
            url: format!("http://127.0.0.1:{port}"),
            recording,
            _dir: dir,
        }
    }

    pub(crate) fn kms(&self, region: &str) -> aws_sdk_kms::Client {
        let config = aws_sdk_kms::config::Builder::from(&test_sdk_config(region))
            .endpoint_url(&self.url)
            .build();
        aws_sdk_kms::Client::from_conf(config)
    }

    /// A fresh customer key; returns its ARN.
    pub(crate) async fn create_key(&self, region: &str, multi_region: bool) -> String {
        self.kms(region)
            .create_key()
            .multi_region(multi_region)
            .send()
            .await
            .unwrap()
            .key_metadata
            .unwrap()
            .arn
            .unwrap()
    }

    pub(crate) fn settings(&self) -> AwsSettings {
        AwsSettings {
            kms_endpoint: Some(self.url.clone()),
            sts_endpoint: Some(self.url.clone()),
            ..AwsSettings::default()
        }
    }

    pub(crate) async fn start_recording(&self) {
        http(&self.url, "POST", "/moto-api/recorder/start-recording").await;
    }

    /// Recorded requests (headers, body decoded).
    pub(crate) fn recorded(&self) -> Vec<(HashMap<String, String>, String)> {
        use base64::Engine;
        let text = std::fs::read_to_string(&self.recording).unwrap_or_default();
        // The last line may be half written while moto records.
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .map(|v| {
                let headers = v["headers"]
                    .as_object()
                    .unwrap()
                    .iter()
                    .map(|(k, v)| (k.to_lowercase(), v.as_str().unwrap_or_default().to_owned()))
                    .collect();
                let body = v["body"].as_str().unwrap_or_default();
                let body = if v["body_encoded"].as_bool() == Some(true) {
                    String::from_utf8_lossy(
                        &base64::engine::general_purpose::STANDARD
                            .decode(body)
                            .unwrap(),
                    )
                    .into_owned()
                } else {
                    body.to_owned()
                };
                (headers, body)
            })
            .collect()
    }
}

/// A minimal HTTP/1.1 request (moto's control API).
async fn http(base: &str, method: &str, path: &str) -> String {
    let addr = base.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    stream.read_to_string(&mut out).await.unwrap();
    out
}

pub(crate) fn aws_with(settings: AwsSettings) -> Arc<AwsKms> {
    Arc::new(AwsKms::new(test_sdk_config(&settings.region), settings))
}

/// Two replicas on one PostgreSQL registry, both using `moto`'s KMS. A
/// checks keys every 300 ms; B never checks and never re-reads the
/// registry on its own (long cache TTL), so whatever B learns comes through
/// LISTEN/NOTIFY. They share the platform keyring, as replicas share one
/// Secret. The temp dirs live as long as the servers.
pub(crate) async fn replicas_on_postgres(
    moto: &Moto,
    url: &str,
) -> (
    crate::common::TestServer,
    crate::common::TestServer,
    [tempfile::TempDir; 2],
) {
    use std::time::Duration;
    let dirs = [tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap()];
    let config = |dir: &std::path::Path, watch: Duration| {
        let mut c = crate::common::test_config(dir);
        c.registry.url = Some(url.parse().unwrap());
        c.registry.cache_ttl = Duration::from_secs(3600);
        c.aws = moto.settings();
        c.aws.max_attempts = 1;
        c.watcher.interval = watch;
        c
    };
    let config_a = config(dirs[0].path(), Duration::from_millis(300));
    let config_b = config(dirs[1].path(), Duration::from_secs(3600));
    let a = crate::common::TestServer::start(config_a.clone()).await;
    std::fs::copy(
        config_a.platform_keyring_path(),
        config_b.platform_keyring_path(),
    )
    .unwrap();
    let b = crate::common::TestServer::start(config_b).await;
    (a, b, dirs)
}
