//! The plugin configuration, structure-aware: the input picks a configuration shaped like
//! the real one (`meshlimit_fuzz::config_gen`), so mutations reach the deep checks. The
//! same configuration is parsed in two spellings (compact, and pretty with every ASCII
//! character of every string `\u`-escaped): both are accepted or both refused, and
//! accepted ones are equal. Each passes `meshlimit_fuzz::config_checks`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use meshlimit_fuzz::config_checks::check;
use meshlimit_fuzz::config_gen::{GenInput, Style};

fuzz_target!(|input: GenInput| {
    let plain = input.render(Style {
        pretty: false,
        escape: false,
    });
    let escaped = input.render(Style {
        pretty: true,
        escape: true,
    });
    match (check(&plain), check(&escaped)) {
        (Ok(a), Ok(b)) => assert_eq!(a, b, "two spellings, two configurations"),
        (Err(_), Err(_)) => {}
        (a, b) => panic!(
            "one spelling accepted, the other refused: {:?} / {:?}\n{}\n{}",
            a.map(|c| c.rules.len()),
            b.map(|c| c.rules.len()),
            String::from_utf8_lossy(&plain),
            String::from_utf8_lossy(&escaped)
        ),
    }
});
