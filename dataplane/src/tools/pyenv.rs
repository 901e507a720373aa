//! Python tools the test suite drives (the Helm engine, Schemathesis), each in
//! a venv built once from a pinned requirements list and cached across runs
//! and target dirs in `~/.cache/flashsale/` (or `$FLASHSALE_CACHE_DIR`). A
//! venv whose recorded requirements differ from the asked ones is rebuilt.

use std::path::{Path, PathBuf};
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum VenvError {
    #[error("{what}: cannot run: {source}")]
    Spawn {
        what: String,
        source: std::io::Error,
    },
    #[error("{what} failed:\n{output}")]
    Failed { what: String, output: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A ready venv.
#[derive(Clone, Debug)]
pub struct Venv {
    dir: PathBuf,
}

/// The file, inside a venv, recording the requirements it was built from.
const STAMP: &str = "flashsale-requirements.txt";

impl Venv {
    /// The venv `name` holding exactly `requirements` (a pip requirements
    /// file's text), in which `python -c probe` succeeds; built when missing
    /// or stale. A build goes to a temp dir renamed into place, so parallel
    /// test runs never see half a venv.
    pub fn ensure(name: &str, requirements: &str, probe: &str) -> Result<Self, VenvError> {
        let root = cache_dir();
        let venv = Self {
            dir: root.join(name),
        };
        if venv.holds(requirements, probe) {
            return Ok(venv);
        }
        std::fs::create_dir_all(&root).map_err(io(&root))?;
        let build = Self {
            dir: root.join(format!(".{name}.build-{}", std::process::id())),
        };
        let _ = std::fs::remove_dir_all(&build.dir);
        run(
            Command::new("python3").args(["-m", "venv"]).arg(&build.dir),
            "python3 -m venv (install python3 and python3-venv)",
        )?;
        let stamp = build.dir.join(STAMP);
        std::fs::write(&stamp, requirements).map_err(io(&stamp))?;
        run(
            Command::new(build.python())
                .args([
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ])
                .args(["--no-input", "--requirement"])
                .arg(&stamp),
            &format!("pip install for the {name} venv (needs PyPI)"),
        )?;
        if !build.holds(requirements, probe) {
            return Err(VenvError::Failed {
                what: format!("python -c {probe:?} in the fresh {name} venv"),
                output: "the requirements installed but the probe fails".into(),
            });
        }
        let _ = std::fs::remove_dir_all(&venv.dir);
        if std::fs::rename(&build.dir, &venv.dir).is_err() {
            // Another run put its build in place first; it holds the same.
            let _ = std::fs::remove_dir_all(&build.dir);
        }
        if venv.holds(requirements, probe) {
            Ok(venv)
        } else {
            Err(VenvError::Failed {
                what: format!("moving the {name} venv into {}", venv.dir.display()),
                output: "the venv in place does not answer the probe".into(),
            })
        }
    }

    /// The venv's interpreter (invoke tools as modules: a moved venv's
    /// scripts point at the build dir).
    pub fn python(&self) -> PathBuf {
        self.dir.join("bin/python")
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn holds(&self, requirements: &str, probe: &str) -> bool {
        std::fs::read_to_string(self.dir.join(STAMP)).is_ok_and(|r| r == requirements)
            && Command::new(self.python())
                .args(["-c", probe])
                .output()
                .is_ok_and(|o| o.status.success())
    }
}

/// `$FLASHSALE_CACHE_DIR`, else `$XDG_CACHE_HOME/flashsale`, else `~/.cache/flashsale`.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("FLASHSALE_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("flashsale")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> VenvError {
    let path = path.to_path_buf();
    move |source| VenvError::Io { path, source }
}

fn run(cmd: &mut Command, what: &str) -> Result<(), VenvError> {
    let out = cmd.output().map_err(|source| VenvError::Spawn {
        what: what.to_string(),
        source,
    })?;
    if out.status.success() {
        Ok(())
    } else {
        Err(VenvError::Failed {
            what: what.to_string(),
            output: format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        })
    }
}
