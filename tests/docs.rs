//! The README documents every configuration key and every pass-through reason code.

use preagg_proxy::config::KEYS;
use preagg_proxy::outcome::Reason;

fn readme() -> String {
    std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap()
}

#[test]
fn every_configuration_key_is_documented() {
    let readme = readme();
    for key in KEYS {
        assert!(readme.contains(&format!("| `{}` |", key.name)), "README lacks configuration key `{}`", key.name);
    }
}

#[test]
fn every_reason_code_is_documented() {
    let readme = readme();
    for reason in Reason::ALL {
        assert!(readme.contains(&format!("`{}`", reason.as_str())), "README lacks reason code `{reason}`");
    }
}
