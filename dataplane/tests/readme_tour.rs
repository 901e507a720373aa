//! The README's tour runs top to bottom: `readme_tour.sh` runs the README's
//! own `sh tour` blocks (with this build's `flashsale`, on free ports) and
//! fails at the first command that fails. Bounded: after `LIMIT` the whole
//! process group is stopped (SIGTERM, so the throwaway servers clean up,
//! then SIGKILL).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const LIMIT: Duration = Duration::from_secs(180);

fn signal_group(pgid: u32, signal: libc::c_int) {
    if let Ok(pgid) = libc::pid_t::try_from(pgid) {
        // SAFETY: kill(2) on the process group this test created; no memory is shared.
        unsafe {
            libc::kill(-pgid, signal);
        }
    }
}

#[test]
fn readme_tour_runs_top_to_bottom() -> Result<(), Box<dyn std::error::Error>> {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let script = manifest.join("tests/readme_tour.sh");
    let bin_dir = Path::new(env!("CARGO_BIN_EXE_flashsale"))
        .parent()
        .ok_or("the flashsale binary has no directory")?;
    let log_dir = tempfile::tempdir()?;
    let log_path = log_dir.path().join("tour.log");
    let log = std::fs::File::create(&log_path)?;
    let mut child = Command::new("bash")
        .arg(&script)
        .arg("--free-ports")
        .env("FLASHSALE_BIN_DIR", bin_dir)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .process_group(0)
        .spawn()?;
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait()? {
            break Some(status);
        }
        if started.elapsed() > LIMIT {
            signal_group(child.id(), libc::SIGTERM);
            std::thread::sleep(Duration::from_secs(5));
            signal_group(child.id(), libc::SIGKILL);
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let output = std::fs::read_to_string(&log_path).unwrap_or_default();
    match status {
        Some(s) if s.success() => {
            assert!(
                output.contains("--- tour done"),
                "the tour ended without its last line:\n{output}"
            );
            Ok(())
        }
        Some(s) => panic!("the README tour failed ({s}):\n{output}"),
        None => panic!(
            "the README tour did not finish within {} s:\n{output}",
            LIMIT.as_secs()
        ),
    }
}
