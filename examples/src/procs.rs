//! Starting the project's real binaries as child processes.
//!
//! Every binary prints "listening on ADDR" on stdout once it serves; [`Proc`]
//! waits for that line with a deadline instead of sleeping, and kills the
//! child when dropped. Children's stderr (their logs) goes to a file.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, ChildStdout, Command};

/// The path of a binary built with the caller's (same target directory and
/// profile), e.g. `twopc-coordinator`. Works from binaries in `target/<p>/`
/// and from test executables in `target/<p>/deps/`.
pub fn binary(name: &str) -> anyhow::Result<PathBuf> {
    let exe = std::env::current_exe().context("cannot locate the running executable")?;
    let mut dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    if !path.exists() {
        bail!("{} is not built; run: cargo build --release --workspace --bins", path.display());
    }
    Ok(path)
}

/// A running child process that announced its address.
pub struct Proc {
    /// What it is, for messages.
    pub name: String,
    /// The address it listens on.
    pub addr: SocketAddr,
    child: Child,
    stdout: BufReader<ChildStdout>,
}

impl Proc {
    /// Starts `bin` with `args`, logging to `log_file`, and waits up to
    /// `within` for its "listening on" line.
    pub async fn start(name: &str, bin: &Path, args: &[String], log_file: &Path, within: Duration) -> anyhow::Result<Proc> {
        Self::start_with_env(name, bin, args, &[], log_file, within).await
    }

    /// [`Proc::start`] with extra environment variables.
    pub async fn start_with_env(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(String, String)],
        log_file: &Path,
        within: Duration,
    ) -> anyhow::Result<Proc> {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_file)
            .with_context(|| format!("cannot open {}", log_file.display()))?;
        let mut child = Command::new(bin)
            .args(args)
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        let stdout = child.stdout.take().context("child has no stdout")?;
        let mut reader = BufReader::new(stdout);
        let addr = tokio::time::timeout(within, async {
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).await? == 0 {
                    bail!("{name} exited before listening; see {}", log_file.display());
                }
                if let Some(a) = line.trim().strip_prefix("listening on ") {
                    return a.parse::<SocketAddr>().with_context(|| format!("{name} printed a bad address {a:?}"));
                }
            }
        })
        .await
        .with_context(|| format!("{name} did not start listening within {within:?}; see {}", log_file.display()))??;
        Ok(Proc { name: name.to_owned(), addr, child, stdout: reader })
    }

    /// Waits up to `within` for the next stdout line that starts with
    /// `prefix` (skipping others) and returns the rest of it, trimmed: for
    /// example the address after "admin listening on ".
    pub async fn next_line(&mut self, prefix: &str, within: Duration) -> anyhow::Result<String> {
        let name = &self.name;
        let reader = &mut self.stdout;
        tokio::time::timeout(within, async {
            let mut line = String::new();
            loop {
                line.clear();
                if reader.read_line(&mut line).await? == 0 {
                    bail!("{name} closed its stdout before printing {prefix:?}");
                }
                if let Some(rest) = line.trim().strip_prefix(prefix) {
                    return Ok(rest.trim().to_owned());
                }
            }
        })
        .await
        .with_context(|| format!("{name} did not print {prefix:?} within {within:?}"))?
    }

    /// Starts the `twopc-coordinator` binary on loopback port 0 (gRPC and
    /// admin) with its data in `data_dir`, logging to `log_file`.
    pub async fn coordinator(data_dir: &Path, log_file: &Path, within: Duration) -> anyhow::Result<Proc> {
        Proc::coordinator_with(data_dir, log_file, within, &[]).await
    }

    /// [`Proc::coordinator`] with more flags.
    pub async fn coordinator_with(data_dir: &Path, log_file: &Path, within: Duration, extra: &[String]) -> anyhow::Result<Proc> {
        let mut args: Vec<String> = vec![
            "--listen".into(),
            "127.0.0.1:0".into(),
            "--admin-listen".into(),
            "127.0.0.1:0".into(),
            "--data-dir".into(),
            data_dir.display().to_string(),
        ];
        args.extend_from_slice(extra);
        Proc::start("coordinator", &binary("twopc-coordinator")?, &args, log_file, within).await
    }

    /// `http://ADDR`.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// The child's process id.
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// Kills the process at once (SIGKILL) and reaps it.
    pub async fn kill(&mut self) -> anyhow::Result<()> {
        self.child.kill().await.with_context(|| format!("cannot kill {}", self.name))
    }

    /// Waits up to `within` for the process to exit by itself (for example
    /// at a crash point); `None` if it is still running then.
    pub async fn wait_exit(&mut self, within: Duration) -> anyhow::Result<Option<std::process::ExitStatus>> {
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(r) => Ok(Some(r.with_context(|| format!("waiting for {}", self.name))?)),
            Err(_) => Ok(None),
        }
    }

    /// The exit status if the process has exited, without waiting.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Asks the process to stop (SIGTERM) and waits up to `within` for it
    /// to exit; returns its exit status.
    pub async fn terminate(&mut self, within: Duration) -> anyhow::Result<std::process::ExitStatus> {
        if let Some(pid) = self.child.id() {
            let _ = Command::new("kill").arg("-TERM").arg(pid.to_string()).status().await;
        }
        match tokio::time::timeout(within, self.child.wait()).await {
            Ok(r) => r.with_context(|| format!("waiting for {}", self.name)),
            Err(_) => {
                self.kill().await?;
                bail!("{} did not exit within {within:?} of SIGTERM", self.name)
            }
        }
    }
}
