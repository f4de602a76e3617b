//! The Lua scripts (`lua/*.lua`) and how a store operation becomes one script call and
//! one reply becomes an outcome: the arguments' layout here must match what each
//! script reads from `KEYS` and `ARGV`.

use super::connection::error_reply_kind;
use crate::config::Algorithm;
use crate::keys::{slot, KeyMaker};
use crate::shares::ShareParams;
use crate::store::{CheckOp, CheckOutcome, ItemResult, StoreError, SyncOp, SyncOutcome};
use redis::aio::ConnectionLike;
use redis::{Cmd, ErrorKind, Pipeline, Value};
use std::sync::OnceLock;

/// Most sync entries per script call: bounds how long one call holds Redis' single
/// thread, which is how long a check arriving meanwhile on its own connection can wait.
/// Measured (`INFO commandstats` after 10 000-entry reports, release build, Redis 7.0,
/// this 2-core machine under other load): 32 entries per call took 0.48–0.56 ms a call
/// (15–18 µs an entry), 256 took 5.7–7.4 ms (22–29 µs an entry: larger calls are slower
/// per entry too). More calls cost no more round trips (one pipeline per node either way).
pub const SYNC_CHUNK: usize = 32;

/// `lua/sync.lua`: the leading ARGV shared by all entries (proxy, share TTL, floor,
/// peers, headroom), then these many per entry (key, window, max, admitted, rate).
const SYNC_COMMON_ARGS: usize = 5;
const SYNC_ENTRY_ARGS: usize = 5;

/// `lua/sliding_window.lua` and `lua/token_bucket.lua` answer
/// `{allowed, tightest, remaining, reset_at, retry_after_ms}`.
const CHECK_REPLY_LEN: usize = 5;
/// `lua/sync.lua` answers `{used, remaining, reset_at, weight (parts per billion)}` per
/// entry.
const SYNC_REPLY_LEN: usize = 4;

/// The scripts the store runs; every one is loaded on every node it talks to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Script {
    SlidingWindow,
    TokenBucket,
    Sync,
}

impl Script {
    pub(super) const ALL: [Script; 3] = [Script::SlidingWindow, Script::TokenBucket, Script::Sync];

    fn source(self) -> &'static str {
        match self {
            Script::SlidingWindow => include_str!("../../../lua/sliding_window.lua"),
            Script::TokenBucket => include_str!("../../../lua/token_bucket.lua"),
            Script::Sync => include_str!("../../../lua/sync.lua"),
        }
    }

    /// SHA-1 of the source, the name `EVALSHA` runs it by.
    fn sha(self) -> &'static str {
        static SHAS: OnceLock<[String; 3]> = OnceLock::new();
        let shas = SHAS.get_or_init(|| {
            Script::ALL.map(|s| redis::Script::new(s.source()).get_hash().to_string())
        });
        &shas[self as usize]
    }

    fn for_check(algo: Algorithm) -> Script {
        match algo {
            Algorithm::SlidingWindow => Script::SlidingWindow,
            Algorithm::TokenBucket => Script::TokenBucket,
        }
    }
}

/// `SCRIPT LOAD`s every script on `c` (one round trip).
pub(super) async fn load_all<C: ConnectionLike + Send>(c: &mut C) -> Result<(), StoreError> {
    let mut p = Pipeline::new();
    for s in Script::ALL {
        p.cmd("SCRIPT").arg("LOAD").arg(s.source());
    }
    let _: Vec<String> = p.query_async(c).await?;
    Ok(())
}

/// The node has not loaded our scripts (restarted, or its cache flushed).
pub(super) fn is_noscript(v: &Value) -> bool {
    error_reply_kind(v) == Some(ErrorKind::NoScriptError)
}

/// One script call, ready to be sent as `EVALSHA` (or `EVAL` on the retry path).
pub(super) struct Call {
    script: Script,
    keys: Vec<String>,
    args: Vec<Vec<u8>>,
    /// Sync entries carried (their keys are in `args`); 0 for the check scripts.
    pub(super) entries: usize,
}

impl Call {
    /// All limits of one check: `hits`, `force`, then per limit its window and max (and
    /// burst for the token bucket), one key per limit.
    pub(super) fn check(keys: &KeyMaker, algo: Algorithm, op: &CheckOp) -> Call {
        let mut args: Vec<Vec<u8>> = vec![
            op.hits.to_string().into_bytes(),
            if op.force {
                b"1".to_vec()
            } else {
                b"0".to_vec()
            },
        ];
        let mut call_keys = Vec::with_capacity(op.limits.len());
        for l in &op.limits {
            match algo {
                Algorithm::SlidingWindow => {
                    call_keys.push(keys.sw_key(&op.tag, l.window_secs));
                    args.push(l.window_secs.to_string().into_bytes());
                    args.push(l.max.to_string().into_bytes());
                }
                Algorithm::TokenBucket => {
                    call_keys.push(keys.tb_key(&op.tag, l.window_secs, l.max, l.burst));
                    args.push(l.window_secs.to_string().into_bytes());
                    args.push(l.max.to_string().into_bytes());
                    args.push(l.burst.to_string().into_bytes());
                }
            }
        }
        Call {
            script: Script::for_check(algo),
            keys: call_keys,
            args,
            entries: 0,
        }
    }

    /// One `sync.lua` call for `entries` (indices into `ops` and `keys`, all served by
    /// one node). The entries' keys travel in ARGV (the script is flagged
    /// `allow-cross-slot-keys`); `KEYS[1]` is the first of them, which routes the call.
    pub(super) fn sync(
        proxy: &str,
        entries: &[usize],
        ops: &[SyncOp],
        keys: &[String],
        p: &ShareParams,
    ) -> Call {
        let mut args: Vec<Vec<u8>> =
            Vec::with_capacity(SYNC_COMMON_ARGS + entries.len() * SYNC_ENTRY_ARGS);
        args.push(proxy.as_bytes().to_vec());
        args.push(p.ttl_ms.to_string().into_bytes());
        args.push(format!("{:.6}", p.floor).into_bytes());
        args.push(p.max_peers.to_string().into_bytes());
        args.push(format!("{:.6}", p.headroom).into_bytes());
        for &i in entries {
            let op = &ops[i];
            args.push(keys[i].as_bytes().to_vec());
            args.push(op.window_secs.to_string().into_bytes());
            args.push(op.max.to_string().into_bytes());
            args.push(op.admitted.to_string().into_bytes());
            args.push(format!("{:.6}", op.rate).into_bytes());
        }
        Call {
            script: Script::Sync,
            keys: vec![keys[entries[0]].clone()],
            args,
            entries: entries.len(),
        }
    }

    /// A multi-entry sync call as one call per entry (for the cluster client's retry
    /// path, which routes one slot per command).
    pub(super) fn split(&self) -> Vec<Call> {
        (0..self.entries)
            .map(|e| {
                let at = SYNC_COMMON_ARGS + e * SYNC_ENTRY_ARGS;
                let mut args = self.args[..SYNC_COMMON_ARGS].to_vec();
                args.extend_from_slice(&self.args[at..at + SYNC_ENTRY_ARGS]);
                Call {
                    script: self.script,
                    keys: vec![String::from_utf8_lossy(&self.args[at]).to_string()],
                    args,
                    entries: 1,
                }
            })
            .collect()
    }

    /// The cluster slot the call runs in (all its keys share one hash tag).
    pub(super) fn slot(&self) -> u16 {
        slot(&self.keys[0])
    }

    /// `EVALSHA` when the node is known to hold the scripts, else `EVAL` with the source.
    pub(super) fn cmd(&self, by_sha: bool) -> Cmd {
        let mut c = if by_sha {
            let mut c = redis::cmd("EVALSHA");
            c.arg(self.script.sha());
            c
        } else {
            let mut c = redis::cmd("EVAL");
            c.arg(self.script.source());
            c
        };
        c.arg(self.keys.len()).arg(&self.keys);
        for a in &self.args {
            c.arg(&a[..]);
        }
        c
    }
}

fn ints(v: Value) -> Result<Vec<i64>, StoreError> {
    match v {
        Value::Array(items) => items
            .into_iter()
            .map(|x| match x {
                Value::Int(i) => Ok(i),
                other => Err(StoreError::Failed(format!(
                    "unexpected script value {other:?}"
                ))),
            })
            .collect(),
        Value::ServerError(e) => Err(StoreError::Failed(format!("{e:?}"))),
        other => Err(StoreError::Failed(format!(
            "unexpected script reply {other:?}"
        ))),
    }
}

/// A check script's reply.
pub(super) fn check_outcome(v: Value) -> ItemResult<CheckOutcome> {
    let r = ints(v)?;
    if r.len() != CHECK_REPLY_LEN {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    Ok(CheckOutcome {
        allowed: r[0] == 1,
        tightest: r[1].max(0) as usize,
        remaining: r[2].max(0) as u64,
        reset_at: r[3].max(0) as u64,
        retry_after_ms: r[4].max(0) as u64,
    })
}

/// One entry of a sync script's reply.
pub(super) fn sync_outcome(v: Value) -> ItemResult<SyncOutcome> {
    let r = ints(v)?;
    if r.len() != SYNC_REPLY_LEN {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    Ok(SyncOutcome {
        used: r[0].max(0) as u64,
        remaining: r[1].max(0) as u64,
        reset_at: r[2].max(0) as u64,
        weight: (r[3].max(0) as f64 / 1e9).min(1.0),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn op(tag: &str, admitted: u64) -> SyncOp {
        SyncOp {
            tag: tag.into(),
            window_secs: 60,
            max: 100,
            admitted,
            rate: 2.5,
        }
    }

    #[test]
    fn a_sync_call_splits_into_one_call_per_entry_with_the_shared_arguments() {
        let keys = KeyMaker::new("ml", b"k");
        let ops = [op("s.r.a", 1), op("s.r.b", 2), op("s.r.c", 3)];
        let ks: Vec<String> = ops.iter().map(|o| keys.sw_key(&o.tag, 60)).collect();
        let p = ShareParams {
            ttl_ms: 3000,
            floor: 0.05,
            max_peers: 256,
            headroom: 0.0,
        };
        let call = Call::sync("proxy-1", &[2, 0], &ops, &ks, &p);
        assert_eq!((call.entries, call.keys.clone()), (2, vec![ks[2].clone()]));
        assert_eq!(call.args.len(), SYNC_COMMON_ARGS + 2 * SYNC_ENTRY_ARGS);
        let parts = call.split();
        assert_eq!(parts.len(), 2);
        for (part, i) in parts.iter().zip([2, 0]) {
            assert_eq!(part.entries, 1);
            assert_eq!(part.keys, vec![ks[i].clone()]);
            assert_eq!(part.slot(), slot(&ks[i]));
            assert_eq!(part.args[..SYNC_COMMON_ARGS], call.args[..SYNC_COMMON_ARGS]);
            assert_eq!(part.args[SYNC_COMMON_ARGS], ks[i].as_bytes());
            assert_eq!(
                part.args[SYNC_COMMON_ARGS + 3],
                ops[i].admitted.to_string().as_bytes()
            );
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors_not_outcomes() {
        let ok = Value::Array([1, 0, 4, 1_700_000_000, 0].map(Value::Int).to_vec());
        assert!(check_outcome(ok).unwrap().allowed);
        let short = Value::Array([1, 0, 4].map(Value::Int).to_vec());
        assert!(check_outcome(short).is_err());
        assert!(sync_outcome(Value::Nil).is_err());
        let w = sync_outcome(Value::Array(
            [5, 95, 0, 2_000_000_000].map(Value::Int).to_vec(),
        ));
        assert_eq!(
            w.unwrap().weight,
            1.0,
            "a weight is capped at the whole limit"
        );
    }
}
