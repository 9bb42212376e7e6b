//! Running the real `pgrelay` binary against test clusters.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use super::{temp_dir, TempDir};

/// The binary under test: this build's, or `PGRELAY_TEST_BIN` (to run the
/// tests against another build, e.g. to see a regression test fail).
pub fn bin() -> PathBuf {
    match std::env::var_os("PGRELAY_TEST_BIN") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_BIN_EXE_pgrelay")),
    }
}

/// A config file in its own temp dir.
pub struct ConfigFile {
    pub dir: TempDir,
    pub path: PathBuf,
}

impl ConfigFile {
    pub fn new(text: &str) -> ConfigFile {
        let dir = temp_dir("pgrelay-cfg");
        let path = dir.path().join("relay.toml");
        std::fs::write(&path, text).unwrap();
        ConfigFile { dir, path }
    }
}

/// Runs a pgrelay command to completion.
pub fn cmd(args: &[&str]) -> Output {
    cmd_with(&bin(), args)
}

/// [`cmd`] with another pgrelay binary (an older release, say).
pub fn cmd_with(bin: &Path, args: &[&str]) -> Output {
    Command::new(bin)
        .args(args)
        .env("PGRELAY_LOG", "warn")
        .output()
        .unwrap_or_else(|e| panic!("run {}: {e}", bin.display()))
}

pub fn ok(args: &[&str]) -> String {
    ok_with(&bin(), args)
}

/// [`ok`] with another pgrelay binary.
pub fn ok_with(bin: &Path, args: &[&str]) -> String {
    let out = cmd_with(bin, args);
    assert!(
        out.status.success(),
        "{} {args:?} failed:\nstdout: {}\nstderr: {}",
        bin.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a pgrelay command that must fail; returns stderr then stdout.
pub fn fails(args: &[&str]) -> String {
    let out = cmd(args);
    assert!(!out.status.success(), "pgrelay {args:?} should fail");
    String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout)
}

/// A running sidecar process; killed (SIGKILL) on drop.
pub struct Relay {
    pub child: Child,
    pub log: PathBuf,
}

impl Relay {
    pub fn spawn(config: &ConfigFile, region: &str, role: &str) -> Relay {
        Relay::spawn_with(&bin(), config, region, role)
    }

    /// [`Relay::spawn`] with its own copy of the config as it is now, plus
    /// `[http] listen` on `port` (processes sharing one config file cannot
    /// share a listening port).
    pub fn spawn_listening(config: &ConfigFile, region: &str, role: &str, port: u16) -> Relay {
        let text = std::fs::read_to_string(&config.path).expect("read the config");
        let own = config
            .dir
            .path()
            .join(format!("relay-{region}-{role}.toml"));
        std::fs::write(
            &own,
            format!("{text}\n[http]\nlisten = \"127.0.0.1:{port}\"\n"),
        )
        .expect("write the sidecar's config");
        Relay::spawn_at(&bin(), config, &own, region, role)
    }

    /// [`Relay::spawn`] with another pgrelay binary (an older release, say).
    pub fn spawn_with(bin: &Path, config: &ConfigFile, region: &str, role: &str) -> Relay {
        Relay::spawn_at(bin, config, &config.path, region, role)
    }

    /// Runs `bin` on the config at `path`, logging into `config`'s directory.
    fn spawn_at(bin: &Path, config: &ConfigFile, path: &Path, region: &str, role: &str) -> Relay {
        let log = config
            .dir
            .path()
            .join(format!("relay-{region}-{role}-{}.log", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = Command::new(bin)
            .args(["run", "--config"])
            .arg(path)
            .args(["--region", region, "--role", role])
            .env("PGRELAY_LOG", "info")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("spawn pgrelay");
        Relay { child, log }
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then wait for exit; returns the exit status code.
    pub fn terminate(&mut self, timeout: Duration) -> Option<i32> {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Ok(Some(st)) = self.child.try_wait() {
                return st.code();
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill9();
    }
}
