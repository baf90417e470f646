//! The crate's example programs answer `--help` and refuse unknown flags.

use std::process::Command;

#[test]
fn detect_gpus_answers_help_and_runs() {
    // Cargo builds a package's examples before its tests: target/<profile>/examples.
    let exe = std::env::current_exe().unwrap();
    let program = exe
        .parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .join("examples/detect_gpus");
    let help = Command::new(&program)
        .arg("--help")
        .output()
        .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
    assert!(help.status.success());
    assert!(String::from_utf8_lossy(&help.stdout).contains("Usage:"));
    let bad = Command::new(&program).arg("--bogus").output().unwrap();
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--bogus"));
    let run = Command::new(&program).output().unwrap();
    assert!(run.status.success());
    assert!(String::from_utf8_lossy(&run.stdout).starts_with("gpus="));
}
