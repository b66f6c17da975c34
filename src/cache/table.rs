//! The table under the DEK cache: sharded hash maps with time-to-live,
//! time-to-idle and a size bound (CLOCK, second chance), built for the hit
//! path. A hit is one read lock, one probe and at most one relaxed store;
//! moka spent more than that per hit on read recording (a channel push per
//! get, replayed into its LRU and frequency sketch), which at a cache hit
//! per RPC was a measurable share of the request.
//!
//! Expired entries are never served; their memory (and plaintext) is freed
//! by the next sweep of their shard: on inserts into it, and by
//! [`Table::sweep`] (the server runs it on a timer, the metrics scrape too).

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use super::{CacheKey, CachedKey};

/// Shards: enough that writers (misses, sweeps, purges) rarely block the
/// readers of other keys; a power of two so the shard is a mask.
const SHARDS: usize = 64;

/// Removals the table reports (for the eviction counter).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct Removed {
    /// Past their TTL or TTI.
    pub(super) expired: u64,
    /// Pushed out by the size bound.
    pub(super) evicted: u64,
}

impl Removed {
    pub(super) fn total(self) -> u64 {
        self.expired + self.evicted
    }
}

pub(super) struct Table {
    /// Each shard behind its own lock: a hit takes a read lock only.
    shards: Box<[RwLock<Shard>]>,
    /// Entries in all shards; the size bound is on this total, so unevenly
    /// filled shards do not evict early.
    len: AtomicU64,
    max_entries: u64,
    ttl_ms: u64,
    tti_ms: u64,
    /// A read refreshes an entry's last use only when it is this much
    /// older, so hot entries are not written on every hit (TTI is honoured
    /// to within this, 1/64 of it).
    touch_every_ms: u64,
    /// How often a shard sweeps its expired entries when written to.
    sweep_every_ms: u64,
    /// Time zero of the millisecond clock the entries keep.
    epoch: Instant,
}

struct Shard {
    map: HashMap<CacheKey, Slot, DigestHasher>,
    /// Insertion order for the clock hand: a key and the `seq` of the slot
    /// it was pushed for (stale once that slot is replaced or removed).
    ring: VecDeque<(CacheKey, u64)>,
    next_seq: u64,
    swept_ms: u64,
}

struct Slot {
    value: Arc<CachedKey>,
    seq: u64,
    born_ms: u64,
    /// Last use (ms since `epoch`); atomic so a reader under the read lock
    /// can refresh it.
    used_ms: AtomicU64,
    /// Read since the clock hand last passed: a second chance. Set only
    /// when clear, so a hot entry's line is not written on every hit.
    referenced: AtomicBool,
}

impl Table {
    pub(super) fn new(max_entries: u64, ttl: Duration, tti: Duration) -> Self {
        let ms = |d: Duration| u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1);
        let (ttl_ms, tti_ms) = (ms(ttl), ms(tti));
        let hasher = DigestHasher::random();
        Self {
            shards: (0..SHARDS)
                .map(|_| {
                    RwLock::new(Shard {
                        map: HashMap::with_hasher(hasher.clone()),
                        ring: VecDeque::new(),
                        next_seq: 0,
                        swept_ms: 0,
                    })
                })
                .collect(),
            len: AtomicU64::new(0),
            max_entries: max_entries.max(1),
            ttl_ms,
            tti_ms,
            touch_every_ms: (tti_ms / 64).max(1),
            sweep_every_ms: (ttl_ms.min(tti_ms) / 4).clamp(1, 10_000),
            epoch: Instant::now(),
        }
    }

    fn now_ms(&self) -> u64 {
        self.ms_at(Instant::now())
    }

    /// `at` on the table's clock: milliseconds since its epoch.
    fn ms_at(&self, at: Instant) -> u64 {
        u64::try_from(at.saturating_duration_since(self.epoch).as_millis()).unwrap_or(u64::MAX)
    }

    fn shard(&self, key: &CacheKey) -> &RwLock<Shard> {
        // Bits of the digest the map's hash does not use.
        &self.shards[usize::from(key.digest[31]) % SHARDS]
    }

    fn live(&self, slot: &Slot, now: u64) -> bool {
        now < slot.born_ms.saturating_add(self.ttl_ms)
            && now
                < slot
                    .used_ms
                    .load(Ordering::Relaxed)
                    .saturating_add(self.tti_ms)
    }

    /// The live value under `key` at `now`, its last use refreshed.
    pub(super) fn get(&self, key: &CacheKey, now: Instant) -> Option<Arc<CachedKey>> {
        let now = self.ms_at(now);
        let shard = self.shard(key).read().unwrap_or_else(|p| p.into_inner());
        let slot = shard.map.get(key)?;
        if !self.live(slot, now) {
            return None;
        }
        if now >= slot.used_ms.load(Ordering::Relaxed) + self.touch_every_ms {
            slot.used_ms.store(now, Ordering::Relaxed);
        }
        if !slot.referenced.load(Ordering::Relaxed) {
            slot.referenced.store(true, Ordering::Relaxed);
        }
        Some(Arc::clone(&slot.value))
    }

    /// Stores `value` under `key` (replacing what was there), then keeps
    /// the shard inside its bound. Returns what had to go.
    pub(super) fn insert(&self, key: CacheKey, value: Arc<CachedKey>) -> Removed {
        let now = self.now_ms();
        let mut removed = Removed::default();
        let mut shard = self.shard(&key).write().unwrap_or_else(|p| p.into_inner());
        if now >= shard.swept_ms + self.sweep_every_ms {
            removed.expired += self.sweep_shard(&mut shard, now);
        }
        let seq = shard.next_seq;
        shard.next_seq += 1;
        shard.ring.push_back((key.clone(), seq));
        let slot = Slot {
            value,
            seq,
            born_ms: now,
            used_ms: AtomicU64::new(now),
            referenced: AtomicBool::new(false),
        };
        match shard.map.insert(key, slot) {
            Some(old) if !self.live(&old, now) => removed.expired += 1,
            Some(_) => {}
            None => {
                self.len.fetch_add(1, Ordering::Relaxed);
            }
        }
        // Evicts from the shard at hand: keys spread evenly over shards, so
        // does eviction. It holds the new entry at least, so it can always
        // give one up (the new one last: it was pushed last).
        while self.len.load(Ordering::Relaxed) > self.max_entries {
            match self.advance_hand(&mut shard, now) {
                Some(true) => removed.expired += 1,
                Some(false) => removed.evicted += 1,
                None => break,
            }
        }
        compact_ring(&mut shard);
        removed
    }

    /// Moves the clock hand until one entry is removed: Some(true) if it
    /// had expired, Some(false) if evicted for size. An entry used since
    /// the hand last passed gets a second chance.
    fn advance_hand(&self, shard: &mut Shard, now: u64) -> Option<bool> {
        // Bounded: every live entry is passed at most twice (its second
        // chance is used up the first time).
        for _ in 0..2 * shard.ring.len() + 1 {
            let (key, seq) = shard.ring.pop_front()?;
            let Some(slot) = shard.map.get_mut(&key) else {
                continue;
            };
            if slot.seq != seq {
                continue;
            }
            if !self.live(slot, now) {
                shard.map.remove(&key);
                self.len.fetch_sub(1, Ordering::Relaxed);
                return Some(true);
            }
            if std::mem::take(slot.referenced.get_mut()) {
                shard.ring.push_back((key, seq));
                continue;
            }
            shard.map.remove(&key);
            self.len.fetch_sub(1, Ordering::Relaxed);
            return Some(false);
        }
        None
    }

    /// Drops the expired entries of one shard; returns how many.
    fn sweep_shard(&self, shard: &mut Shard, now: u64) -> u64 {
        let before = shard.map.len();
        shard.map.retain(|_, slot| self.live(slot, now));
        shard.swept_ms = now;
        compact_ring(shard);
        let removed = (before - shard.map.len()) as u64;
        self.len.fetch_sub(removed, Ordering::Relaxed);
        removed
    }

    /// Drops every expired entry now; returns how many.
    pub(super) fn sweep(&self) -> u64 {
        let now = self.now_ms();
        self.shards
            .iter()
            .map(|shard| {
                let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
                self.sweep_shard(&mut shard, now)
            })
            .sum()
    }

    /// Drops every entry `purge` selects, at once.
    pub(super) fn purge(&self, purge: impl Fn(&CacheKey, &CachedKey) -> bool) {
        for shard in &self.shards {
            let mut shard = shard.write().unwrap_or_else(|p| p.into_inner());
            let before = shard.map.len();
            shard.map.retain(|key, slot| !purge(key, &slot.value));
            self.len
                .fetch_sub((before - shard.map.len()) as u64, Ordering::Relaxed);
            compact_ring(&mut shard);
        }
    }

    /// Entries held, expired ones not yet swept included.
    pub(super) fn len(&self) -> u64 {
        self.len.load(Ordering::Relaxed)
    }

    /// The seed-mixed hash the maps use (exposed for the hash test).
    #[cfg(test)]
    fn hash_of(&self, key: &CacheKey) -> u64 {
        let shard = self.shards[0].read().unwrap_or_else(|p| p.into_inner());
        shard.map.hasher().hash_one(key)
    }
}

/// Drops ring positions of removed or replaced entries once they outnumber
/// the live ones, so purges and replacements cannot grow the ring.
fn compact_ring(shard: &mut Shard) {
    if shard.ring.len() <= 2 * shard.map.len() + 64 {
        return;
    }
    let map = &shard.map;
    shard
        .ring
        .retain(|(key, seq)| map.get(key).is_some_and(|slot| slot.seq == *seq));
}

/// Hashes a [`CacheKey`] from its digest (already a cryptographic hash)
/// mixed with a per-process random seed, so which keys share a bucket
/// cannot be chosen by whoever picks the wrapped bytes. Eight bytes and a
/// multiply instead of SipHash over 40 bytes.
#[derive(Clone)]
pub(super) struct DigestHasher {
    seed: u64,
}

impl DigestHasher {
    pub(super) fn random() -> Self {
        Self {
            seed: std::hash::RandomState::new().hash_one(0x6b65_7962_726f_6b65_u64) | 1,
        }
    }
}

impl BuildHasher for DigestHasher {
    type Hasher = SeededHasher;
    fn build_hasher(&self) -> SeededHasher {
        SeededHasher {
            seed: self.seed,
            state: 0,
        }
    }
}

pub(super) struct SeededHasher {
    seed: u64,
    state: u64,
}

impl Hasher for SeededHasher {
    fn write(&mut self, bytes: &[u8]) {
        // Only reached through a derived Hash; CacheKey writes a u64.
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }

    fn write_u64(&mut self, word: u64) {
        // A folded 128-bit multiply (as foldhash and wyhash do): every bit
        // of the result depends on every bit of the word and of the seed.
        let product = u128::from(self.state ^ word ^ self.seed)
            * u128::from(self.seed.rotate_left(29) ^ 0x9e37_79b9_7f4a_7c15);
        self.state = (product as u64) ^ ((product >> 64) as u64);
    }

    fn finish(&self) -> u64 {
        self.state
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::KeyOrigin;
    use crate::context::Context;
    use crate::kms::ProviderKind;
    use crate::secret::SecretBytes;

    fn value(n: u8) -> Arc<CachedKey> {
        let origin = Arc::new(KeyOrigin {
            link_id: 0,
            key_binding: "b".into(),
            provider: ProviderKind::Local,
            key_version: "1".into(),
            tenant_key_version: 0,
        });
        CachedKey::new(
            &SecretBytes::new(vec![n; 32]),
            origin,
            super::super::Freshness::default(),
        )
    }

    fn key(n: u32) -> CacheKey {
        CacheKey::new("t", &n.to_be_bytes(), &Context::default())
    }

    const HOUR: Duration = Duration::from_secs(3600);

    impl Table {
        /// The total counted the slow way, to check `len`.
        fn entries_in_shards(&self) -> u64 {
            self.shards
                .iter()
                .map(|s| s.read().unwrap().map.len() as u64)
                .sum()
        }
    }

    #[test]
    fn the_size_bound_holds_and_recently_used_entries_stay() {
        let table = Table::new(100, HOUR, HOUR);
        for n in 0..100 {
            table.insert(key(n), value(1));
        }
        // Exactly the bound, however unevenly the keys fell on shards.
        assert_eq!(table.len(), 100);
        assert_eq!(table.entries_in_shards(), 100);
        for n in 100..3000 {
            table.insert(key(n), value(1));
            // One key read after every insert: always used since the hand
            // last passed, so it must survive every eviction.
            assert!(
                table.get(&key(0), Instant::now()).is_some(),
                "key 0 evicted at insert {n}"
            );
            assert_eq!(table.len(), 100, "at insert {n}");
        }
        assert_eq!(table.entries_in_shards(), 100);
    }

    #[test]
    fn evictions_are_counted_and_the_ring_stays_bounded() {
        let table = Table::new(SHARDS as u64, HOUR, HOUR);
        let evicted: u64 = (0..10_000)
            .map(|n| table.insert(key(n), value(1)).evicted)
            .sum();
        assert_eq!(evicted, 10_000 - table.len());
        for shard in table.shards.iter() {
            let shard = shard.read().unwrap();
            assert!(shard.ring.len() <= 2 * shard.map.len() + 64 + 1);
        }
        // Replacing one key over and over keeps one entry and a short ring.
        for _ in 0..10_000 {
            table.insert(key(7), value(2));
        }
        let shard = table.shard(&key(7)).read().unwrap();
        assert!(shard.ring.len() <= 2 * shard.map.len() + 64 + 1);
    }

    #[test]
    fn ttl_and_tti_hide_entries_and_sweeps_free_them() {
        let table = Table::new(1000, Duration::from_millis(300), Duration::from_millis(100));
        table.insert(key(1), value(1));
        table.insert(key(2), value(2));
        // Key 1 used every 40 ms stays past its TTI, never past its TTL.
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(40));
            assert!(table.get(&key(1), Instant::now()).is_some());
        }
        assert!(
            table.get(&key(2), Instant::now()).is_none(),
            "idle past the TTI"
        );
        std::thread::sleep(Duration::from_millis(200));
        assert!(table.get(&key(1), Instant::now()).is_none(), "past the TTL");
        assert_eq!(table.len(), 2, "hidden, not yet freed");
        assert_eq!(table.sweep(), 2);
        assert_eq!(table.len(), 0);
        assert_eq!(table.entries_in_shards(), 0);
    }

    #[test]
    fn purge_removes_what_it_selects_only() {
        let table = Table::new(1000, HOUR, HOUR);
        for n in 0..100 {
            table.insert(key(n), value(u8::try_from(n % 2).unwrap()));
        }
        table.purge(|_, v| v.plaintext()[0] == 1);
        assert_eq!(table.len(), 50);
        assert_eq!(table.entries_in_shards(), 50);
        assert!(table.get(&key(0), Instant::now()).is_some());
        assert!(table.get(&key(1), Instant::now()).is_none());
    }

    #[test]
    fn the_bucket_hash_depends_on_the_seed() {
        let (a, b) = (Table::new(10, HOUR, HOUR), Table::new(10, HOUR, HOUR));
        let k = key(1);
        assert_eq!(a.hash_of(&k), a.hash_of(&k));
        assert_ne!(a.hash_of(&k), b.hash_of(&k));
    }
}
