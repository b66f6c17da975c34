//! The reference model: what every DEK must do after each step.
//!
//! Operations are generated from a coarse reference state (which tenants
//! and key names exist, as far as generation needs); the precise model
//! lives beside the system under test and learns what only the system can
//! say (a DEK's bytes, the tenant key version that sealed it) from its
//! answers. From them it says, per acknowledged DEK: must unwrap to its
//! plaintext, must be refused (FAILED_PRECONDITION: a key disabled, a
//! version retired, a deletion scheduled), or must be gone for good
//! (NOT_FOUND: its tenant's life deleted, what protected it unlinked).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use proptest::prelude::*;

/// The tenant ids the test uses: few, so deletions meet re-creations.
pub(super) const TENANTS: [&str; 3] = ["t0", "t1", "t2"];
const KEYS: [&str; 4] = ["ka", "kb", "kc", "kd"];

/// One step: a control-plane operation and data-plane calls running
/// concurrently with it.
#[derive(Clone)]
pub(super) struct Step {
    pub(super) control: Control,
    pub(super) data: Vec<Data>,
    /// The replica the control operation (or a restart, a kill) goes to;
    /// data call `i` goes to the next `i`-th one.
    pub(super) replica: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub(super) enum Target {
    Platform,
    Key(&'static str),
}

#[derive(Clone, Debug)]
pub(super) enum Control {
    Nothing,
    Create {
        tenant: usize,
        direct: bool,
    },
    Import {
        tenant: usize,
        key: &'static str,
        primary: bool,
    },
    /// LinkKey of a new AWS key (in moto), through the tenant's role.
    Link {
        tenant: usize,
        key: &'static str,
        primary: bool,
    },
    /// The customer disables (or enables) the AWS key at the provider;
    /// nothing for a key keybroker holds.
    AtProvider {
        tenant: usize,
        key: &'static str,
        enable: bool,
    },
    SetPrimary {
        tenant: usize,
        key: &'static str,
    },
    Disable {
        tenant: usize,
        key: &'static str,
        to: Option<Target>,
    },
    Enable {
        tenant: usize,
        key: &'static str,
    },
    Unlink {
        tenant: usize,
        key: &'static str,
        force: bool,
    },
    /// Retire every tenant key version but the newest (or undo).
    Retire {
        tenant: usize,
        undo: bool,
    },
    Delete {
        tenant: usize,
        now: bool,
    },
    Cancel {
        tenant: usize,
    },
    RotateKeyring,
    Restart,
    /// PostgreSQL restarted under the replicas (SQLite: nothing).
    RestartRegistry,
    /// Every replica's LISTEN connection cut (SQLite: nothing).
    DropFeeds,
    /// The operation, with the replica SIGKILLed while it runs.
    Killed(Box<Control>),
    Export,
}

#[derive(Clone, Debug)]
pub(super) enum Data {
    Generate { tenant: usize, batch: u8 },
    Unwrap { tenant: usize, pick: u16 },
    Rewrap { tenant: usize, pick: u16 },
}

impl fmt::Debug for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "@{} {:?}", self.replica, self.control)?;
        if !self.data.is_empty() {
            write!(f, " ‖ {:?}", self.data)?;
        }
        Ok(())
    }
}

/// What generation knows: which key names each tenant may have.
#[derive(Clone, Debug, Default)]
pub(super) struct RefState {
    pub(super) keys: [BTreeSet<&'static str>; 3],
    /// Names LinkKey was asked for (AWS keys, if it succeeded).
    pub(super) linked: [BTreeSet<&'static str>; 3],
}

pub(super) fn transitions(state: &RefState) -> BoxedStrategy<Step> {
    let tenant = 0..TENANTS.len();
    let key = prop::sample::select(KEYS.to_vec());
    let known = |t: usize| state.keys[t].iter().copied().collect::<Vec<_>>();
    let any_known: Vec<(usize, &'static str)> = (0..TENANTS.len())
        .flat_map(|t| known(t).into_iter().map(move |k| (t, k)))
        .collect();
    let any_linked: Vec<(usize, &'static str)> = (0..TENANTS.len())
        .flat_map(|t| state.linked[t].iter().map(move |k| (t, *k)))
        .collect();
    let data = prop::collection::vec(
        prop_oneof![
            3 => (tenant.clone(), 1u8..4).prop_map(|(tenant, batch)| Data::Generate { tenant, batch }),
            2 => (tenant.clone(), any::<u16>()).prop_map(|(tenant, pick)| Data::Unwrap { tenant, pick }),
            1 => (tenant.clone(), any::<u16>()).prop_map(|(tenant, pick)| Data::Rewrap { tenant, pick }),
        ],
        0..6,
    );
    let mut controls: Vec<(u32, BoxedStrategy<Control>)> = vec![
        (2, Just(Control::Nothing).boxed()),
        (
            2,
            (tenant.clone(), any::<bool>())
                .prop_map(|(tenant, direct)| Control::Create { tenant, direct })
                .boxed(),
        ),
        (
            3,
            (tenant.clone(), key.clone(), any::<bool>())
                .prop_map(|(tenant, key, primary)| Control::Import {
                    tenant,
                    key,
                    primary,
                })
                .boxed(),
        ),
        (
            3,
            (tenant.clone(), key, any::<bool>())
                .prop_map(|(tenant, key, primary)| Control::Link {
                    tenant,
                    key,
                    primary,
                })
                .boxed(),
        ),
        (
            1,
            (tenant.clone(), any::<bool>())
                .prop_map(|(tenant, undo)| Control::Retire { tenant, undo })
                .boxed(),
        ),
        (
            2,
            (tenant.clone(), any::<bool>())
                .prop_map(|(tenant, now)| Control::Delete { tenant, now })
                .boxed(),
        ),
        (
            1,
            tenant
                .clone()
                .prop_map(|tenant| Control::Cancel { tenant })
                .boxed(),
        ),
        (1, Just(Control::RotateKeyring).boxed()),
        (1, Just(Control::Restart).boxed()),
        (1, Just(Control::Export).boxed()),
        (1, Just(Control::RestartRegistry).boxed()),
        (1, Just(Control::DropFeeds).boxed()),
    ];
    if !any_known.is_empty() {
        let pick = prop::sample::select(any_known);
        let targets = {
            let mut t = vec![Target::Platform];
            t.extend(KEYS.iter().map(|k| Target::Key(k)));
            prop::sample::select(t)
        };
        controls.extend([
            (
                3,
                pick.clone()
                    .prop_map(|(tenant, key)| Control::SetPrimary { tenant, key })
                    .boxed(),
            ),
            (
                3,
                (pick.clone(), prop::option::weighted(0.7, targets))
                    .prop_map(|((tenant, key), to)| Control::Disable { tenant, key, to })
                    .boxed(),
            ),
            (
                2,
                pick.clone()
                    .prop_map(|(tenant, key)| Control::Enable { tenant, key })
                    .boxed(),
            ),
            (
                2,
                (pick.clone(), any::<bool>())
                    .prop_map(|((tenant, key), force)| Control::Unlink { tenant, key, force })
                    .boxed(),
            ),
        ]);
    }
    if !any_linked.is_empty() {
        controls.push((
            4,
            (prop::sample::select(any_linked), any::<bool>())
                .prop_map(|((tenant, key), enable)| Control::AtProvider {
                    tenant,
                    key,
                    enable,
                })
                .boxed(),
        ));
    }
    let plain = prop::strategy::Union::new_weighted(controls).boxed();
    let control = prop_oneof![
        9 => plain.clone(),
        1 => plain.prop_map(|c| match c {
            Control::Nothing
            | Control::Restart
            | Control::Export
            | Control::RestartRegistry
            | Control::DropFeeds
            | Control::AtProvider { .. }
            | Control::Killed(_) => Control::Restart,
            c => Control::Killed(Box::new(c)),
        }),
    ];
    (control, data, 0u8..2)
        .prop_map(|(control, data, replica)| Step {
            control,
            data,
            replica,
        })
        .boxed()
}

/// Generation's view after a step (outcomes unknown: a superset).
pub(super) fn apply_ref(mut state: RefState, step: &Step) -> RefState {
    let mut control = &step.control;
    if let Control::Killed(inner) = control {
        control = inner;
    }
    match control {
        Control::Import { tenant, key, .. } => {
            state.keys[*tenant].insert(key);
        }
        Control::Link { tenant, key, .. } => {
            state.keys[*tenant].insert(key);
            state.linked[*tenant].insert(key);
        }
        Control::Delete { tenant, now: true } => {
            state.keys[*tenant].clear();
            state.linked[*tenant].clear();
        }
        _ => {}
    }
    state
}

/// Shrinking keeps a step only where its key is still one generation knows.
pub(super) fn precondition(state: &RefState, step: &Step) -> bool {
    let mut control = &step.control;
    if let Control::Killed(inner) = control {
        control = inner;
    }
    match control {
        Control::SetPrimary { tenant, key }
        | Control::Disable { tenant, key, .. }
        | Control::Enable { tenant, key }
        | Control::Unlink { tenant, key, .. } => state.keys[*tenant].contains(key),
        Control::AtProvider { tenant, key, .. } => state.linked[*tenant].contains(key),
        _ => true,
    }
}

/// An acknowledged DEK.
#[derive(Clone, Debug)]
pub(super) struct Dek {
    pub(super) tenant: usize,
    pub(super) incarnation: u64,
    pub(super) wrapped: Vec<u8>,
    pub(super) plaintext: Vec<u8>,
    pub(super) sealed: Option<u32>,
    /// Format 3: the key that wrapped it directly, and which link of
    /// that name (`None` until the step that made it is applied).
    pub(super) direct: Option<(String, Option<u64>)>,
}

#[derive(Clone, Debug, Default)]
pub(super) struct Key {
    /// Disabled by an operator (DisableKey).
    pub(super) disabled: bool,
    /// An AWS key (its ARN), and whether the customer disabled it there.
    pub(super) aws: Option<String>,
    pub(super) revoked: bool,
    pub(super) primary: bool,
    /// Which link of the name: a key unlinked and imported again under it
    /// is another key.
    pub(super) link: u64,
}

/// One tenant id as the model knows it.
#[derive(Clone, Debug, Default)]
pub(super) struct Tenant {
    /// Its current life (0: none, nothing registered).
    pub(super) incarnation: u64,
    /// Lives destroyed: nothing issued in them ever unwraps again.
    pub(super) deleted: BTreeSet<u64>,
    pub(super) direct: bool,
    pub(super) scheduled: bool,
    pub(super) keys: BTreeMap<String, Key>,
    /// Tenant key versions by (life, number), and the key that wraps each
    /// (`platform` for the platform key); `None`: destroyed with an
    /// unlinked key.
    pub(super) versions: BTreeMap<(u64, u32), Option<String>>,
    pub(super) min_version: u32,
    /// Every life the model saw (in a wrapped key or GetTenant).
    pub(super) seen: BTreeSet<u64>,
    /// The link the next imported key gets.
    pub(super) next_link: u64,
    /// A deletion was acknowledged this step: which life it destroyed is
    /// settled once GetTenant says which one is current.
    pub(super) deletion: bool,
}

/// What a DEK must do now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Expect {
    Read,
    /// FAILED_PRECONDITION: refused until someone acts (enable, un-retire,
    /// cancel the deletion).
    Refused,
    /// NOT_FOUND (or INVALID_ARGUMENT for a name linked again): destroyed.
    Gone,
}

impl Tenant {
    /// Whether an AWS key (in moto) protects `dek`: what it does then also
    /// depends on that key's state at the provider, which the customer may
    /// change after an export was taken.
    pub(super) fn at_provider(&self, dek: &Dek) -> bool {
        let name = match (dek.sealed, &dek.direct) {
            (Some(v), _) => self.versions.get(&(dek.incarnation, v)).cloned().flatten(),
            (None, Some((name, _))) => Some(name.clone()),
            (None, None) => None,
        };
        name.and_then(|n| self.keys.get(&n))
            .is_some_and(|k| k.aws.is_some())
    }

    pub(super) fn expect(&self, dek: &Dek) -> Expect {
        if dek.incarnation != 0 && self.deleted.contains(&dek.incarnation) {
            return Expect::Gone;
        }
        if self.scheduled {
            return Expect::Refused;
        }
        if dek.incarnation != self.incarnation {
            return Expect::Gone;
        }
        if let Some(v) = dek.sealed {
            if v < self.min_version {
                return Expect::Refused;
            }
            return match self.versions.get(&(dek.incarnation, v)) {
                Some(Some(b)) if b == "platform" => Expect::Read,
                Some(Some(b)) => match self.keys.get(b) {
                    Some(k) if k.disabled || k.revoked => Expect::Refused,
                    Some(_) => Expect::Read,
                    None => Expect::Gone,
                },
                _ => Expect::Gone,
            };
        }
        let key = dek.direct.as_ref().and_then(|(name, link)| {
            self.keys
                .get(name)
                .filter(|k| link.is_none_or(|l| l == k.link))
        });
        match key {
            Some(k) if k.disabled || k.revoked => Expect::Refused,
            Some(_) => Expect::Read,
            None => Expect::Gone,
        }
    }

    /// A key change to `target` finished: every version of the current
    /// life is under it.
    pub(super) fn changed_to(&mut self, target: &str) {
        let life = self.life();
        for ((i, _), binding) in self.versions.iter_mut() {
            if let Some(b) = binding.as_mut().filter(|_| *i == life) {
                *b = target.to_owned();
            }
        }
    }

    /// The life control operations act on: the current one, or one a data
    /// call of this step began (a first wrap registers the tenant).
    pub(super) fn life(&self) -> u64 {
        self.seen
            .iter()
            .next_back()
            .copied()
            .unwrap_or(0)
            .max(self.incarnation)
    }

    /// The current life's versions, by number.
    pub(super) fn current_versions(&self) -> BTreeMap<u32, Option<String>> {
        let life = self.life();
        self.versions
            .iter()
            .filter(|((i, _), _)| *i == life)
            .map(|((_, v), b)| (*v, b.clone()))
            .collect()
    }

    /// A new link of key `name`.
    pub(super) fn linked(&mut self, name: &str) -> &mut Key {
        self.next_link += 1;
        let link = self.next_link;
        self.keys.insert(
            name.to_owned(),
            Key {
                link,
                ..Key::default()
            },
        );
        self.keys.get_mut(name).unwrap_or_else(|| unreachable!())
    }

    /// Direct DEKs learned this step: the link of the name now (0: none,
    /// unlinked in the same step).
    pub(super) fn pin_links(&mut self, deks: &mut [Dek]) {
        for dek in deks {
            if let Some((name, link @ None)) = dek.direct.as_mut() {
                *link = Some(self.keys.get(name.as_str()).map_or(0, |k| k.link));
            }
        }
    }

    pub(super) fn primary(&self) -> Option<&str> {
        self.keys
            .iter()
            .find(|(_, k)| k.primary)
            .map(|(n, _)| n.as_str())
    }

    /// A deletion destroyed the life it ran in: its keys and settings go
    /// now; which life that was is settled by [`settle`](Self::settle).
    pub(super) fn destroyed(&mut self) {
        self.keys.clear();
        self.scheduled = false;
        self.direct = false;
        self.min_version = 0;
        self.deletion = true;
    }

    /// The current life is `current` (0: none): after a deletion every
    /// other life seen is dead, and nothing of a dead life stays.
    pub(super) fn settle(&mut self, current: u64) {
        if self.deletion {
            self.deletion = false;
            let dead: Vec<u64> = self
                .seen
                .iter()
                .copied()
                .filter(|i| *i != current)
                .collect();
            self.deleted.extend(dead);
        }
        if current != 0 {
            self.seen.insert(current);
        }
        self.incarnation = current;
        let deleted = &self.deleted;
        self.versions.retain(|(i, _), _| !deleted.contains(i));
    }
}
