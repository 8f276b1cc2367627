//! The daemon's configuration sources and how they combine: flags win over
//! `TWOPC_*` environment variables, which win over the TOML file named by
//! `--config` (or `TWOPC_CONFIG`), which wins over the defaults.
//!
//! [`Options`] is one layer: every daemon option, each optional. The same
//! type is the clap argument set (clap fills a field from the flag, or else
//! from its environment variable, so one parse already yields "flags over
//! environment") and the TOML file's schema (unknown keys are refused).
//! [`Options::or`] stacks layers; [`Options::defaults`] is the bottom one;
//! [`DaemonConfig::resolve`] turns the stack into concrete settings.
//!
//! Errors in the file are reported in one line with the file's path, line
//! and column, so a bad deploy shows what to fix at a glance.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::Config;

/// How the daemon writes its logs on stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Text on a terminal, JSON lines otherwise.
    Auto,
    /// JSON lines, for log collectors.
    Json,
    /// Human-readable text.
    Text,
}

/// One layer of the daemon's configuration: every option, each set or not.
/// The field docs are the `--help` text.
#[derive(Debug, Clone, Default, PartialEq, Eq, clap::Args, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Options {
    /// Address the gRPC API listens on. Port 0 picks a free port; the bound
    /// address is printed on stdout as "listening on ADDR". [default: 127.0.0.1:50051]
    #[arg(long, env = "TWOPC_LISTEN", value_name = "ADDR", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,

    /// Address of the admin HTTP listener (/metrics, /healthz, /readyz).
    /// Port 0 picks a free port; printed as "admin listening on ADDR".
    /// [default: 127.0.0.1:9464]
    #[arg(long, env = "TWOPC_ADMIN_LISTEN", value_name = "ADDR", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,

    /// Directory of the decision log (RocksDB). Created if missing.
    /// [default: ./data/coordinator]
    #[arg(long, env = "TWOPC_DATA_DIR", value_name = "PATH", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data_dir: Option<PathBuf>,

    /// Timeout of a transaction whose Begin or Execute asks for none.
    /// [default: 10s]
    #[arg(long, env = "TWOPC_DEFAULT_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none", with = "human_duration")]
    pub default_timeout: Option<Duration>,

    /// Longest timeout a transaction may ask for. [default: 5m]
    #[arg(long, env = "TWOPC_MAX_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none", with = "human_duration")]
    pub max_timeout: Option<Duration>,

    /// How long all votes may take after Commit before the transaction
    /// aborts with PREPARE_TIMEOUT. [default: 5s]
    #[arg(long, env = "TWOPC_PREPARE_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none", with = "human_duration")]
    pub prepare_timeout: Option<Duration>,

    /// On SIGTERM, how long transactions already begun may take to reach a
    /// decision before the rest are aborted and the daemon exits.
    /// [default: 10s]
    #[arg(long, env = "TWOPC_DRAIN_TIMEOUT", value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none", with = "human_duration")]
    pub drain_timeout: Option<Duration>,

    /// How long a finished transaction stays in memory for Status and
    /// retried Commits before it is forgotten. [default: 1m]
    #[arg(long, env = "TWOPC_RETENTION", value_name = "DURATION", value_parser = humantime::parse_duration, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none", with = "human_duration")]
    pub retention: Option<Duration>,

    /// Most branches one Execute may name. [default: 64]
    #[arg(long, env = "TWOPC_MAX_BRANCHES", value_name = "N", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_branches: Option<usize>,

    /// Largest payload of one Execute branch, in bytes. [default: 65536]
    #[arg(long, env = "TWOPC_MAX_PAYLOAD_BYTES", value_name = "BYTES", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_payload_bytes: Option<usize>,

    /// Commit a transaction with a single participant in one phase (one
    /// round trip and one fsync, at the participant) instead of two.
    /// [default: true]
    #[arg(long, env = "TWOPC_ONE_PHASE", value_name = "BOOL", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_phase: Option<bool>,

    /// Log format on stderr: JSON lines, human-readable text, or auto (text
    /// on a terminal, JSON otherwise). [default: auto]
    #[arg(long, env = "TWOPC_LOG_FORMAT", value_enum, global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_format: Option<LogFormat>,

    /// Log filter, in tracing's EnvFilter syntax (for example "info" or
    /// "twopc_coordinator=debug"). [default: info]
    #[arg(long, env = "TWOPC_LOG", value_name = "FILTER", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log: Option<String>,

    /// OTLP gRPC collector to export trace spans to (for example
    /// "http://127.0.0.1:4317"); also read from the standard
    /// OTEL_EXPORTER_OTLP_ENDPOINT. Unset: spans are not exported.
    #[arg(long, env = "OTEL_EXPORTER_OTLP_ENDPOINT", value_name = "URL", global = true)]
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub otlp_endpoint: Option<String>,
}

/// A configuration file that cannot be used. Each renders as one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML, has an unknown key, or a value of the
    /// wrong kind.
    #[error("{path}:{line}:{column}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// 1-based line of the problem (0 when unknown).
        line: usize,
        /// 1-based column of the problem (0 when unknown).
        column: usize,
        /// What is wrong, on one line.
        message: String,
    },
}

impl Options {
    /// Every option at its default value.
    pub fn defaults() -> Options {
        Options::from_daemon(&DaemonConfig::resolve(Options::default(), None))
    }

    /// Every option set (the OTLP endpoint when there is one), from concrete
    /// settings.
    pub fn from_daemon(daemon: &DaemonConfig) -> Options {
        let config = &daemon.coordinator;
        Options {
            listen: Some(config.listen),
            admin_listen: Some(config.admin_listen),
            data_dir: Some(config.data_dir.clone()),
            default_timeout: Some(config.default_timeout),
            max_timeout: Some(config.max_timeout),
            prepare_timeout: Some(config.prepare_timeout),
            retention: Some(config.retention),
            drain_timeout: Some(config.drain_timeout),
            max_branches: Some(config.max_branches),
            max_payload_bytes: Some(config.max_payload_bytes),
            one_phase: Some(config.one_phase),
            log_format: Some(daemon.log_format),
            log: Some(daemon.log.clone()),
            otlp_endpoint: daemon.otlp_endpoint.clone(),
        }
    }

    /// This layer over `lower`: each option set here wins, the others come
    /// from `lower`.
    pub fn or(self, lower: Options) -> Options {
        Options {
            listen: self.listen.or(lower.listen),
            admin_listen: self.admin_listen.or(lower.admin_listen),
            data_dir: self.data_dir.or(lower.data_dir),
            default_timeout: self.default_timeout.or(lower.default_timeout),
            max_timeout: self.max_timeout.or(lower.max_timeout),
            prepare_timeout: self.prepare_timeout.or(lower.prepare_timeout),
            retention: self.retention.or(lower.retention),
            drain_timeout: self.drain_timeout.or(lower.drain_timeout),
            max_branches: self.max_branches.or(lower.max_branches),
            max_payload_bytes: self.max_payload_bytes.or(lower.max_payload_bytes),
            one_phase: self.one_phase.or(lower.one_phase),
            log_format: self.log_format.or(lower.log_format),
            log: self.log.or(lower.log),
            otlp_endpoint: self.otlp_endpoint.or(lower.otlp_endpoint),
        }
    }

    /// Parses a TOML configuration file's text; `path` only names it in
    /// errors.
    pub fn from_toml(text: &str, path: &Path) -> Result<Options, ConfigError> {
        toml::from_str(text).map_err(|e| {
            let (line, column) = e.span().map_or((0, 0), |span| line_column(text, span.start));
            ConfigError::Parse { path: path.to_owned(), line, column, message: one_line(e.message()) }
        })
    }

    /// Reads and parses the TOML configuration file at `path`.
    pub fn from_file(path: &Path) -> Result<Options, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.to_owned(), source })?;
        Options::from_toml(&text, path)
    }

    /// The layer as a TOML document (options not set are left out).
    pub fn to_toml(&self) -> String {
        // Every field is a string, a number or an enum rendered as a
        // string, so this cannot fail; a path that is not UTF-8 is the one
        // exception, and it is shown lossily rather than dropped.
        toml::to_string(self).unwrap_or_else(|_| {
            let mut lossy = self.clone();
            lossy.data_dir = self.data_dir.as_ref().map(|p| PathBuf::from(p.to_string_lossy().into_owned()));
            toml::to_string(&lossy).unwrap_or_default()
        })
    }
}

/// Everything the daemon runs with, every option resolved.
#[derive(Debug, Clone)]
pub struct DaemonConfig {
    /// The coordinator's settings, handed to [`crate::run_with_admin`].
    pub coordinator: Config,
    /// How logs are written.
    pub log_format: LogFormat,
    /// The log filter.
    pub log: String,
    /// Where trace spans are exported (OTLP gRPC), if anywhere.
    pub otlp_endpoint: Option<String>,
}

impl DaemonConfig {
    /// Resolves the layers: `flags_and_env` (as clap parsed them: a flag, or
    /// else its environment variable) over `file` (the `--config` file, if
    /// any) over the defaults.
    pub fn resolve(flags_and_env: Options, file: Option<Options>) -> DaemonConfig {
        let d = Config::default();
        let o = flags_and_env.or(file.unwrap_or_default());
        DaemonConfig {
            coordinator: Config {
                listen: o.listen.unwrap_or(d.listen),
                admin_listen: o.admin_listen.unwrap_or(d.admin_listen),
                data_dir: o.data_dir.unwrap_or(d.data_dir),
                default_timeout: o.default_timeout.unwrap_or(d.default_timeout),
                max_timeout: o.max_timeout.unwrap_or(d.max_timeout),
                prepare_timeout: o.prepare_timeout.unwrap_or(d.prepare_timeout),
                retention: o.retention.unwrap_or(d.retention),
                drain_timeout: o.drain_timeout.unwrap_or(d.drain_timeout),
                max_branches: o.max_branches.unwrap_or(d.max_branches),
                max_payload_bytes: o.max_payload_bytes.unwrap_or(d.max_payload_bytes),
                one_phase: o.one_phase.unwrap_or(d.one_phase),
            },
            log_format: o.log_format.unwrap_or(LogFormat::Auto),
            log: o.log.unwrap_or_else(|| "info".to_owned()),
            otlp_endpoint: o.otlp_endpoint.filter(|e| !e.trim().is_empty()),
        }
    }

    /// Checks the values against each other; the error is one line naming
    /// the options concerned.
    pub fn validate(&self) -> Result<(), String> {
        let c = &self.coordinator;
        let zero = std::time::Duration::ZERO;
        if c.max_timeout == zero || c.default_timeout == zero || c.prepare_timeout == zero {
            return Err("max_timeout, default_timeout and prepare_timeout must be above zero".into());
        }
        if c.default_timeout > c.max_timeout {
            return Err(format!(
                "default_timeout ({}) is above max_timeout ({})",
                humantime::format_duration(c.default_timeout),
                humantime::format_duration(c.max_timeout)
            ));
        }
        if c.max_branches == 0 || c.max_payload_bytes == 0 {
            return Err("max_branches and max_payload_bytes must be above zero".into());
        }
        if c.max_branches.saturating_mul(c.max_payload_bytes) > 256 << 20 {
            return Err("max_branches x max_payload_bytes must stay within 256 MiB (the largest Execute accepted)".into());
        }
        if let Some(e) = &self.otlp_endpoint
            && !(e.starts_with("http://") || e.starts_with("https://"))
        {
            return Err(format!("otlp_endpoint {e:?} must be an http:// or https:// URL"));
        }
        Ok(())
    }

    /// The effective configuration as a TOML document that, used as the
    /// `--config` file, reproduces it.
    pub fn to_toml(&self) -> String {
        Options::from_daemon(self).to_toml()
    }
}

/// 1-based line and column of byte `offset` in `text`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let before = text.get(..offset).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().map_or(0, |l| l.chars().count()) + 1;
    (line, column)
}

fn one_line(message: &str) -> String {
    message.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Durations in the file as humantime strings ("10s", "5m", "1h 30m").
mod human_duration {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_str(&humantime::format_duration(*d).to_string()),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text)
            .map(Some)
            .map_err(|e| serde::de::Error::custom(format!("invalid duration {text:?} ({e}); write it like \"10s\", \"5m\" or \"1h 30m\"")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layers_stack_and_round_trip() {
        let file = Options::from_toml("default_timeout = \"7s\"\nmax_branches = 10\n", Path::new("c.toml")).expect("parses");
        let flags = Options { max_branches: Some(20), ..Options::default() };
        let d = DaemonConfig::resolve(flags, Some(file));
        assert_eq!(d.coordinator.default_timeout, Duration::from_secs(7));
        assert_eq!(d.coordinator.max_branches, 20);
        assert_eq!(d.coordinator.max_timeout, Duration::from_secs(300));
        let shown = d.to_toml();
        let again = Options::from_toml(&shown, Path::new("shown.toml")).expect("config show output parses back");
        assert_eq!(again, Options::from_daemon(&d));
    }

    #[test]
    fn errors_are_one_line_with_a_position() {
        for (text, needle) in [
            ("default_timeout = \"7s\"\nbogus = 1\n", "unknown field `bogus`"),
            ("max_branches = \"many\"\n", "invalid type"),
            ("retention = \"7 parsecs\"\n", "invalid duration"),
            ("listen = [\n", ""),
        ] {
            let e = Options::from_toml(text, Path::new("c.toml")).expect_err(text).to_string();
            assert!(!e.contains('\n'), "{e:?}");
            assert!(e.starts_with("c.toml:") && e.contains(needle), "{e:?}");
        }
        let e = Options::from_toml("max_branches = 1\nbogus = 2\n", Path::new("c.toml")).expect_err("unknown key");
        assert!(e.to_string().starts_with("c.toml:2:1: unknown field `bogus`"), "{e}");
    }
}
