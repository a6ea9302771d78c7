//! The fuzz targets' seeds are real inputs: every config seed is a valid
//! config and every request seed a valid request. Checked here so the seeds
//! follow the schema as it changes (a seed that no longer parses would
//! quietly stop steering the fuzzer toward deep code). Inputs the fuzzer
//! once failed on are kept among the seeds as `regression-*`.
use std::path::{Path, PathBuf};

use agentd::{
    audit::query::Matcher,
    config::Config,
    control::{Request, decode},
};

fn seeds(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/seeds")
        .join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("directory entry").path())
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no seeds in {}", dir.display());
    files
}

#[test]
fn config_seeds_are_valid_configs() {
    for file in seeds("config") {
        let text = std::fs::read_to_string(&file).expect("seed readable");
        let config = Config::parse(&file, &text).unwrap_or_else(|e| panic!("{e}"));
        assert!(!config.agents.is_empty(), "{}: no agents", file.display());
    }
}

#[test]
fn request_seeds_are_valid_requests() {
    for file in seeds("control_request") {
        let line = std::fs::read(&file).expect("seed readable");
        let request = decode(&line).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        // What the daemon does next with an events request; a seed named
        // regression-* once panicked here.
        if let Request::Events { filter, .. } = &request {
            Matcher::new(filter, std::time::SystemTime::now())
                .unwrap_or_else(|e| panic!("{}: {e}", file.display()));
        }
    }
}
