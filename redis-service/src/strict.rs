//! `POST /v1/strict`: one request decided atomically in the store, for rules whose limit
//! must never be exceeded. A multi-limit GCRA, all-or-nothing, on the store's clock, with
//! the limits the request carries (the filter's configuration stays the one source of
//! truth): one `lua/strict.lua` call on Redis (every limit's key under one hash tag, so
//! one slot in a cluster), `meshlimit_core::gcra::check` under a shard lock in the
//! embedded store. Strict checks travel on the check connections, never behind a report.
//!
//! When the store cannot decide (unreachable, an error, past the deadline) the answer is
//! `503 store_unavailable`, never the fallback's guess: a strict rule exists because its
//! limit must hold across every proxy, and the fallback only knows what this one
//! companion instance saw. The filter's `failure_mode` for the rule decides instead
//! (`closed` refuses, `open` admits, `local` uses this proxy's fallback share), which is
//! where the operator said what an outage should cost.

use crate::keys::Namespace;
use crate::service::{ApiError, Service};
use crate::store::{StoreLimit, StrictOp};
use axum::http::StatusCode;
use meshlimit_core::protocol::{StrictAnswer, StrictRequest};
use std::time::Instant;

impl Service {
    /// `/v1/strict`.
    pub async fn strict(&self, req: &StrictRequest) -> Result<StrictAnswer, ApiError> {
        req.validate().map_err(ApiError::bad_request)?;
        // More hits than a bucket holds could never be admitted, and no retry time would
        // be true: say so instead of refusing forever.
        if let Some((i, l)) = (req.limits.iter().enumerate()).find(|(_, l)| req.hits > l.burst) {
            return Err(ApiError::bad_request(format!(
                "hits: {} is more than limits[{i}] ever admits at once (burst {})",
                req.hits, l.burst
            )));
        }
        let op = StrictOp {
            tag: self.keys.tag(Namespace::Strict, &req.rule, &req.key),
            limits: req
                .limits
                .iter()
                .map(|l| StoreLimit {
                    window_secs: l.window_secs,
                    max: l.max,
                    burst: l.burst,
                })
                .collect(),
            hits: req.hits,
        };
        let t = Instant::now();
        let r = tokio::time::timeout(self.deadline, self.store.strict(&op)).await;
        self.metrics
            .store_latency
            .strict
            .observe(t.elapsed().as_secs_f64());
        let why = match r {
            Ok(Ok(a)) => {
                self.store_answered();
                self.metrics
                    .strict(if a.allowed { "allowed" } else { "denied" });
                return Ok(a);
            }
            Ok(Err(e)) => {
                // Like a report's: a slow call alone does not switch checks to the
                // fallback, a store that is gone does.
                self.store_failed(&e, true);
                e.to_string()
            }
            Err(_) => {
                self.metrics.store_error("strict_deadline");
                format!("no answer within {:?}", self.deadline)
            }
        };
        self.metrics.strict("unavailable");
        Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            format!("the store could not decide ({why}); the rule's failure_mode applies"),
        ))
    }
}
