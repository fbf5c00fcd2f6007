//! The hostile-input suite, short: generated and bent frames, discovery
//! datagrams naming addresses in every form, fragment trains and TCP
//! conversations through both programs, each verdict predicted by the
//! oracle (see forwarder_tests::hostile). `cargo xtask fuzz` runs the same
//! for longer. HOSTILE_PACKETS and HOSTILE_SEED override the defaults to
//! replay a failure.

use forwarder_tests::{hostile, netns};

#[test]
fn generated_hostile_frames_get_exactly_the_predicted_verdicts() {
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
    println!("hostile frames tried: {tally:#?}");
    assert_eq!(tally.tried, count);
    // The generator must reach every verdict the new checks decide, or
    // the oracle proves little about them.
    let reached = |verdict: &str| tally.verdicts.get(verdict).copied().unwrap_or(0);
    for verdict in [
        "redirected",
        "relayed up",
        "relayed down",
        "icmp_error_dropped",
        "fragment",
        "fragment_out_of_order",
        "relay_carries_address",
        "relay_unscannable",
        "relay_answer_blocked",
        "relay_rate_limited",
        "relay_down_rate_limited",
        "tcp_out_of_window",
        "no_flow",
        "reverse_path_failed",
        "reflected",
    ] {
        assert!(
            reached(verdict) > 0,
            "no case reached {verdict}: {tally:#?}"
        );
    }
    assert!(tally.redirected > count / 50, "{tally:#?}");
}
