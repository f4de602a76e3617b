//! One Redis node: a connection manager per lane (it reconnects by itself), each batch
//! one pipeline, and the scripts loaded again when a restarted node has forgotten them.

use super::batch::{all_failed, pipeline, Lane};
use super::connection::{client, on_runtime, RedisOptions};
use super::scripts::{is_noscript, load_all, Call};
use crate::store::{ItemResult, StoreError};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ConnectionInfo, Value};
use std::sync::atomic::AtomicU64;
use tokio::sync::RwLock;

/// Reconnect attempts of a broken connection within one call, and the longest pause
/// between them (ms): a node that stays down is the probe's to notice, not the
/// request's to wait for.
const RECONNECT_RETRIES: usize = 1;
const RECONNECT_MAX_DELAY_MS: u64 = 200;

pub(super) struct Single {
    info: ConnectionInfo,
    opts: RedisOptions,
    /// Created on first use, so the service starts (degraded) while Redis is down.
    check: RwLock<Option<ConnectionManager>>,
    reports: RwLock<Option<ConnectionManager>>,
}

impl Single {
    pub(super) fn new(info: ConnectionInfo, opts: RedisOptions) -> Self {
        Single {
            info,
            opts,
            check: RwLock::new(None),
            reports: RwLock::new(None),
        }
    }

    pub(super) fn options(&self) -> &RedisOptions {
        &self.opts
    }

    /// The lane's connection, connected (and the scripts loaded) on first use.
    pub(super) async fn connection(&self, lane: Lane) -> Result<ConnectionManager, StoreError> {
        let slot = match lane {
            Lane::Check => &self.check,
            Lane::Reports => &self.reports,
        };
        if let Some(c) = slot.read().await.as_ref() {
            return Ok(c.clone());
        }
        let mut w = slot.write().await;
        if let Some(c) = w.as_ref() {
            return Ok(c.clone());
        }
        let client = client(self.info.clone(), &self.opts)?;
        let cfg = ConnectionManagerConfig::new()
            .set_connection_timeout(self.opts.io_timeout)
            .set_response_timeout(self.opts.io_timeout)
            .set_number_of_retries(RECONNECT_RETRIES)
            .set_max_delay(RECONNECT_MAX_DELAY_MS);
        let connect = async move {
            let mut c = ConnectionManager::new_with_config(client, cfg).await?;
            load_all(&mut c).await?;
            Ok::<_, StoreError>(c)
        };
        let c = match lane {
            Lane::Check => connect.await?,
            Lane::Reports => on_runtime(&self.opts.report_runtime, connect).await??,
        };
        *w = Some(c.clone());
        Ok(c)
    }

    pub(super) async fn ping(&self) -> Result<(), StoreError> {
        let mut c = self.connection(Lane::Check).await?;
        let _: String = redis::cmd("PING").query_async(&mut c).await?;
        Ok(())
    }

    /// The whole batch as one pipeline. A restarted Redis has an empty script cache:
    /// the scripts are loaded again and just the refused calls replayed.
    pub(super) async fn run(
        &self,
        calls: &[Call],
        lane: Lane,
        round_trips: &AtomicU64,
    ) -> Vec<ItemResult<Value>> {
        let mut conn = match self.connection(lane).await {
            Ok(c) => c,
            Err(e) => return all_failed(calls.len(), &e),
        };
        let mut out = pipeline(&mut conn, calls.iter(), round_trips).await;
        let refused: Vec<usize> = (0..calls.len())
            .filter(|&i| matches!(&out[i], Ok(v) if is_noscript(v)))
            .collect();
        if refused.is_empty() {
            return out;
        }
        if let Err(e) = load_all(&mut conn).await {
            return all_failed(calls.len(), &e);
        }
        let again = pipeline(&mut conn, refused.iter().map(|&i| &calls[i]), round_trips).await;
        for (i, r) in refused.into_iter().zip(again) {
            out[i] = r;
        }
        out
    }
}
