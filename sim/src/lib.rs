//! Deterministic simulation of meshlimit's global limits (see `docs/global-limits.md`):
//! N proxies running the real core code, a simulated companion, simulated time, and one
//! exact GCRA on the merged traffic as the yardstick.

pub mod companion;
pub mod proxy;
pub mod rng;
pub mod scenario;
pub mod world;

#[cfg(test)]
mod tests;
