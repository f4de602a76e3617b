//! The retry path: calls the slot map could not place, or that came back redirected
//! (`MOVED`, `ASK`), refused while the cluster changes (`TRYAGAIN`, `CLUSTERDOWN`,
//! `MASTERDOWN`, `READONLY`, `LOADING`), unknown to a node (`NOSCRIPT`) or from a broken
//! connection, go one by one through the `redis` crate's cluster client, which follows
//! the cluster by itself. `EVAL` (not `EVALSHA`) there, so a node without our scripts (a
//! promoted replica that was restarted, a new master) needs no extra step.

use super::super::connection::error_reply_kind;
use super::super::scripts::Call;
use crate::store::{ItemResult, StoreError};
use futures::future::join_all;
use redis::cluster_async::ClusterConnection;
use redis::{ErrorKind, RedisResult, Value};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Attempts after the first for a call refused while its slot migrates, the pause
/// growing by this step each time (5, 10, ... 40 ms: about 180 ms in all). Moving one
/// slot takes milliseconds; the request deadline bounds all of it anyway.
const MIGRATION_RETRIES: u32 = 8;
const MIGRATION_BACKOFF_STEP: Duration = Duration::from_millis(5);

/// Whether an item's reply means "ask the cluster client, which follows the cluster"
/// (the error replies listed in the module comment).
pub(super) fn needs_cluster_client(v: &Value) -> bool {
    matches!(
        error_reply_kind(v),
        Some(
            ErrorKind::Moved
                | ErrorKind::Ask
                | ErrorKind::TryAgain
                | ErrorKind::ClusterDown
                | ErrorKind::NoScriptError
                | ErrorKind::MasterDown
                | ErrorKind::ReadOnly
                | ErrorKind::BusyLoadingError
        )
    )
}

/// A call's outcome that means its slot is moving: worth sending again shortly.
fn is_migrating(r: &RedisResult<Value>) -> bool {
    match r {
        Ok(v) => needs_cluster_client(v),
        Err(e) => match e.kind() {
            ErrorKind::TryAgain | ErrorKind::Ask | ErrorKind::Moved => true,
            // While a slot migrates, a script sent to the importing node after ASK is
            // refused as touching a "non local key" (Redis 7.0 checks the script's own
            // accesses without the ASKING flag). Redis gives that refusal no error code
            // of its own (a plain `ERR`), so its detail is all there is to go by.
            ErrorKind::ResponseError => e.detail().is_some_and(|d| d.contains("non local key")),
            _ => false,
        },
    }
}

/// One call through the cluster client. A multi-entry sync call is split into one call
/// per entry (the client routes one slot per command); the replies are put back together
/// as one array, with `Nil` for an entry that still failed.
pub(super) async fn through_cluster_client(
    conn: ClusterConnection,
    call: &Call,
    round_trips: &AtomicU64,
) -> ItemResult<Value> {
    if call.entries <= 1 {
        return one(conn, call, round_trips).await;
    }
    let parts = call.split();
    let results = join_all(parts.iter().map(|c| one(conn.clone(), c, round_trips))).await;
    if results.iter().all(|r| r.is_err()) {
        if let Some(Err(e)) = results.into_iter().next() {
            return Err(e);
        }
        return Err(StoreError::Failed("empty sync call".into()));
    }
    Ok(Value::Array(
        results
            .into_iter()
            .map(|r| match r {
                Ok(Value::Array(mut v)) if v.len() == 1 => v.pop().unwrap_or(Value::Nil),
                _ => Value::Nil,
            })
            .collect(),
    ))
}

async fn one(
    mut conn: ClusterConnection,
    call: &Call,
    round_trips: &AtomicU64,
) -> ItemResult<Value> {
    let mut attempt = 0;
    loop {
        round_trips.fetch_add(1, Ordering::Relaxed);
        let r = call.cmd(false).query_async::<Value>(&mut conn).await;
        if attempt < MIGRATION_RETRIES && is_migrating(&r) {
            attempt += 1;
            tokio::time::sleep(MIGRATION_BACKOFF_STEP * attempt).await;
            continue;
        }
        return match r {
            Ok(Value::ServerError(e)) => Err(StoreError::Failed(format!("{e:?}"))),
            Ok(v) => Ok(v),
            Err(e) => Err(e.into()),
        };
    }
}
