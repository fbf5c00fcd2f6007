//! The hostile-input suite, short: generated and bent frames through both
//! programs with an oracle (see forwarder_tests::hostile). `cargo xtask fuzz`
//! runs the same for longer. HOSTILE_PACKETS and HOSTILE_SEED override the
//! defaults to replay a failure.

use forwarder_tests::{hostile, netns};

#[test]
fn generated_hostile_frames_get_only_expected_verdicts() {
    netns::sweep_leftovers();
    let count = std::env::var("HOSTILE_PACKETS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(100_000);
    let seed = std::env::var("HOSTILE_SEED")
        .ok()
        .and_then(|v| u64::from_str_radix(v.trim_start_matches("0x"), 16).ok())
        .unwrap_or(0x5eed_f0f0_1234_abcd);
    let tally = hostile::run(count, seed, |_| true).unwrap_or_else(|e| panic!("{e:#}"));
    println!("hostile frames tried: {tally:?}");
    assert_eq!(tally.tried, count);
    // The generator must reach every verdict, or the oracle proves little.
    assert!(tally.redirected > count / 50, "{tally:?}");
    assert!(tally.dropped > 0, "{tally:?}");
    assert!(tally.uplink_copies > 0, "{tally:?}");
}
