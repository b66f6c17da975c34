//! The audit log: one JSON line per data-plane and admin call, saying who
//! asked for what and what they got. Never key material: wrapped keys appear
//! as a short SHA-256 prefix, plaintext not at all.
//!
//! Sinks are stdout (collected by the platform's log pipeline) or a file
//! rotated by size. In fail-closed mode a call whose record cannot be
//! written fails UNAVAILABLE and returns no key (as Vault does).
//!
//! Providers and the data plane add facts to the record of the call they
//! run in through `call_notes` (a leaf module: the layers below note facts
//! without importing the audit log).

use parking_lot::Mutex;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use serde::Serialize;

/// Where audit records go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuditTarget {
    Off,
    Stdout,
    File(PathBuf),
}

impl std::str::FromStr for AuditTarget {
    type Err = String;

    /// `off`, `stdout`, or a file path.
    fn from_str(text: &str) -> Result<Self, String> {
        match text {
            "" => Err("empty audit log target; use off, stdout or a file path".into()),
            "off" => Ok(Self::Off),
            "stdout" | "-" => Ok(Self::Stdout),
            path => Ok(Self::File(PathBuf::from(path))),
        }
    }
}

/// The `audit_*` settings.
#[derive(Debug, Clone, PartialEq, Eq, clap::Args)]
pub struct AuditSettings {
    /// Audit log: off, stdout, or a file path.
    #[arg(
        id = "audit_log",
        long = "audit-log",
        env = "KEYBROKER_AUDIT_LOG",
        default_value = "off"
    )]
    pub target: AuditTarget,
    /// Rotate the audit file when it would grow past this many bytes.
    #[arg(
        id = "audit_max_bytes",
        long = "audit-max-bytes",
        env = "KEYBROKER_AUDIT_MAX_BYTES",
        default_value = "104857600"
    )]
    pub max_bytes: u64,
    /// Rotated audit files kept (`audit.log.1` newest … `.N` oldest).
    #[arg(
        id = "audit_max_files",
        long = "audit-max-files",
        env = "KEYBROKER_AUDIT_MAX_FILES",
        default_value = "5"
    )]
    pub max_files: u32,
    /// Refuse a call (UNAVAILABLE, no key returned) when its audit record
    /// cannot be written.
    #[arg(
        id = "audit_fail_closed",
        long = "audit-fail-closed",
        env = "KEYBROKER_AUDIT_FAIL_CLOSED",
        action = clap::ArgAction::Set,
        num_args = 0..=1,
        default_value = "false",
        default_missing_value = "true"
    )]
    pub fail_closed: bool,
}

impl Default for AuditSettings {
    fn default() -> Self {
        crate::settings::defaults()
    }
}

impl AuditSettings {
    pub fn validate(&self) -> Result<(), crate::settings::ConfigError> {
        if self.max_bytes < 4096 {
            return crate::settings::invalid("audit_max_bytes", "must be at least 4096");
        }
        Ok(())
    }
}

/// Counts a finished call that used (or tried to use) a tenant's key in
/// the tenant's access log: the data-plane methods that take a reason.
fn access_use(access: &crate::access_log::AccessLog, r: &AuditRecord<'_>) {
    let (Some(reason), Some(tenant_id)) = (r.reason, r.tenant_id) else {
        return;
    };
    let Some(operation) = crate::access_log::operation(r.method) else {
        return;
    };
    let reason = reason.parse().unwrap_or_default();
    access.record(&crate::access_log::Use {
        tenant_id,
        caller: r.caller,
        reason,
        reason_detail: r.reason_detail.unwrap_or_default(),
        key_binding: r.key_binding.unwrap_or_default(),
        key_version: r.key_version.unwrap_or_default(),
        operation,
        outcome: r.outcome,
        error: r.error.unwrap_or_default(),
        request_id: r.request_id,
    });
}

/// One call, as written.
#[derive(Debug, Serialize)]
pub struct AuditRecord<'a> {
    /// RFC 3339, UTC, milliseconds.
    pub time: String,
    pub request_id: &'a str,
    /// Caller identity: SPIFFE ID or DNS name, or `unauthenticated`.
    pub caller: &'a str,
    pub peer: Option<String>,
    /// Full gRPC method, e.g. `keybroker.v1.KeyBroker/UnwrapKey`.
    pub method: &'a str,
    pub tenant_id: Option<&'a str>,
    pub key_binding: Option<&'a str>,
    pub key_version: Option<&'a str>,
    /// First 8 bytes (hex) of the SHA-256 of the wrapped key in the request.
    pub wrapped_key_sha256: Option<String>,
    /// gRPC status code name: `OK`, `PERMISSION_DENIED`, ...
    pub outcome: &'static str,
    /// The status message of a failed call (never contains key material).
    pub error: Option<&'a str>,
    pub latency_us: u64,
    /// UnwrapKey/RewrapKey: whether the DEK came from the cache (false
    /// when it was loaded: through its provider, or unsealed under a tenant
    /// key).
    pub cache_hit: Option<bool>,
    /// KMS (or keyring) calls this request made itself.
    pub provider_calls: u32,
    /// The provider's request id of the last such call, where the SDK exposes
    /// it (AWS), for matching with the customer's CloudTrail.
    pub provider_request_id: Option<String>,
    /// Data-plane calls: the access reason the call gave (`none` when it
    /// gave none), as authorized.
    pub reason: Option<&'static str>,
    /// The reason's detail (a ticket, case or request id), as given.
    pub reason_detail: Option<&'a str>,
}

#[derive(Debug, thiserror::Error)]
#[error("audit log {target}: {cause}")]
pub struct AuditError {
    target: String,
    /// Not `source`: the message includes it already.
    cause: std::io::Error,
}

/// A size-rotated file. Appends are whole lines (one record, or a batch's
/// records) in one `write` each, so a reader never sees half a record from
/// concurrent calls.
#[derive(Debug)]
struct FileSink {
    path: PathBuf,
    max_bytes: u64,
    max_files: u32,
    /// The open file and its size; held for one write (and a rare rotation).
    state: Mutex<(File, u64)>,
}

fn open_append(path: &Path) -> std::io::Result<(File, u64)> {
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .open(path)?;
    let len = file.metadata()?.len();
    Ok((file, len))
}

impl FileSink {
    /// Appends whole lines; `durable` also waits for them to reach the
    /// disk. A file may pass `max_bytes` by one batch's records.
    fn write(&self, line: &[u8], durable: bool) -> std::io::Result<()> {
        let mut state = self.state.lock();
        if state.1 > 0 && state.1 + line.len() as u64 > self.max_bytes && self.path.is_file() {
            self.rotate()?;
            *state = open_append(&self.path)?;
        }
        state.0.write_all(line)?;
        state.1 += line.len() as u64;
        if durable {
            state.0.sync_data()?;
        }
        Ok(())
    }

    /// `audit.log` → `.1` → `.2` …; the oldest beyond `max_files` is removed.
    fn rotate(&self) -> std::io::Result<()> {
        let numbered = |n: u32| {
            let mut name = self.path.clone().into_os_string();
            name.push(format!(".{n}"));
            PathBuf::from(name)
        };
        if self.max_files == 0 {
            return std::fs::remove_file(&self.path);
        }
        for n in (1..self.max_files).rev() {
            let from = numbered(n);
            if from.exists() {
                std::fs::rename(&from, numbered(n + 1))?;
            }
        }
        std::fs::rename(&self.path, numbered(1))
    }
}

#[derive(Debug)]
enum Sink {
    Off,
    Stdout,
    File(FileSink),
}

/// The audit log of a server.
#[derive(Debug)]
pub struct AuditLog {
    sink: Sink,
    fail_closed: bool,
    /// Records written, and records lost to write errors (metrics, tests).
    written: AtomicU64,
    failed: AtomicU64,
    /// The customer's key access log, fed every data-plane record that
    /// names a reason (every call that uses a key).
    access: Option<Arc<crate::access_log::AccessLog>>,
}

impl AuditLog {
    /// Feeds every call's record to the tenant's key access log too.
    #[must_use]
    pub fn with_access_log(mut self, access: Arc<crate::access_log::AccessLog>) -> Self {
        self.access = access.enabled().then_some(access);
        self
    }

    /// Whether records go to a sink (the wrapped-key digest is computed
    /// only then).
    pub fn writes(&self) -> bool {
        !matches!(self.sink, Sink::Off)
    }

    /// Counts a call of `method` in the tenant's access log without a
    /// record (no sink): `u.operation` is filled in from the method.
    pub fn count_use(&self, method: &str, u: &crate::access_log::Use<'_>) {
        let (Some(access), Some(operation)) = (&self.access, crate::access_log::operation(method))
        else {
            return;
        };
        access.record(&crate::access_log::Use { operation, ..*u });
    }

    /// Opens the sink. A file that cannot be opened is an error at start:
    /// better no server than a server with no audit trail.
    pub fn open(settings: &AuditSettings) -> Result<Self, AuditError> {
        let sink = match &settings.target {
            AuditTarget::Off => Sink::Off,
            AuditTarget::Stdout => Sink::Stdout,
            AuditTarget::File(path) => {
                let state = open_append(path).map_err(|cause| AuditError {
                    target: path.display().to_string(),
                    cause,
                })?;
                Sink::File(FileSink {
                    path: path.clone(),
                    max_bytes: settings.max_bytes,
                    max_files: settings.max_files,
                    state: Mutex::new(state),
                })
            }
        };
        Ok(Self {
            sink,
            fail_closed: settings.fail_closed,
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            access: None,
        })
    }

    pub fn disabled() -> Self {
        Self {
            sink: Sink::Off,
            fail_closed: false,
            written: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            access: None,
        }
    }

    /// Whether records are built at all: for a sink, or for the key access
    /// log (`off` and no registry skip building them).
    pub fn enabled(&self) -> bool {
        self.writes() || self.access.is_some()
    }

    pub fn fail_closed(&self) -> bool {
        self.fail_closed
    }

    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    pub fn failed(&self) -> u64 {
        self.failed.load(Ordering::Relaxed)
    }

    /// Writes one record. On failure the caller decides (fail-closed or not);
    /// the error is counted here either way.
    pub fn write(&self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        self.write_record(record, false)
    }

    /// Writes one record and flushes it to the disk (a file sink) or the
    /// pipe (stdout) before returning: the intent record of a state change,
    /// which must exist before the change is committed.
    pub fn write_durable(&self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        self.write_record(record, true)
    }

    fn write_record(&self, record: &AuditRecord<'_>, durable: bool) -> Result<(), AuditError> {
        if let (Some(access), false) = (&self.access, durable) {
            access_use(access, record);
        }
        let result = self.write_line(record, durable);
        match &result {
            Ok(true) => {
                self.written.fetch_add(1, Ordering::Relaxed);
            }
            Ok(false) => {}
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        result.map(|_| ())
    }

    fn write_line(&self, record: &AuditRecord<'_>, durable: bool) -> Result<bool, AuditError> {
        if !self.writes() {
            return Ok(false);
        }
        let mut line = Vec::with_capacity(512);
        self.append_line(&mut line, record)?;
        self.write_bytes(&line, durable)?;
        Ok(true)
    }

    /// `record` as one JSON line at the end of `lines`; nothing added when
    /// it cannot be serialised (no half record among a batch's).
    fn append_line(&self, lines: &mut Vec<u8>, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        let start = lines.len();
        if let Err(e) = serde_json::to_writer(&mut *lines, record) {
            lines.truncate(start);
            return Err(AuditError {
                target: self.target(),
                cause: std::io::Error::other(e),
            });
        }
        lines.push(b'\n');
        Ok(())
    }

    /// Whole lines to the sink, in one write.
    fn write_bytes(&self, lines: &[u8], durable: bool) -> Result<(), AuditError> {
        let written = match &self.sink {
            Sink::Off => Ok(()),
            Sink::Stdout => {
                let mut out = std::io::stdout().lock();
                out.write_all(lines)
                    .and_then(|()| if durable { out.flush() } else { Ok(()) })
            }
            Sink::File(file) => file.write(lines, durable),
        };
        written.map_err(|cause| AuditError {
            target: self.target(),
            cause,
        })
    }

    fn target(&self) -> String {
        match &self.sink {
            Sink::File(f) => f.path.display().to_string(),
            _ => "stdout".to_owned(),
        }
    }

    /// A gatherer of records written together by [`Gathered::commit`]: a
    /// batch's items, one `write` for all of them instead of one each.
    pub fn gather(&self) -> Gathered<'_> {
        Gathered {
            log: self,
            lines: Vec::new(),
            records: 0,
        }
    }
}

/// Where a finished call's record goes: written at once (`&AuditLog`), or
/// gathered with the other records of its batch ([`Gathered`]).
pub trait Recorder {
    /// The log the records are for (its sink, mode and access log).
    fn log(&self) -> &AuditLog;

    /// Writes `record`, or keeps it for the gatherer's one write. Counts
    /// the use in the tenant's access log either way.
    fn put(&mut self, record: &AuditRecord<'_>) -> Result<(), AuditError>;
}

impl Recorder for &AuditLog {
    fn log(&self) -> &AuditLog {
        self
    }

    fn put(&mut self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        self.write(record)
    }
}

/// Records kept for one write ([`AuditLog::gather`]).
#[derive(Debug)]
pub struct Gathered<'a> {
    log: &'a AuditLog,
    lines: Vec<u8>,
    records: u64,
}

impl Recorder for Gathered<'_> {
    fn log(&self) -> &AuditLog {
        self.log
    }

    fn put(&mut self, record: &AuditRecord<'_>) -> Result<(), AuditError> {
        if let Some(access) = &self.log.access {
            access_use(access, record);
        }
        if self.log.writes() {
            if let Err(err) = self.log.append_line(&mut self.lines, record) {
                self.log.failed.fetch_add(1, Ordering::Relaxed);
                return Err(err);
            }
            self.records += 1;
        }
        Ok(())
    }
}

impl Gathered<'_> {
    /// Writes every record kept, in one write. On failure none of them is
    /// written (the caller refuses their calls in fail-closed mode).
    pub fn commit(self) -> Result<(), AuditError> {
        if self.records == 0 {
            return Ok(());
        }
        let written = self.log.write_bytes(&self.lines, false);
        let counter = match written {
            Ok(()) => &self.log.written,
            Err(_) => &self.log.failed,
        };
        counter.fetch_add(self.records, Ordering::Relaxed);
        written
    }
}

pub fn rfc3339_now() -> String {
    humantime::format_rfc3339_millis(SystemTime::now()).to_string()
}

pub use crate::call_notes::{CallNotes, note_dek_load, note_provider_call, scoped};

impl crate::metrics::AuditSource for AuditLog {
    fn written(&self) -> u64 {
        AuditLog::written(self)
    }

    fn failed(&self) -> u64 {
        AuditLog::failed(self)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(request_id: &str) -> AuditRecord<'_> {
        AuditRecord {
            time: rfc3339_now(),
            request_id,
            caller: "spiffe://t/a",
            peer: None,
            method: "keybroker.v1.KeyBroker/UnwrapKey",
            tenant_id: Some("acme"),
            key_binding: None,
            key_version: None,
            wrapped_key_sha256: None,
            outcome: "OK",
            error: None,
            latency_us: 1,
            cache_hit: Some(true),
            provider_calls: 0,
            provider_request_id: None,
            reason: Some("customer_support"),
            reason_detail: Some("TICKET-1"),
        }
    }

    /// Gathered records land whole and in order with one commit, are
    /// counted as written, or all as failed when the write fails.
    #[test]
    fn gathered_records_are_written_together_or_fail_together() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let open = |target| {
            AuditLog::open(&AuditSettings {
                target,
                ..AuditSettings::default()
            })
            .unwrap()
        };
        let log = open(AuditTarget::File(path.clone()));
        log.write(&record("single")).unwrap();
        let mut gathered = log.gather();
        for id in ["b1", "b2", "b3"] {
            gathered.put(&record(id)).unwrap();
        }
        // Nothing reaches the file before the commit.
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 1);
        gathered.commit().unwrap();
        log.gather().commit().unwrap();
        let ids: Vec<String> = std::fs::read_to_string(&path)
            .unwrap()
            .lines()
            .map(|l| {
                serde_json::from_str::<serde_json::Value>(l).unwrap()["request_id"].to_string()
            })
            .collect();
        assert_eq!(ids, ["\"single\"", "\"b1\"", "\"b2\"", "\"b3\""]);
        assert_eq!((log.written(), log.failed()), (4, 0));

        // Every write to /dev/full fails with ENOSPC.
        let full = open(AuditTarget::File("/dev/full".into()));
        let mut gathered = full.gather();
        for id in ["b1", "b2"] {
            gathered.put(&record(id)).unwrap();
        }
        assert!(gathered.commit().is_err());
        assert_eq!((full.written(), full.failed()), (0, 2));
    }

    #[test]
    fn file_rotates_by_size_and_keeps_the_newest_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("audit.log");
        let line_len = serde_json::to_vec(&record("r00")).unwrap().len() as u64 + 1;
        let log = AuditLog::open(&AuditSettings {
            target: AuditTarget::File(path.clone()),
            max_bytes: 4 * line_len,
            max_files: 2,
            fail_closed: true,
        })
        .unwrap();
        for i in 0..40 {
            log.write(&record(&format!("r{i:02}"))).unwrap();
        }
        assert_eq!(log.written(), 40);
        let mode = std::fs::metadata(&path).unwrap().permissions();
        assert_eq!(
            std::os::unix::fs::PermissionsExt::mode(&mode) & 0o777,
            0o600
        );
        let mut kept = Vec::new();
        for name in ["audit.log.2", "audit.log.1", "audit.log"] {
            let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
            assert!(
                text.len() as u64 <= 4 * line_len,
                "{name} is {} bytes",
                text.len()
            );
            for line in text.lines() {
                let v: serde_json::Value = serde_json::from_str(line).unwrap();
                kept.push(v["request_id"].as_str().unwrap().to_owned());
            }
        }
        assert!(!dir.path().join("audit.log.3").exists());
        // The newest 12 records, oldest file first, in order.
        let expected: Vec<String> = (28..40).map(|i| format!("r{i:02}")).collect();
        assert_eq!(kept, expected);
    }

    #[test]
    fn write_errors_are_reported_and_counted() {
        let log = AuditLog::open(&AuditSettings {
            target: AuditTarget::File("/dev/full".into()),
            ..AuditSettings::default()
        })
        .unwrap();
        assert!(log.write(&record("r1")).is_err());
        assert_eq!((log.written(), log.failed()), (0, 1));
    }
}
