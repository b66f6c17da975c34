//! Process hardening at start: unwrapped keys live in this process's memory,
//! so it must not be written to a core file or be readable by a same-user
//! debugger. Disabled only by an explicit debug flag.

/// What [`harden`] left in force, checked by reading it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Hardening {
    /// `RLIMIT_CORE` soft and hard limits are 0.
    pub core_dumps_disabled: bool,
    /// `PR_GET_DUMPABLE` is 0: no core, no ptrace attach by the same user,
    /// `/proc/<pid>/mem` and `environ` owned by root.
    pub not_dumpable: bool,
}

/// Sets `RLIMIT_CORE=0` and `PR_SET_DUMPABLE=0`, then reads both back.
pub(crate) fn harden() -> std::io::Result<Hardening> {
    use rustix::process::{DumpableBehavior, Resource, Rlimit};
    rustix::process::setrlimit(
        Resource::Core,
        Rlimit {
            current: Some(0),
            maximum: Some(0),
        },
    )?;
    rustix::process::set_dumpable_behavior(DumpableBehavior::NotDumpable)?;
    Ok(current())
}

/// The process's current settings.
pub(crate) fn current() -> Hardening {
    use rustix::process::{DumpableBehavior, Resource};
    let core = rustix::process::getrlimit(Resource::Core);
    Hardening {
        core_dumps_disabled: core.current == Some(0) && core.maximum == Some(0),
        not_dumpable: matches!(
            rustix::process::dumpable_behavior(),
            Ok(DumpableBehavior::NotDumpable)
        ),
    }
}
