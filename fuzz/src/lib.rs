//! Shared pieces of meshlimit's fuzz targets (`fuzz_targets/`): a JSON reader that keeps
//! what the input said (duplicates included), the checks every plugin configuration must
//! pass, and the structure-aware configuration generator. See README, "Fuzzing".

pub mod config_checks;
pub mod config_gen;
pub mod json_tree;
