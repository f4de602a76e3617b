//! The Lua scripts (`lua/*.lua`) and how a store operation becomes one script call and
//! one reply becomes an outcome: the arguments' layout here must match what each
//! script reads from `KEYS` and `ARGV`.

use super::connection::error_reply_kind;
use crate::config::Algorithm;
use crate::keys::{slot, KeyMaker};
use crate::liveness::{MAX_DEAD_PASSED, MAX_PROXIES};
use crate::store::{CheckOp, CheckOutcome, ItemResult, Liveness, StoreError, StrictOp};
use meshlimit_core::gcra::SHARE_ONE;
use meshlimit_core::protocol::StrictAnswer;
use meshlimit_core::shares::ShareParams;
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

/// `lua/sync.lua`: the leading ARGV shared by all records (proxy, interval, the share
/// parameters, the number of dead proxies), then the dead ids, then these many per
/// record (key, window, max, admitted, hits, first span, mode).
const SYNC_FIXED_ARGS: usize = 10;
const SYNC_RECORD_ARGS: usize = 7;

/// `lua/sliding_window.lua` and `lua/token_bucket.lua` answer
/// `{allowed, tightest, remaining, reset_at, retry_after_ms}`.
const CHECK_REPLY_LEN: usize = 5;
/// `lua/sync.lua` answers `{grant, target, used}` per record.
const SYNC_REPLY_LEN: usize = 3;
/// `lua/strict.lua` answers `{allowed, tightest, remaining, reset_ms, retry_after_ms}`.
const STRICT_REPLY_LEN: usize = 5;

/// What `lua/sync.lua` does with one record.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum RecordMode {
    /// Count, then allocate the proxy's share.
    Allocate = 0,
    /// Count, then drop the proxy's peer (its share returns).
    Release = 1,
    /// Count only (reconciling what a fallback admitted).
    Count = 2,
}

/// One record (reported key and limit) of a `sync.lua` call.
#[derive(Clone, Debug)]
pub(super) struct RecordOp {
    pub key: String,
    pub window_secs: u64,
    pub max: u64,
    pub admitted: u64,
    pub hits: u64,
    pub first_span_ms: u64,
    pub mode: RecordMode,
}

/// One record's reply.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct RecordOutcome {
    pub grant: u32,
    pub target: u32,
    pub used: u64,
}

/// The scripts the store runs; every one is loaded on every node it talks to.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Script {
    SlidingWindow,
    TokenBucket,
    Sync,
    Liveness,
    Strict,
}

impl Script {
    pub(super) const ALL: [Script; 5] = [
        Script::SlidingWindow,
        Script::TokenBucket,
        Script::Sync,
        Script::Liveness,
        Script::Strict,
    ];

    fn source(self) -> &'static str {
        match self {
            Script::SlidingWindow => include_str!("../../../lua/sliding_window.lua"),
            Script::TokenBucket => include_str!("../../../lua/token_bucket.lua"),
            Script::Sync => include_str!("../../../lua/sync.lua"),
            Script::Liveness => include_str!("../../../lua/liveness.lua"),
            Script::Strict => include_str!("../../../lua/strict.lua"),
        }
    }

    /// SHA-1 of the source, the name `EVALSHA` runs it by.
    fn sha(self) -> &'static str {
        static SHAS: OnceLock<[String; 5]> = OnceLock::new();
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
    /// Sync records carried (their keys are in `args`); 0 for the other scripts.
    pub(super) entries: usize,
    /// Leading ARGV shared by every record of a sync call.
    common: usize,
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
            common: 0,
        }
    }

    /// One `sync.lua` call for `records` (all served by one node) of `proxy`'s report,
    /// `dead` the proxies whose peers go. The records' keys travel in ARGV (the script
    /// is flagged `allow-cross-slot-keys`); `KEYS[1]` is the first of them, which routes
    /// the call.
    pub(super) fn sync(
        proxy: &str,
        interval_ms: u64,
        dead: &[String],
        p: &ShareParams,
        records: &[&RecordOp],
    ) -> Call {
        let common = SYNC_FIXED_ARGS + dead.len();
        let mut args: Vec<Vec<u8>> = Vec::with_capacity(common + records.len() * SYNC_RECORD_ARGS);
        let num = |v: u64| v.to_string().into_bytes();
        args.push(proxy.as_bytes().to_vec());
        args.push(num(interval_ms));
        args.push(num(u64::from(p.margin_ppm)));
        args.push(num(u64::from(p.epsilon)));
        args.push(num(p.lease_ms));
        args.push(num(p.max_peers as u64));
        args.push(num(u64::from(p.smoothing.keep)));
        args.push(num(u64::from(p.smoothing.jump_sigmas)));
        args.push(num(u64::from(p.headroom_sigmas)));
        args.push(num(dead.len() as u64));
        args.extend(dead.iter().map(|d| d.as_bytes().to_vec()));
        for r in records {
            args.push(r.key.as_bytes().to_vec());
            args.push(num(r.window_secs));
            args.push(num(r.max));
            args.push(num(r.admitted));
            args.push(num(r.hits));
            args.push(num(r.first_span_ms));
            args.push(num(r.mode as u64));
        }
        Call {
            script: Script::Sync,
            keys: vec![records.first().map_or_else(String::new, |r| r.key.clone())],
            args,
            entries: records.len(),
            common,
        }
    }

    /// `lua/liveness.lua`: `proxy` reported (interval `interval_ms`); answers the live
    /// count and the recently dead.
    pub(super) fn liveness(registry: String, proxy: &str, interval_ms: u64, lease_ms: u64) -> Call {
        let num = |v: u64| v.to_string().into_bytes();
        Call {
            script: Script::Liveness,
            keys: vec![registry],
            args: vec![
                proxy.as_bytes().to_vec(),
                num(interval_ms),
                num(lease_ms),
                num(MAX_DEAD_PASSED as u64),
                num(MAX_PROXIES as u64),
            ],
            entries: 0,
            common: 0,
        }
    }

    /// `lua/strict.lua`: `hits`, then per limit its window, max and burst, one key per
    /// limit (the bucket's timestamp).
    pub(super) fn strict(keys: &KeyMaker, op: &StrictOp) -> Call {
        let mut args: Vec<Vec<u8>> = vec![op.hits.to_string().into_bytes()];
        let mut call_keys = Vec::with_capacity(op.limits.len());
        for l in &op.limits {
            call_keys.push(keys.tb_key(&op.tag, l.window_secs, l.max, l.burst));
            args.push(l.window_secs.to_string().into_bytes());
            args.push(l.max.to_string().into_bytes());
            args.push(l.burst.to_string().into_bytes());
        }
        Call {
            script: Script::Strict,
            keys: call_keys,
            args,
            entries: 0,
            common: 0,
        }
    }

    /// A multi-record sync call as one call per record (for the cluster client's retry
    /// path, which routes one slot per command).
    pub(super) fn split(&self) -> Vec<Call> {
        (0..self.entries)
            .map(|e| {
                let at = self.common + e * SYNC_RECORD_ARGS;
                let mut args = self.args[..self.common].to_vec();
                args.extend_from_slice(&self.args[at..at + SYNC_RECORD_ARGS]);
                Call {
                    script: self.script,
                    keys: vec![String::from_utf8_lossy(&self.args[at]).to_string()],
                    args,
                    entries: 1,
                    common: self.common,
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

/// One record of a sync script's reply.
pub(super) fn record_outcome(v: Value) -> ItemResult<RecordOutcome> {
    let r = ints(v)?;
    if r.len() != SYNC_REPLY_LEN {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    let share = |x: i64| x.clamp(0, i64::from(SHARE_ONE)) as u32;
    Ok(RecordOutcome {
        grant: share(r[0]),
        target: share(r[1]),
        used: r[2].max(0) as u64,
    })
}

/// The strict script's reply.
pub(super) fn strict_outcome(v: Value) -> ItemResult<StrictAnswer> {
    let r = ints(v)?;
    if r.len() != STRICT_REPLY_LEN {
        return Err(StoreError::Failed("script reply of wrong length".into()));
    }
    Ok(StrictAnswer {
        allowed: r[0] == 1,
        tightest: r[1].max(0) as usize,
        remaining: r[2].max(0) as u64,
        reset_ms: r[3].max(0) as u64,
        retry_after_ms: r[4].max(0) as u64,
    })
}

/// The liveness script's reply: `{live, dead ids...}`, or `{-1}` when the registry is
/// full.
pub(super) fn liveness_outcome(v: Value) -> Result<Liveness, StoreError> {
    let Value::Array(items) = v else {
        return Err(StoreError::Failed(format!(
            "unexpected liveness reply {v:?}"
        )));
    };
    let mut items = items.into_iter();
    let live = match items.next() {
        Some(Value::Int(n)) if n >= 1 => u32::try_from(n).unwrap_or(u32::MAX),
        Some(Value::Int(_)) => return Err(StoreError::Failed("liveness registry is full".into())),
        other => {
            return Err(StoreError::Failed(format!(
                "unexpected liveness count {other:?}"
            )))
        }
    };
    let dead = items
        .map(|d| match d {
            Value::BulkString(b) => Ok(String::from_utf8_lossy(&b).into_owned()),
            other => Err(StoreError::Failed(format!(
                "unexpected dead proxy id {other:?}"
            ))),
        })
        .collect::<Result<_, _>>()?;
    Ok(Liveness { live, dead })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(key: &str, admitted: u64) -> RecordOp {
        RecordOp {
            key: key.into(),
            window_secs: 60,
            max: 100,
            admitted,
            hits: admitted + 1,
            first_span_ms: 1000,
            mode: RecordMode::Allocate,
        }
    }

    #[test]
    fn a_sync_call_splits_into_one_call_per_record_with_the_shared_arguments() {
        let keys = KeyMaker::new("ml", b"k");
        let ks: Vec<String> = ["s.r.a", "s.r.b", "s.r.c"]
            .iter()
            .map(|t| keys.record_key(t, 60, 100, 100))
            .collect();
        let recs: Vec<RecordOp> = ks.iter().zip(1..).map(|(k, a)| record(k, a)).collect();
        let dead = vec!["gone-1".to_string(), "gone-2".to_string()];
        let p = ShareParams::default();
        let call = Call::sync("proxy-1", 1000, &dead, &p, &[&recs[2], &recs[0]]);
        assert_eq!((call.entries, call.keys.clone()), (2, vec![ks[2].clone()]));
        let common = SYNC_FIXED_ARGS + dead.len();
        assert_eq!(call.args.len(), common + 2 * SYNC_RECORD_ARGS);
        assert_eq!(call.args[SYNC_FIXED_ARGS - 1], b"2");
        assert_eq!(call.args[SYNC_FIXED_ARGS], b"gone-1");
        let parts = call.split();
        assert_eq!(parts.len(), 2);
        for (part, i) in parts.iter().zip([2, 0]) {
            assert_eq!(part.entries, 1);
            assert_eq!(part.keys, vec![ks[i].clone()]);
            assert_eq!(part.slot(), slot(&ks[i]));
            assert_eq!(part.args[..common], call.args[..common]);
            assert_eq!(part.args[common], ks[i].as_bytes());
            assert_eq!(
                part.args[common + 3],
                recs[i].admitted.to_string().as_bytes()
            );
        }
    }

    #[test]
    fn replies_of_the_wrong_shape_are_errors_not_outcomes() {
        let ok = Value::Array([1, 0, 4, 1_700_000_000, 0].map(Value::Int).to_vec());
        assert!(check_outcome(ok).unwrap().allowed);
        let short = Value::Array([1, 0, 4].map(Value::Int).to_vec());
        assert!(check_outcome(short).is_err());
        assert!(record_outcome(Value::Nil).is_err());
        let r =
            record_outcome(Value::Array([2_000_000_000, 5, 7].map(Value::Int).to_vec())).unwrap();
        assert_eq!(r.grant, SHARE_ONE, "a share is capped at the whole limit");
        assert_eq!((r.target, r.used), (5, 7));
        assert!(strict_outcome(Value::Array(vec![Value::Int(1)])).is_err());
        let full = Value::Array(vec![Value::Int(-1)]);
        assert!(liveness_outcome(full).is_err());
        let l = liveness_outcome(Value::Array(vec![
            Value::Int(3),
            Value::BulkString(b"p/1".to_vec()),
        ]))
        .unwrap();
        assert_eq!((l.live, l.dead), (3, vec!["p/1".to_string()]));
    }
}
