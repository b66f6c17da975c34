//! The model-based lifecycle test (DESIGN.md section 4b, issue 31): random
//! sequences of data-plane calls running concurrently with control-plane
//! operations, replica restarts and SIGKILLs, against the real binary; after
//! every step a reference model says which acknowledged DEKs must unwrap,
//! which must be refused and which must be gone, and every one is checked.
//!
//! Invariants checked after each step:
//! - every acknowledged DEK unwraps to its plaintext until an action that
//!   destroys it on purpose (a deletion, a forced unlink of what protects
//!   it) or refuses it (a disabled key, a retired version, a scheduled
//!   deletion), and is served again when that is undone;
//! - no DEK of a deleted life of a tenant id unwraps again, from any cache,
//!   also after the id is created again (a new incarnation);
//! - every key change finishes (after a restart too), and then the stored
//!   tenant key versions are exactly where the model put them: none under a
//!   key changed away from, none of an unlinked key left;
//! - no call answers INTERNAL (or UNKNOWN);
//! - an export taken at any step restores to a registry that serves what
//!   the original served then.
//!
//! CI runs a bounded number of cases (`KEYBROKER_LIFECYCLE_CASES`, default
//! 4, of up to 24 steps); `KEYBROKER_LIFECYCLE_SOAK=SECONDS` runs cases
//! until that much time has passed and reports cases and steps. A failure
//! is shrunk by proptest and printed as the list of steps that still fails.

mod model;
mod system;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use base64::Engine as _;
use keybroker::envelope::Envelope;
use keybroker::proto;
use proptest::prelude::*;
use proptest::test_runner::{Config, TestRunner};
use proptest_state_machine::{ReferenceStateMachine, StateMachineTest};
use tonic::Code;

use self::model::{Control, Data, Dek, Expect, RefState, Step, TENANTS, Target, Tenant};
use self::system::{Backend, System, patiently};

thread_local! {
    /// Where the next case's replicas keep their registry.
    static BACKEND: std::cell::Cell<Backend> = const { std::cell::Cell::new(Backend::Sqlite) };
}

static CASES: AtomicUsize = AtomicUsize::new(0);
static STEPS: AtomicUsize = AtomicUsize::new(0);
/// DEK checks made, by what the model expected: read, refused, gone.
static CHECKED: [AtomicUsize; 3] = [
    AtomicUsize::new(0),
    AtomicUsize::new(0),
    AtomicUsize::new(0),
];
/// Per kind of control operation: acknowledged, refused.
static BY_KIND: std::sync::Mutex<std::collections::BTreeMap<String, [usize; 2]>> =
    std::sync::Mutex::new(std::collections::BTreeMap::new());
/// Customer keys disabled or enabled at the provider (moto), each seen.
static AT_PROVIDER: AtomicUsize = AtomicUsize::new(0);
/// Control operations acknowledged, and refused (FAILED_PRECONDITION etc.).
static CONTROLS: [AtomicUsize; 2] = [AtomicUsize::new(0), AtomicUsize::new(0)];

struct Reference;

impl ReferenceStateMachine for Reference {
    type State = RefState;
    type Transition = Step;

    fn init_state() -> BoxedStrategy<RefState> {
        Just(RefState::default()).boxed()
    }

    fn transitions(state: &RefState) -> BoxedStrategy<Step> {
        model::transitions(state)
    }

    fn apply(state: RefState, step: &Step) -> RefState {
        model::apply_ref(state, step)
    }

    fn preconditions(state: &RefState, step: &Step) -> bool {
        model::precondition(state, step)
    }
}

/// The system under test, the precise model beside it, and what ran.
struct Sut {
    rt: tokio::runtime::Runtime,
    system: Option<System>,
    tenants: Vec<Tenant>,
    deks: Vec<Dek>,
    /// Exports taken, with what every DEK was to do then.
    /// Exports taken, with what every DEK was to do then, and whether an
    /// AWS key protected it (its provider state may have changed since).
    exports: Vec<(std::path::PathBuf, Vec<Expected>)>,
    log: Vec<String>,
}

struct LifecycleTest;

impl StateMachineTest for LifecycleTest {
    type SystemUnderTest = Sut;
    type Reference = Reference;

    fn init_test(_: &RefState) -> Sut {
        CASES.fetch_add(1, Ordering::Relaxed);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let system = rt.block_on(System::start(BACKEND.with(std::cell::Cell::get)));
        Sut {
            rt,
            system: Some(system),
            tenants: vec![Tenant::default(); TENANTS.len()],
            deks: Vec::new(),
            exports: Vec::new(),
            log: Vec::new(),
        }
    }

    fn apply(mut sut: Sut, _: &RefState, step: Step) -> Sut {
        STEPS.fetch_add(1, Ordering::Relaxed);
        sut.log.push(format!("{step:?}"));
        let rt = std::mem::replace(
            &mut sut.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        rt.block_on(sut.run(&step));
        sut.rt = rt;
        sut
    }

    fn teardown(mut sut: Sut, _: RefState) {
        let rt = std::mem::replace(
            &mut sut.rt,
            tokio::runtime::Builder::new_current_thread()
                .build()
                .unwrap(),
        );
        rt.block_on(sut.check_exports());
        if let Some(mut system) = sut.system.take() {
            rt.block_on(system.stop(false));
        }
    }
}

impl Sut {
    fn system(&mut self) -> &mut System {
        self.system.as_mut().unwrap()
    }

    fn fail(&self, what: String) -> ! {
        let log = self.system.as_ref().map(System::log).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(30).collect();
        panic!(
            "{what}\nsteps so far:\n  {}\nserver log (newest last):\n{}",
            self.log.join("\n  "),
            tail.into_iter().rev().collect::<Vec<_>>().join("\n")
        );
    }

    /// One step: the control operation and the data calls at once, then
    /// what the model learns, then every check.
    async fn run(&mut self, step: &Step) {
        let kill = matches!(step.control, Control::Killed(_));
        let control = match &step.control {
            Control::Killed(inner) => (**inner).clone(),
            c => c.clone(),
        };
        let at = usize::from(step.replica);
        if let Control::Export = control {
            // Taken before the step's data calls: what every DEK
            // acknowledged so far is to do is known then.
            let n = self.exports.len();
            let path = self.system().export(n);
            let expected = self
                .expectations()
                .into_iter()
                .map(|(i, want)| {
                    let dek = &self.deks[i];
                    (i, want, self.tenants[dek.tenant].at_provider(dek))
                })
                .collect();
            self.exports.push((path, expected));
        }
        let system = self.system.as_ref().unwrap();
        let admin = system.admin(at);
        let brokers: Vec<_> = (0..step.data.len())
            .map(|i| system.broker(at + 1 + i))
            .collect();
        let picks = self.picks(&step.data);
        // The AWS key a step names: a new one in moto for LinkKey, the
        // model's for a change at the provider.
        let aws = match &control {
            Control::Link { .. } => Some(system.create_aws_key().await),
            Control::AtProvider { tenant, key, .. } => self.tenants[*tenant]
                .keys
                .get(*key)
                .and_then(|k| k.aws.clone()),
            _ => None,
        };
        let kms = system.kms();
        let retire_min = match &control {
            Control::Retire { tenant, .. } => self.newest_version(*tenant),
            _ => 0,
        };
        let data = futures::future::join_all(
            step.data
                .iter()
                .zip(picks)
                .zip(brokers)
                .map(|((d, pick), broker)| run_data(broker, d.clone(), pick)),
        );
        let outcome = if kill {
            let control_run = run_control(admin, control.clone(), retire_min, kms, aws.clone());
            let (_, data_out) = tokio::join!(
                async {
                    tokio::select! {
                        _ = control_run => {}
                        _ = tokio::time::sleep(Duration::from_millis(15)) => {}
                    }
                },
                data
            );
            self.system().restart(at, true).await;
            (None, data_out)
        } else if matches!(control, Control::Restart) {
            let data_out = data.await;
            self.system().restart(at, false).await;
            (Some(Ok(())), data_out)
        } else if matches!(control, Control::RestartRegistry) {
            let (_, data_out) = tokio::join!(
                async { self.system.as_ref().unwrap().restart_registry() },
                data
            );
            (Some(Ok(())), data_out)
        } else if matches!(control, Control::DropFeeds) {
            let (_, data_out) =
                tokio::join!(self.system.as_ref().unwrap().drop_change_feeds(), data);
            (Some(Ok(())), data_out)
        } else {
            let (c, d) = tokio::join!(
                run_control(admin, control.clone(), retire_min, kms, aws.clone()),
                data
            );
            (Some(c), d)
        };
        let (control_result, data_out) = outcome;
        let learned_from = self.deks.len();
        for out in data_out {
            self.learn(out);
        }
        match control_result {
            // The registry went away under it: whatever committed counts.
            Some(Err(s)) if s.code() == Code::Unavailable => self.resolve_killed(&control).await,
            Some(result) => self.apply_control(&control, result, retire_min, aws).await,
            None => self.resolve_killed(&control).await,
        }
        for dek in &mut self.deks[learned_from..] {
            self.tenants[dek.tenant].pin_links(std::slice::from_mut(dek));
        }
        self.sync_tenants().await;
        self.check_versions().await;
        self.check_deks().await;
    }

    /// The DEK each Unwrap/Rewrap picks (by index among the tenant's).
    fn picks(&self, data: &[Data]) -> Vec<Option<Dek>> {
        data.iter()
            .map(|d| match d {
                Data::Unwrap { tenant, pick } | Data::Rewrap { tenant, pick } => {
                    let own: Vec<&Dek> = self.deks.iter().filter(|k| k.tenant == *tenant).collect();
                    (!own.is_empty()).then(|| own[usize::from(*pick) % own.len()].clone())
                }
                Data::Generate { .. } => None,
            })
            .collect()
    }

    /// New DEKs from a data call (refusals are the model's to judge at
    /// the next check; INTERNAL never).
    fn learn(&mut self, out: DataOut) {
        for result in out {
            match result {
                Ok((tenant, key, wrapped, plaintext)) => {
                    let envelope = Envelope::parse(&wrapped).unwrap();
                    let sealed =
                        (envelope.tenant_key_version > 0).then_some(envelope.tenant_key_version);
                    let t = &mut self.tenants[tenant];
                    if let Some(v) = sealed {
                        t.versions
                            .entry((envelope.incarnation, v))
                            .or_insert_with(|| Some(key.key_binding.clone()));
                    }
                    // Which life is current is GetTenant's to say, after
                    // the step (a concurrent deletion may have ended it).
                    t.seen.insert(envelope.incarnation);
                    self.deks.push(Dek {
                        tenant,
                        incarnation: envelope.incarnation,
                        wrapped,
                        plaintext,
                        sealed,
                        direct: (sealed.is_none()).then_some((envelope.key_binding, None)),
                    });
                }
                Err(status) => {
                    if matches!(status.code(), Code::Internal | Code::Unknown) {
                        self.fail(format!("a data call answered {status:?}"));
                    }
                }
            }
        }
    }

    /// What an acknowledged control operation did, in the model.
    async fn apply_control(
        &mut self,
        control: &Control,
        result: Result<(), tonic::Status>,
        retire_min: u32,
        aws: Option<String>,
    ) {
        if let Err(status) = &result {
            if matches!(status.code(), Code::Internal | Code::Unknown) {
                self.fail(format!("{control:?} answered {status:?}"));
            }
        }
        CONTROLS[usize::from(result.is_err())].fetch_add(1, Ordering::Relaxed);
        let kind = format!("{control:?}");
        let kind = kind.split([' ', '{']).next().unwrap_or_default().to_owned();
        BY_KIND.lock().unwrap().entry(kind).or_default()[usize::from(result.is_err())] += 1;
        if let Err(status) = &result
            && std::env::var_os("KEYBROKER_LIFECYCLE_VERBOSE").is_some()
        {
            eprintln!(
                "refused: {control:?}: {:?} {}",
                status.code(),
                status.message()
            );
        }
        if let Control::RotateKeyring = control {
            self.system().rotate_keyring();
        }
        if result.is_err() {
            return;
        }
        match control {
            Control::Create { tenant, direct } => {
                let t = &mut self.tenants[*tenant];
                t.direct = *direct;
            }
            Control::Import {
                tenant,
                key,
                primary,
            } => {
                let t = &mut self.tenants[*tenant];
                let first = t.primary().is_none();
                t.linked(key);
                if *primary || first {
                    self.make_primary(*tenant, key);
                }
            }
            Control::Link {
                tenant,
                key,
                primary,
            } => {
                let t = &mut self.tenants[*tenant];
                let first = t.primary().is_none();
                t.linked(key).aws = aws;
                if *primary || first {
                    self.make_primary(*tenant, key);
                }
            }
            Control::AtProvider {
                tenant,
                key,
                enable,
            } => {
                let Some(k) = self.tenants[*tenant]
                    .keys
                    .get_mut(*key)
                    .filter(|k| k.aws.is_some() && k.aws == aws)
                else {
                    return;
                };
                k.revoked = !enable;
                self.await_key_state(*tenant, key).await;
                AT_PROVIDER.fetch_add(1, Ordering::Relaxed);
            }
            Control::SetPrimary { tenant, key } => self.make_primary(*tenant, key),
            Control::Disable { tenant, key, to } => {
                let t = &mut self.tenants[*tenant];
                match to {
                    Some(Target::Platform) => t.changed_to("platform"),
                    Some(Target::Key(k)) => {
                        self.make_primary(*tenant, k);
                    }
                    None => {}
                }
                let t = &mut self.tenants[*tenant];
                if let Some(k) = t.keys.get_mut(*key) {
                    k.disabled = true;
                }
            }
            Control::Enable { tenant, key } => {
                if let Some(k) = self.tenants[*tenant].keys.get_mut(*key) {
                    k.disabled = false;
                }
            }
            Control::Unlink { tenant, key, .. } => {
                let t = &mut self.tenants[*tenant];
                t.keys.remove(*key);
                let life = t.life();
                for ((i, _), binding) in t.versions.iter_mut() {
                    if *i == life && binding.as_deref() == Some(*key) {
                        *binding = None;
                    }
                }
            }
            Control::Retire { tenant, undo } => {
                self.tenants[*tenant].min_version = if *undo { 0 } else { retire_min.max(1) };
            }
            Control::Delete { tenant, now } => {
                if *now {
                    self.tenants[*tenant].destroyed();
                } else {
                    self.tenants[*tenant].scheduled = true;
                }
            }
            Control::Cancel { tenant } => self.tenants[*tenant].scheduled = false,
            _ => {}
        }
    }

    /// The newest tenant key version the model knows of (0: none).
    fn newest_version(&self, tenant: usize) -> u32 {
        self.tenants[tenant]
            .current_versions()
            .keys()
            .next_back()
            .copied()
            .unwrap_or(0)
    }

    fn make_primary(&mut self, tenant: usize, key: &str) {
        let t = &mut self.tenants[tenant];
        for (name, k) in t.keys.iter_mut() {
            k.primary = name == key;
        }
        t.changed_to(key);
    }

    /// A control operation the replica was killed under: whatever of it
    /// committed is resumed at start; the model takes the stored outcome.
    async fn resolve_killed(&mut self, control: &Control) {
        let tenant = match control {
            Control::Create { tenant, .. }
            | Control::Import { tenant, .. }
            | Control::Link { tenant, .. }
            | Control::SetPrimary { tenant, .. }
            | Control::Disable { tenant, .. }
            | Control::Enable { tenant, .. }
            | Control::Unlink { tenant, .. }
            | Control::Retire { tenant, .. }
            | Control::Delete { tenant, .. }
            | Control::Cancel { tenant } => *tenant,
            _ => return,
        };
        self.wait_for_key_changes().await;
        let id = TENANTS[tenant];
        let mut admin = self.system().admin(0);
        let got = get_tenant(&admin, id).await;
        let t = &mut self.tenants[tenant];
        match got {
            Err(s) if s.code() == Code::NotFound => {
                if t.incarnation != 0 {
                    t.destroyed();
                    t.settle(0);
                }
                return;
            }
            Err(s) => self.fail(format!("GetTenant after a kill: {s:?}")),
            Ok(shown) => {
                if shown.incarnation != t.incarnation {
                    // Deleted (and maybe re-created) while killed.
                    if matches!(control, Control::Delete { .. }) {
                        t.destroyed();
                    }
                    t.settle(shown.incarnation);
                }
                t.scheduled = shown.delete_time.is_some();
                t.min_version = shown.min_tenant_key_version;
                t.direct = shown.key_hierarchy() == proto::KeyHierarchy::Direct;
            }
        }
        let keys = admin
            .list_keys(proto::ListKeysRequest {
                tenant_id: id.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
        let t = &mut self.tenants[tenant];
        let before = std::mem::take(&mut t.keys);
        for k in &keys {
            let key = match before.get(&k.name) {
                Some(old) => {
                    t.keys.insert(k.name.clone(), old.clone());
                    t.keys.get_mut(&k.name).unwrap()
                }
                None => {
                    let key = t.linked(&k.name);
                    if k.provider() == proto::Provider::AwsKms {
                        key.aws = Some(k.key_reference.clone());
                    }
                    key
                }
            };
            key.disabled = k.state() == proto::KeyState::Disabled;
            key.primary = k.primary;
        }
        let stored = self.system.as_ref().unwrap().stored_versions(id).await;
        let t = &mut self.tenants[tenant];
        let life = t.life();
        for ((i, _), binding) in t.versions.iter_mut() {
            if *i == life {
                *binding = None;
            }
        }
        for (v, b) in stored {
            t.versions.insert((life, v), Some(b));
        }
    }

    /// A change at the provider is seen within the revocation bound: the
    /// key's state becomes what the model says (an operator's DisableKey
    /// stays whatever the provider does).
    async fn await_key_state(&mut self, tenant: usize, name: &str) {
        let Some(key) = self.tenants[tenant].keys.get(name).cloned() else {
            return;
        };
        let want = if key.disabled {
            proto::KeyState::Disabled
        } else if key.revoked {
            proto::KeyState::Revoked
        } else {
            proto::KeyState::Active
        };
        let started = Instant::now();
        loop {
            let keys = patiently(|| {
                let mut admin = self.system().admin(0);
                async move {
                    admin
                        .list_keys(proto::ListKeysRequest {
                            tenant_id: TENANTS[tenant].into(),
                        })
                        .await
                }
            })
            .await
            .unwrap()
            .into_inner()
            .keys;
            let state = keys.iter().find(|k| k.name == name).map(|k| k.state());
            if state == Some(want) || state.is_none() {
                return;
            }
            if started.elapsed() > system::REVOCATION {
                self.fail(format!(
                    "key {name} of {}: {state:?} {:?} after a change at the provider, the model says {want:?}",
                    TENANTS[tenant],
                    started.elapsed()
                ));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Key changes a killed replica left: resumed at its start.
    async fn wait_for_key_changes(&mut self) {
        let started = Instant::now();
        for id in TENANTS {
            loop {
                let got = get_tenant(&self.system().admin(0), id).await;
                let in_progress = match &got {
                    Ok(t) => t.reencryption.as_ref().is_some_and(|r| {
                        r.in_progress && !r.target.is_empty() && r.versions_done < r.versions_total
                    }),
                    Err(_) => false,
                };
                if !in_progress {
                    break;
                }
                if started.elapsed() > Duration::from_secs(15) {
                    self.fail(format!(
                        "a key change of {id} did not finish after a restart"
                    ));
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Incarnations and scheduled deletions as GetTenant shows them; a
    /// re-created id must be a new life.
    async fn sync_tenants(&mut self) {
        for (i, id) in TENANTS.iter().enumerate() {
            let got = get_tenant(&self.system().admin(0), id).await;
            let t = &mut self.tenants[i];
            match got {
                Ok(shown) => {
                    t.settle(shown.incarnation);
                    if t.deleted.contains(&shown.incarnation) {
                        let what = format!(
                            "{id} was created again as a deleted incarnation {}",
                            shown.incarnation
                        );
                        self.fail(what);
                    }
                    t.scheduled = shown.delete_time.is_some();
                }
                Err(s) if s.code() == Code::NotFound => t.settle(0),
                Err(s) => {
                    let what = format!("GetTenant {id}: {s:?}");
                    self.fail(what)
                }
            }
        }
    }

    /// Stored tenant key versions are where the model says, once no key
    /// change is under way: none under a key changed away from, none of an
    /// unlinked key left, none lost.
    async fn check_versions(&mut self) {
        for (i, id) in TENANTS.iter().enumerate() {
            let stored = self.system.as_ref().unwrap().stored_versions(id).await;
            let t = &self.tenants[i];
            if t.scheduled {
                continue;
            }
            let model = t.current_versions();
            let expected: Vec<(u32, String)> = model
                .iter()
                .filter_map(|(v, b)| b.clone().map(|b| (*v, b)))
                .collect();
            // Versions minted by calls whose answer never came (killed)
            // are not the model's: compare those it knows.
            let known: Vec<(u32, String)> = stored
                .iter()
                .filter(|(v, _)| model.contains_key(v))
                .cloned()
                .collect();
            if known != expected {
                self.fail(format!(
                    "{id}: tenant key versions stored {stored:?}, the model says {expected:?}"
                ));
            }
            for (v, b) in &stored {
                if b != "platform" && !t.keys.contains_key(b) && model.contains_key(v) {
                    self.fail(format!("{id}: version {v} under unlinked key {b}"));
                }
            }
        }
    }

    fn expectations(&self) -> Vec<(usize, Expect)> {
        self.deks
            .iter()
            .enumerate()
            .map(|(i, d)| (i, self.tenants[d.tenant].expect(d)))
            .collect()
    }

    /// Every acknowledged DEK does what the model says, on every replica
    /// (batch calls). With replicas, another replica may lag a change by
    /// the propagation bound; past it, any difference is a violation. A
    /// wrong plaintext or INTERNAL never waits.
    async fn check_deks(&mut self) {
        let expected = self.expectations();
        let replicas = self.system().replicas.len();
        for r in 0..replicas {
            let started = Instant::now();
            loop {
                let broker = self.system().broker(r);
                let got = unwrap_all(broker, &self.deks).await;
                let mut wrong = None;
                for ((i, want), got) in expected.iter().zip(&got) {
                    if let Err(why) = judge(&self.deks[*i], *want, got) {
                        let fatal = why.contains("other bytes") || why.contains("answered");
                        if fatal || started.elapsed() > system::PROPAGATION {
                            self.fail(format!("replica {r}: DEK {i}: {why}"));
                        }
                        wrong = Some(why);
                        break;
                    }
                }
                if wrong.is_none() {
                    for (_, want) in &expected {
                        CHECKED[*want as usize].fetch_add(1, Ordering::Relaxed);
                    }
                    break;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }

    /// Each export, restored into a new registry with the same keyring,
    /// serves what the original served when it was taken.
    async fn check_exports(&mut self) {
        let exports = std::mem::take(&mut self.exports);
        let from = self.system.as_ref().unwrap().keyring_dir().to_owned();
        let moto = self.system.as_ref().unwrap().moto_url().to_owned();
        for (n, (path, expected)) in exports.iter().enumerate() {
            let (_dir, mut process, broker) = system::restored(&from, path, &moto).await;
            let deks: Vec<Dek> = expected
                .iter()
                .map(|(i, _, _)| self.deks[*i].clone())
                .collect();
            let got = unwrap_all(broker, &deks).await;
            for ((i, want, at_provider), got) in expected.iter().zip(got) {
                let dek = &self.deks[*i];
                // A key the customer disabled (or enabled) at the provider
                // since the export: the restored server sees it as it is now
                // (refused, or read once its watcher notices). Anything
                // else, and a wrong plaintext always, is a violation.
                let provider_moved = *at_provider
                    && *want != Expect::Gone
                    && (judge(dek, Expect::Read, &got).is_ok()
                        || judge(dek, Expect::Refused, &got).is_ok());
                if let Err(why) = judge(dek, *want, &got)
                    && !provider_moved
                {
                    self.fail(format!("export {n}, restored: DEK {i}: {why}"));
                }
            }
            process.kill();
        }
    }
}

/// What a DEK was to do when an export was taken: (index, expectation,
/// whether an AWS key protected it).
type Expected = (usize, Expect, bool);

/// A DEK a data call got: (tenant, key info, wrapped key, plaintext).
type Got = (usize, proto::KeyInfo, Vec<u8>, Vec<u8>);
type DataOut = Vec<Result<Got, tonic::Status>>;

/// GetTenant, patiently (a replica or the registry may be restarting).
async fn get_tenant(
    admin: &proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>,
    id: &'static str,
) -> Result<proto::Tenant, tonic::Status> {
    patiently(|| {
        let mut admin = admin.clone();
        async move {
            admin
                .get_tenant(proto::GetTenantRequest {
                    tenant_id: id.into(),
                })
                .await
        }
    })
    .await
    .map(|r| r.into_inner().tenant.unwrap_or_default())
}

async fn run_data(
    mut broker: proto::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
    data: Data,
    pick: Option<Dek>,
) -> DataOut {
    let ctx = || crate::common::ctx(&[("obj", "o")]);
    match data {
        Data::Generate { tenant, batch } => {
            let items = (0..batch)
                .map(|_| proto::GenerateDataKeyRequest {
                    tenant_id: TENANTS[tenant].into(),
                    context: ctx(),
                    ..Default::default()
                })
                .collect();
            match broker
                .batch_generate_data_key(proto::BatchGenerateDataKeyRequest { items })
                .await
            {
                Ok(r) => r
                    .into_inner()
                    .results
                    .into_iter()
                    .map(|r| match (r.response, r.status) {
                        (Some(g), _) => Ok((
                            tenant,
                            g.key.unwrap_or_default(),
                            g.wrapped_key.to_vec(),
                            g.plaintext.to_vec(),
                        )),
                        (None, Some(s)) => Err(tonic::Status::new(Code::from(s.code), s.message)),
                        (None, None) => Err(tonic::Status::internal("an empty batch item")),
                    })
                    .collect(),
                Err(s) => vec![Err(s)],
            }
        }
        Data::Unwrap { .. } => {
            // Judged at the step's check; here only INTERNAL matters.
            let Some(dek) = pick else { return Vec::new() };
            match broker
                .unwrap_key(crate::common::unwrap_req(
                    TENANTS[dek.tenant],
                    &[("obj", "o")],
                    &dek.wrapped,
                ))
                .await
            {
                Ok(_) => Vec::new(),
                Err(s) => vec![Err(s)],
            }
        }
        Data::Rewrap { .. } => {
            let Some(dek) = pick else { return Vec::new() };
            match broker
                .rewrap_key(proto::RewrapKeyRequest {
                    tenant_id: TENANTS[dek.tenant].into(),
                    context: ctx(),
                    wrapped_key: dek.wrapped.clone(),
                    justification: None,
                })
                .await
            {
                Ok(r) => {
                    let r = r.into_inner();
                    vec![Ok((
                        dek.tenant,
                        r.key.unwrap_or_default(),
                        r.wrapped_key.to_vec(),
                        dek.plaintext.clone(),
                    ))]
                }
                Err(s) => vec![Err(s)],
            }
        }
    }
}

/// Runs a control operation; `retire_min`: the newest version the model
/// knows of the tenant a Retire names (all older ones are retired).
async fn run_control(
    mut admin: proto::key_admin_client::KeyAdminClient<tonic::transport::Channel>,
    control: Control,
    retire_min: u32,
    kms: aws_sdk_kms::Client,
    aws: Option<String>,
) -> Result<(), tonic::Status> {
    let id = |t: usize| TENANTS[t].to_owned();
    match control {
        Control::Nothing
        | Control::Restart
        | Control::RestartRegistry
        | Control::DropFeeds
        | Control::Export
        | Control::RotateKeyring => Ok(()),
        Control::Killed(_) => Ok(()),
        Control::Create { tenant, direct } => admin
            .create_tenant(proto::CreateTenantRequest {
                tenant_id: id(tenant),
                key_hierarchy: if direct {
                    proto::KeyHierarchy::Direct
                } else {
                    proto::KeyHierarchy::TenantKey
                }
                .into(),
                ..Default::default()
            })
            .await
            .map(drop),
        Control::Import {
            tenant,
            key,
            primary,
        } => {
            let material = base64::engine::general_purpose::STANDARD
                .encode(keybroker::secret::SecretBytes::random(32).unwrap().expose());
            admin
                .import_key_material(proto::ImportKeyMaterialRequest {
                    tenant_id: id(tenant),
                    name: key.into(),
                    key_material_base64: material,
                    make_primary: primary,
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Control::Link {
            tenant,
            key,
            primary,
        } => {
            let arn = aws.unwrap_or_default();
            admin
                .link_key(proto::LinkKeyRequest {
                    tenant_id: id(tenant),
                    name: key.into(),
                    provider: proto::Provider::AwsKms.into(),
                    region: arn.split(':').nth(3).unwrap_or_default().into(),
                    key_reference: arn,
                    role_arn: crate::aws_support::ROLE_ARN.into(),
                    make_primary: primary,
                    ..Default::default()
                })
                .await
                .map(drop)
        }
        Control::AtProvider { enable, .. } => {
            // A key keybroker holds has no provider side.
            let Some(arn) = aws else { return Ok(()) };
            // moto finds keys to disable and enable by id only.
            let arn = arn.rsplit('/').next().unwrap_or_default().to_owned();
            let moto = |e: String| tonic::Status::internal(format!("moto: {e}"));
            if enable {
                kms.enable_key()
                    .key_id(arn)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| moto(format!("{e:?}")))
            } else {
                kms.disable_key()
                    .key_id(arn)
                    .send()
                    .await
                    .map(drop)
                    .map_err(|e| moto(format!("{e:?}")))
            }
        }
        Control::SetPrimary { tenant, key } => admin
            .set_primary_key(proto::SetPrimaryKeyRequest {
                tenant_id: id(tenant),
                name: key.into(),
            })
            .await
            .map(drop),
        Control::Disable { tenant, key, to } => admin
            .disable_key(proto::DisableKeyRequest {
                tenant_id: id(tenant),
                name: key.into(),
                reason: "model".into(),
                reencrypt_to: match to {
                    None => String::new(),
                    Some(Target::Platform) => "platform".into(),
                    Some(Target::Key(k)) => k.into(),
                },
            })
            .await
            .map(drop),
        Control::Enable { tenant, key } => admin
            .enable_key(proto::EnableKeyRequest {
                tenant_id: id(tenant),
                name: key.into(),
            })
            .await
            .map(drop),
        Control::Unlink { tenant, key, force } => admin
            .unlink_key(proto::UnlinkKeyRequest {
                tenant_id: id(tenant),
                name: key.into(),
                force,
            })
            .await
            .map(drop),
        Control::Retire { tenant, undo } => admin
            .retire_key_versions(proto::RetireKeyVersionsRequest {
                tenant_id: id(tenant),
                target: proto::RetireTarget::TenantKey.into(),
                min_decryption_version: if undo { 0 } else { retire_min.max(1) },
                force: true,
                ..Default::default()
            })
            .await
            .map(drop),
        Control::Delete { tenant, now } => admin
            .delete_tenant(proto::DeleteTenantRequest {
                tenant_id: id(tenant),
                force: true,
                restore_window: Some(if now {
                    prost_types::Duration::default()
                } else {
                    Duration::from_secs(3600).try_into().unwrap()
                }),
            })
            .await
            .map(drop),
        Control::Cancel { tenant } => admin
            .cancel_tenant_deletion(proto::CancelTenantDeletionRequest {
                tenant_id: id(tenant),
            })
            .await
            .map(drop),
    }
}

/// Unwraps `deks` (a batch per tenant, in order); each item's outcome.
async fn unwrap_all(
    broker: proto::key_broker_client::KeyBrokerClient<tonic::transport::Channel>,
    deks: &[Dek],
) -> Vec<Result<Vec<u8>, tonic::Status>> {
    let mut out = Vec::with_capacity(deks.len());
    for chunk in deks.chunks(100) {
        let items: Vec<proto::UnwrapKeyRequest> = chunk
            .iter()
            .map(|d| crate::common::unwrap_req(TENANTS[d.tenant], &[("obj", "o")], &d.wrapped))
            .collect();
        let answer = patiently(|| {
            let mut broker = broker.clone();
            let items = items.clone();
            async move {
                broker
                    .batch_unwrap_key(proto::BatchUnwrapKeyRequest { items })
                    .await
            }
        })
        .await;
        match answer {
            Ok(r) => out.extend(r.into_inner().results.into_iter().map(|r| {
                match (r.response, r.status) {
                    (Some(u), _) => Ok(u.plaintext.to_vec()),
                    (None, Some(s)) => Err(tonic::Status::new(Code::from(s.code), s.message)),
                    (None, None) => Err(tonic::Status::internal("an empty batch item")),
                }
            })),
            Err(s) => out.extend(chunk.iter().map(|_| Err(s.clone()))),
        }
    }
    out
}

/// Whether an answer is what the model expects.
fn judge(dek: &Dek, want: Expect, got: &Result<Vec<u8>, tonic::Status>) -> Result<(), String> {
    match (want, got) {
        (_, Ok(p)) if *p != dek.plaintext => Err("unwrapped to other bytes".into()),
        (Expect::Read, Ok(_)) => Ok(()),
        (_, Err(s)) if matches!(s.code(), Code::Internal | Code::Unknown) => {
            Err(format!("answered {s:?}"))
        }
        (Expect::Refused, Err(s)) if s.code() == Code::FailedPrecondition => Ok(()),
        (Expect::Gone, Err(s)) if matches!(s.code(), Code::NotFound | Code::InvalidArgument) => {
            Ok(())
        }
        (want, got) => Err(format!(
            "expected {want:?}, got {:?}",
            got.as_ref().map(|_| "the plaintext")
        )),
    }
}

/// Runs cases: `cases` of them, or (soak) until `soak` has passed; what
/// ran, for the report.
fn run(cases: u32, soak: Option<Duration>) -> String {
    let started = Instant::now();
    let config = Config {
        cases,
        max_shrink_iters: 64,
        failure_persistence: None,
        ..Config::default()
    };
    loop {
        let mut runner = TestRunner::new(config.clone());
        let result = runner.run(
            &Reference::sequential_strategy(1..24),
            |(state, steps, seen)| {
                LifecycleTest::test_sequential(config.clone(), state, steps, seen);
                Ok(())
            },
        );
        if let Err(e) = result {
            panic!("the lifecycle model found a failing sequence:\n{e}");
        }
        match soak {
            Some(limit) if started.elapsed() < limit => continue,
            _ => break,
        }
    }
    let n = |a: &AtomicUsize| a.load(Ordering::Relaxed);
    format!(
        "lifecycle model: {} cases, {} steps in {:?}; control operations {} done, {} refused, {} at the provider; DEK checks: {} read, {} refused, {} gone",
        n(&CASES),
        n(&STEPS),
        started.elapsed(),
        n(&CONTROLS[0]),
        n(&CONTROLS[1]),
        n(&AT_PROVIDER),
        n(&CHECKED[0]),
        n(&CHECKED[1]),
        n(&CHECKED[2]),
    ) + &format!("\n  by kind (done, refused): {:?}", BY_KIND.lock().unwrap())
}

fn settings() -> (u32, Option<Duration>) {
    let soak = std::env::var("KEYBROKER_LIFECYCLE_SOAK")
        .ok()
        .and_then(|s| s.parse().ok())
        .map(Duration::from_secs);
    let cases = std::env::var("KEYBROKER_LIFECYCLE_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(4);
    (cases, soak)
}

/// One replica on SQLite, restarted and killed.
#[test]
fn lifecycle_model_sqlite() {
    let (cases, soak) = settings();
    BACKEND.with(|b| b.set(Backend::Sqlite));
    println!("{}", run(cases, soak));
}

/// Two replicas on a PostgreSQL server of the test's own, which it
/// restarts; their change feeds cut; each killed and restarted.
#[test]
fn lifecycle_model_postgres() {
    let (cases, soak) = settings();
    BACKEND.with(|b| b.set(Backend::Postgres));
    println!("{}", run(cases, soak));
}
