//! Noticing that files on disk changed (keyring, TLS material, policy):
//! cheap metadata polling that also sees Kubernetes' atomic symlink swaps.

use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

/// Calls `tick` every `interval` (the first time after one interval) while
/// `target` is alive: the background loop of every reloader and sweeper.
pub(crate) fn every<T: Send + Sync + 'static>(
    interval: Duration,
    target: &Arc<T>,
    tick: impl Fn(&T) + Send + 'static,
) -> impl Future<Output = ()> + Send + 'static {
    let target = Arc::downgrade(target);
    async move {
        let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + interval, interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            ticks.tick().await;
            let Some(target) = target.upgrade() else {
                return;
            };
            tick(&target);
        }
    }
}

/// What one file looked like: a change to any field means "reload".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stamp {
    modified: SystemTime,
    len: u64,
    inode: u64,
}

impl Stamp {
    /// Follows symlinks, so a mounted Secret's `..data` swap changes the inode.
    pub(crate) fn of(path: &Path) -> std::io::Result<Self> {
        let meta = std::fs::metadata(path)?;
        Ok(Self {
            modified: meta.modified()?,
            len: meta.len(),
            inode: meta.ino(),
        })
    }
}

/// The stamps of several files; an unreadable file is part of the state, so
/// it coming back counts as a change too.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct FileStamp(Vec<Option<Stamp>>);

impl FileStamp {
    pub(crate) fn of<P: AsRef<Path>>(paths: &[P]) -> Self {
        Self(paths.iter().map(|p| Stamp::of(p.as_ref()).ok()).collect())
    }
}
