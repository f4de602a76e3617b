//! Batch routing: which connection a batch travels on, how the calls of one batch are
//! grouped by the node that serves them, and one pipeline per node (one round trip).

use super::scripts::Call;
use crate::store::{ItemResult, StoreError};
use redis::aio::ConnectionLike;
use redis::{Pipeline, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

/// Which connection a batch travels on. Checks and reports never share one: a
/// connection is one ordered stream, so a check sent behind a 10 000-entry report on the
/// same connection would wait for the whole report.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(super) enum Lane {
    /// Checks, and the short commands (pings, slot maps, reconciliation).
    Check,
    Reports,
}

/// Items of a batch grouped by the node that serves them.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Groups {
    /// Node index -> indices of its items, in batch order; nodes in index order.
    pub by_node: BTreeMap<usize, Vec<usize>>,
    /// Items whose node is not known (a slot without a master in the slot map).
    pub unrouted: Vec<usize>,
}

/// Groups the items of a batch by node; `nodes` yields each item's node, if known.
pub(super) fn group_by_node(nodes: impl IntoIterator<Item = Option<usize>>) -> Groups {
    let mut g = Groups::default();
    for (i, node) in nodes.into_iter().enumerate() {
        match node {
            Some(n) => g.by_node.entry(n).or_default().push(i),
            None => g.unrouted.push(i),
        }
    }
    g
}

/// One pipeline of `EVALSHA`s: one round trip. Per call its raw reply, a server's error
/// reply kept as a value (one call's error is not the others').
pub(super) async fn pipeline<'a, C: ConnectionLike + Send>(
    c: &mut C,
    calls: impl Iterator<Item = &'a Call>,
    round_trips: &AtomicU64,
) -> Vec<ItemResult<Value>> {
    let mut p = Pipeline::new();
    let mut n = 0;
    for call in calls {
        p.add_command(call.cmd(true));
        n += 1;
    }
    round_trips.fetch_add(1, Ordering::Relaxed);
    match c.req_packed_commands(&p, 0, n).await {
        Ok(vals) if vals.len() == n => vals.into_iter().map(Ok).collect(),
        Ok(_) => (0..n)
            .map(|_| Err(StoreError::Failed("short pipeline reply".into())))
            .collect(),
        Err(e) => {
            let e = StoreError::from(e);
            (0..n).map(|_| Err(e.clone())).collect()
        }
    }
}

/// The same error for every item of a batch that could not be sent.
pub(super) fn all_failed<T>(n: usize, e: &StoreError) -> Vec<ItemResult<T>> {
    (0..n).map(|_| Err(e.clone())).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn items_are_grouped_by_node_in_order_and_the_unknown_kept_apart() {
        let g = group_by_node([Some(2), None, Some(0), Some(2), None, Some(1), Some(0)]);
        assert_eq!(
            g.by_node.into_iter().collect::<Vec<_>>(),
            [(0, vec![2, 6]), (1, vec![5]), (2, vec![0, 3])]
        );
        assert_eq!(g.unrouted, [1, 4]);
        assert_eq!(group_by_node([]), Groups::default());
    }
}
