//! Crash points: named places in the drivers where a test can make the
//! process die at an exact step, as if killed there.
//!
//! `crash_point!("coordinator::after_decision_durable")` compiles to nothing
//! unless this crate's `failpoints` feature is on (the workspace's test
//! build turns it on; a build of the daemon or a service on its own does
//! not). With the feature, a point armed through the `FAILPOINTS`
//! environment variable (`name=return`, or `2*off->return` to fire on the
//! third pass; the `fail` crate's syntax) prints one line to stderr and
//! aborts the process: no destructor runs, nothing more is flushed — the
//! same as SIGKILL at that line. Writes already handed to the OS survive,
//! as they would a process crash.

pub use fail;

/// Aborts the process here when the named crash point is armed. See the
/// module docs.
#[macro_export]
macro_rules! crash_point {
    ($name:literal) => {
        $crate::crash::fail::fail_point!($name, |_| {
            eprintln!("twopc: crash point {} reached; aborting the process", $name);
            ::std::process::abort()
        })
    };
}

/// Arms the crash points named in `FAILPOINTS`. Call once at process
/// start. Errors describe a malformed specification; a build without crash
/// points ignores the variable with a warning.
pub fn arm_from_env() -> Result<(), String> {
    let Ok(spec) = std::env::var("FAILPOINTS") else { return Ok(()) };
    if spec.trim().is_empty() {
        return Ok(());
    }
    #[cfg(feature = "failpoints")]
    {
        for item in spec.split(';').map(str::trim).filter(|i| !i.is_empty()) {
            let (name, actions) = item.split_once('=').ok_or_else(|| format!("FAILPOINTS entry {item:?} is not NAME=ACTIONS"))?;
            fail::cfg(name, actions).map_err(|e| format!("FAILPOINTS entry {item:?}: {e}"))?;
        }
        Ok(())
    }
    #[cfg(not(feature = "failpoints"))]
    {
        eprintln!("twopc: FAILPOINTS is set but this build has no crash points; ignoring it");
        Ok(())
    }
}
