//! The short soak of the suite; `cargo xtask soak` runs the long one.

use std::time::Duration;

use forwarder_tests::soak;

#[test]
fn forty_seconds_of_mixed_load_leave_the_footprint_flat_and_every_byte_intact() {
    let report = soak::run(Duration::from_secs(40), Duration::from_secs(4)).unwrap();
    println!("{}", report.render());
    let problems = report.problems();
    assert!(problems.is_empty(), "soak problems: {problems:#?}");
}
