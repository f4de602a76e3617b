//! How many generated configurations the core accepts, and the most common refusals:
//! a check that the structure-aware generator (src/config_gen.rs) gets past the JSON
//! shape. `cargo run --release --example accept_rate` (in fuzz/).
use arbitrary::{Arbitrary, Unstructured};
use meshlimit_fuzz::config_gen::{GenInput, Style};
fn main() {
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let (mut ok, mut n) = (0, 0);
    let mut reasons = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..20000 {
        let len = (rnd() % 400) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rnd() as u8).collect();
        let Ok(g) = GenInput::arbitrary_take_rest(Unstructured::new(&bytes)) else {
            continue;
        };
        n += 1;
        match meshlimit_core::config::parse(&g.render(Style {
            pretty: false,
            escape: false,
        })) {
            Ok(c) => {
                ok += 1;
                *reasons
                    .entry(format!("ok {} rules", c.rules.len().min(3)))
                    .or_default() += 1;
            }
            Err(e) => {
                let r: String = e.reason.chars().take(40).collect();
                *reasons
                    .entry(format!("{}: {}", e.path.split('.').last().unwrap_or(""), r))
                    .or_default() += 1;
            }
        }
    }
    println!("{ok}/{n} accepted");
    let mut v: Vec<_> = reasons.into_iter().collect();
    v.sort_by_key(|x| std::cmp::Reverse(x.1));
    for (r, c) in v.iter().take(25) {
        println!("{c:6} {r}");
    }
}
