//! AWS test parts: a real moto server, and a fault server that answers in
//! the real AWS wire formats (KMS JSON errors, STS XML) for the key states
//! and failures moto does not enforce.

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use aws_config::BehaviorVersion;
use keybroker::kms::aws::{AwsKms, AwsSettings};
use keybroker::proto::{self, key_admin_client::KeyAdminClient};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;
use tonic::transport::Channel;

use crate::common::repo_root;

pub(crate) const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/customer-keybroker-access";

pub(crate) const TENANT: &str = "acme";

/// Creates the test tenant; returns its external ID.
pub(crate) async fn create_tenant(admin: &mut KeyAdminClient<Channel>) -> String {
    admin
        .create_tenant(proto::CreateTenantRequest {
            tenant_id: TENANT.into(),
            key_policy: 0,
        })
        .await
        .unwrap()
        .into_inner()
        .tenant
        .unwrap()
        .onboarding
        .unwrap()
        .aws_external_id
}

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
        text.lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
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

/// What the fault server answers for one operation.
#[derive(Clone)]
pub(crate) enum Fault {
    /// An AWS JSON error (KMS): HTTP status and `__type`.
    KmsError(u16, &'static str),
    /// STS AccessDenied in STS's XML.
    StsDenied,
    /// Accept the request and never answer.
    Hang,
    /// A successful KMS JSON answer.
    KmsOk(String),
}

/// Answers AWS requests with scripted faults, counting attempts by
/// operation (`TrentService.Decrypt`, `AssumeRole`...). AssumeRole succeeds
/// unless scripted otherwise.
#[derive(Clone)]
pub(crate) struct FaultServer {
    pub(crate) url: String,
    faults: Arc<Mutex<HashMap<String, Fault>>>,
    counts: Arc<Mutex<HashMap<String, u64>>>,
    /// Body of the last request of each operation.
    bodies: Arc<Mutex<HashMap<String, String>>>,
}

impl FaultServer {
    pub(crate) async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let server = Self {
            url,
            faults: Arc::default(),
            counts: Arc::default(),
            bodies: Arc::default(),
        };
        let s = server.clone();
        tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    return;
                };
                let s = s.clone();
                tokio::spawn(async move { s.serve(stream).await });
            }
        });
        server
    }

    pub(crate) fn set(&self, operation: &str, fault: Fault) {
        self.faults
            .lock()
            .unwrap()
            .insert(operation.to_owned(), fault);
    }

    pub(crate) fn last_body(&self, operation: &str) -> Option<String> {
        self.bodies.lock().unwrap().get(operation).cloned()
    }

    pub(crate) fn count(&self, operation: &str) -> u64 {
        *self.counts.lock().unwrap().get(operation).unwrap_or(&0)
    }

    async fn serve(&self, mut stream: tokio::net::TcpStream) {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let (head_end, content_length) = loop {
            let Ok(n) = stream.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                return;
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(pos) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&buf[..pos]).to_lowercase();
                let len = head
                    .lines()
                    .find_map(|l| l.strip_prefix("content-length:"))
                    .and_then(|v| v.trim().parse::<usize>().ok())
                    .unwrap_or(0);
                break (pos + 4, len);
            }
        };
        while buf.len() < head_end + content_length {
            let Ok(n) = stream.read(&mut chunk).await else {
                return;
            };
            if n == 0 {
                break;
            }
            buf.extend_from_slice(&chunk[..n]);
        }
        let head = String::from_utf8_lossy(&buf[..head_end]).to_lowercase();
        let body = String::from_utf8_lossy(&buf[head_end..]).into_owned();
        let operation = head
            .lines()
            .find_map(|l| l.strip_prefix("x-amz-target:"))
            .map(|t| t.trim().to_owned())
            .or_else(|| {
                body.contains("Action=AssumeRole")
                    .then(|| "assumerole".to_owned())
            })
            .unwrap_or_else(|| "unknown".to_owned());
        *self
            .counts
            .lock()
            .unwrap()
            .entry(operation.clone())
            .or_default() += 1;
        self.bodies
            .lock()
            .unwrap()
            .insert(operation.clone(), body.clone());
        let fault = self.faults.lock().unwrap().get(&operation).cloned();
        let (status, content_type, payload) = match fault {
            Some(Fault::Hang) => {
                tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
                return;
            }
            Some(Fault::KmsOk(json)) => (200, "application/x-amz-json-1.1", json),
            Some(Fault::KmsError(status, code)) => (
                status,
                "application/x-amz-json-1.1",
                format!(r#"{{"__type":"{code}","message":"injected {code}"}}"#),
            ),
            Some(Fault::StsDenied) => (
                403,
                "text/xml",
                "<ErrorResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><Error><Type>Sender</Type><Code>AccessDenied</Code><Message>User is not authorized to perform: sts:AssumeRole</Message></Error><RequestId>r1</RequestId></ErrorResponse>".to_owned(),
            ),
            None if operation == "assumerole" => (
                200,
                "text/xml",
                "<AssumeRoleResponse xmlns=\"https://sts.amazonaws.com/doc/2011-06-15/\"><AssumeRoleResult><Credentials><AccessKeyId>ASIATEST</AccessKeyId><SecretAccessKey>secret</SecretAccessKey><SessionToken>token</SessionToken><Expiration>2099-01-01T00:00:00Z</Expiration></Credentials><AssumedRoleUser><AssumedRoleId>AROATEST:kb</AssumedRoleId><Arn>arn:aws:sts::123456789012:assumed-role/r/kb</Arn></AssumedRoleUser></AssumeRoleResult><ResponseMetadata><RequestId>r2</RequestId></ResponseMetadata></AssumeRoleResponse>".to_owned(),
            ),
            None => (
                500,
                "application/x-amz-json-1.1",
                r#"{"__type":"KMSInternalException","message":"unscripted"}"#.to_owned(),
            ),
        };
        let reason = if status == 200 { "OK" } else { "Error" };
        let response = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nx-amzn-requestid: fault-1\r\nConnection: close\r\n\r\n{payload}",
            payload.len()
        );
        let _ = stream.write_all(response.as_bytes()).await;
        let _ = stream.shutdown().await;
    }
}
