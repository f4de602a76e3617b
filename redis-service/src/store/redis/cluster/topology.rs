//! The cluster's layout as the store last read it: which master serves each slot, and
//! the connections to those masters.

use crate::keys::SLOTS;
use crate::store::StoreError;
use redis::aio::MultiplexedConnection;
use redis::Value;

use super::super::batch::Lane;

/// A node's address as `CLUSTER SLOTS` names it.
pub(super) type Addr = (String, u16);

/// One master and its two connections (see [`Lane`]).
#[derive(Clone)]
pub(super) struct Node {
    pub addr: Addr,
    pub check: MultiplexedConnection,
    pub reports: MultiplexedConnection,
}

impl Node {
    pub fn connection(&self, lane: Lane) -> MultiplexedConnection {
        match lane {
            Lane::Check => self.check.clone(),
            Lane::Reports => self.reports.clone(),
        }
    }
}

/// Slot map and masters. Replaced whole (behind an `Arc`) on every change, so a batch
/// routes all its items on one consistent view.
pub(super) struct Topology {
    /// Per slot, the index into `nodes` of its master; `None` while no master is known.
    slots: Vec<Option<u16>>,
    pub nodes: Vec<Node>,
}

impl Default for Topology {
    fn default() -> Self {
        Topology {
            slots: vec![None; usize::from(SLOTS)],
            nodes: Vec::new(),
        }
    }
}

impl Topology {
    /// The layout `ranges` describe, `nodes` being the masters of
    /// [`masters`]`(ranges)`, in that order.
    pub fn new(ranges: &[SlotRange], nodes: Vec<Node>) -> Self {
        let slots = slot_map(ranges, |addr| nodes.iter().position(|n| &n.addr == addr));
        Topology { slots, nodes }
    }

    /// Index into `nodes` of the master serving `slot`.
    pub fn node_of(&self, slot: u16) -> Option<usize> {
        self.slots
            .get(usize::from(slot))
            .copied()
            .flatten()
            .map(usize::from)
    }

    /// Every slot has a master.
    pub fn is_complete(&self) -> bool {
        self.slots.iter().all(Option::is_some)
    }

    /// The layout without the node at `addr`; its slots are unknown until the next
    /// refresh (which reconnects to whoever serves them then).
    pub fn without(&self, addr: &Addr) -> Option<Topology> {
        let gone = self.nodes.iter().position(|n| &n.addr == addr)?;
        let mut nodes = self.nodes.clone();
        nodes.remove(gone);
        Some(Topology {
            slots: remap_without(&self.slots, gone),
            nodes,
        })
    }
}

/// One line of `CLUSTER SLOTS`: slots `first..=last` served by `master`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct SlotRange {
    pub first: u16,
    pub last: u16,
    pub master: Addr,
}

/// The ranges of a `CLUSTER SLOTS` reply (`[[first, last, [host, port, ...], replicas...], ...]`);
/// malformed lines are skipped, a reply that is not a list is an error.
pub(super) fn parse_cluster_slots(v: Value) -> Result<Vec<SlotRange>, StoreError> {
    let Value::Array(lines) = v else {
        return Err(StoreError::Failed("CLUSTER SLOTS: not an array".into()));
    };
    let mut ranges = Vec::with_capacity(lines.len());
    for line in lines {
        let Value::Array(f) = line else { continue };
        let (Some(Value::Int(first)), Some(Value::Int(last)), Some(Value::Array(m))) =
            (f.first(), f.get(1), f.get(2))
        else {
            continue;
        };
        let host = match m.first() {
            Some(Value::BulkString(h)) => String::from_utf8_lossy(h).to_string(),
            Some(Value::SimpleString(h)) => h.clone(),
            _ => continue,
        };
        let Some(Value::Int(port)) = m.get(1) else {
            continue;
        };
        let (Ok(first), Ok(last), Ok(port)) = (
            u16::try_from(*first),
            u16::try_from(*last),
            u16::try_from(*port),
        ) else {
            continue;
        };
        ranges.push(SlotRange {
            first,
            last,
            master: (host, port),
        });
    }
    Ok(ranges)
}

/// The distinct masters of `ranges`, in order of first appearance.
pub(super) fn masters(ranges: &[SlotRange]) -> Vec<Addr> {
    let mut out: Vec<Addr> = Vec::new();
    for r in ranges {
        if !out.contains(&r.master) {
            out.push(r.master.clone());
        }
    }
    out
}

/// Per slot, the index `index_of` gives its master.
fn slot_map(ranges: &[SlotRange], index_of: impl Fn(&Addr) -> Option<usize>) -> Vec<Option<u16>> {
    let mut slots = vec![None; usize::from(SLOTS)];
    for r in ranges {
        let Some(i) = index_of(&r.master).and_then(|i| u16::try_from(i).ok()) else {
            continue;
        };
        for s in r.first..=r.last.min(SLOTS - 1) {
            slots[usize::from(s)] = Some(i);
        }
    }
    slots
}

/// `slots` once node `gone` is removed from the node list: its slots become unknown,
/// the nodes after it move down by one.
fn remap_without(slots: &[Option<u16>], gone: usize) -> Vec<Option<u16>> {
    slots
        .iter()
        .map(|s| match s.map(usize::from) {
            Some(n) if n == gone => None,
            Some(n) if n > gone => Some((n - 1) as u16),
            _ => *s,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn line(first: i64, last: i64, host: &str, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(first),
            Value::Int(last),
            Value::Array(vec![
                Value::BulkString(host.as_bytes().to_vec()),
                Value::Int(port),
                Value::BulkString(b"node-id".to_vec()),
            ]),
            // A replica: not a master, not routed to.
            Value::Array(vec![
                Value::BulkString(b"10.0.0.9".to_vec()),
                Value::Int(7009),
            ]),
        ])
    }

    #[test]
    fn cluster_slots_become_one_master_per_slot() {
        let reply = Value::Array(vec![
            line(0, 5460, "10.0.0.1", 7000),
            line(5461, 10922, "10.0.0.2", 7001),
            // The first master serves a second range.
            line(10923, 10999, "10.0.0.1", 7000),
            Value::Int(3),
            Value::Array(vec![Value::Int(1)]),
            line(-1, 5, "10.0.0.3", 7002),
        ]);
        let ranges = parse_cluster_slots(reply).unwrap();
        assert_eq!(ranges.len(), 3, "malformed lines are skipped: {ranges:?}");
        let addrs = masters(&ranges);
        assert_eq!(
            addrs,
            [
                ("10.0.0.1".to_string(), 7000),
                ("10.0.0.2".to_string(), 7001)
            ]
        );
        let slots = slot_map(&ranges, |a| addrs.iter().position(|b| b == a));
        assert_eq!(
            (slots[0], slots[5460], slots[5461]),
            (Some(0), Some(0), Some(1))
        );
        assert_eq!(
            (slots[10922], slots[10923], slots[10999]),
            (Some(1), Some(0), Some(0))
        );
        assert_eq!(
            (slots[11000], slots[16383]),
            (None, None),
            "no master known"
        );
        assert!(parse_cluster_slots(Value::Nil).is_err());
    }

    #[test]
    fn a_forgotten_node_leaves_its_slots_unknown_and_the_others_in_place() {
        let slots = vec![Some(0), Some(1), None, Some(2), Some(1)];
        assert_eq!(
            remap_without(&slots, 1),
            [Some(0), None, None, Some(1), None]
        );
        assert_eq!(
            remap_without(&slots, 2),
            [Some(0), Some(1), None, None, Some(1)]
        );
        assert_eq!(
            remap_without(&slots, 0),
            [None, Some(0), None, Some(1), Some(0)]
        );
    }
}
