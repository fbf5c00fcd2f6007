//! Named assertions collected per scenario, so the same scenario can run
//! against the forwarder (where all must pass) and the seed recipe (where
//! the report says which fail).

use anyhow::Result;

pub struct Check {
    pub name: &'static str,
    pub result: Result<String>,
}

#[derive(Default)]
pub struct Checks {
    pub checks: Vec<Check>,
}

impl Checks {
    /// Records a check; `Ok` may carry a measurement to report.
    pub fn add(&mut self, name: &'static str, result: Result<String>) {
        self.checks.push(Check { name, result });
    }

    /// Records a check that has nothing to report but pass or fail.
    pub fn add_ok(&mut self, name: &'static str, result: Result<()>) {
        self.add(name, result.map(|()| String::new()));
    }

    /// Prints every check and panics, naming them, if any failed.
    pub fn assert_all_pass(&self, title: &str) {
        let failed = self.report(title);
        assert!(
            failed.is_empty(),
            "{} of {} checks failed: {failed:?}",
            failed.len(),
            self.checks.len()
        );
    }

    /// Prints every check and returns the names of those that failed.
    pub fn report(&self, title: &str) -> Vec<&'static str> {
        println!("{title}:");
        let mut failed = Vec::new();
        for c in &self.checks {
            match &c.result {
                Ok(detail) if detail.is_empty() => println!("  pass  {}", c.name),
                Ok(detail) => println!("  pass  {} ({detail})", c.name),
                Err(e) => {
                    failed.push(c.name);
                    println!("  FAIL  {}: {e:#}", c.name);
                }
            }
        }
        failed
    }
}
