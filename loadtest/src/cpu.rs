//! CPU time spent during a scenario by the server, its PostgreSQL and this
//! load tool, read from `/proc`: all three share the machine's cores, so a
//! request's cost is the sum, and where it goes says what to work on.
//! Per request, these figures move much less from run to run than
//! throughput does.

use std::path::PathBuf;

use serde_json::{Value, json};

/// Which processes to count.
pub struct CpuMeter {
    server: Option<u32>,
    postmaster_pid_file: Option<PathBuf>,
    ticks_per_second: f64,
}

/// CPU seconds used so far (user + system), per process group.
#[derive(Clone, Copy)]
pub struct CpuSample {
    server: Option<f64>,
    /// The server's time in the kernel (its share of `server`).
    server_kernel: Option<f64>,
    postgres: Option<f64>,
    load_tool: Option<f64>,
}

/// Fields of `/proc/PID/stat` after the command name: (ppid, utime +
/// stime, cutime + cstime).
fn stat(pid: &str) -> Option<(u32, u64, u64)> {
    stat_fields(pid).map(|(ppid, user, system, children)| (ppid, user + system, children))
}

/// (ppid, utime, stime, cutime + cstime) of `/proc/PID/stat`.
fn stat_fields(pid: &str) -> Option<(u32, u64, u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may hold spaces and parentheses: skip past the last ')'.
    let fields: Vec<&str> = text.rsplit_once(')')?.1.split_whitespace().collect();
    let number = |index: usize| fields.get(index)?.parse::<u64>().ok();
    let ppid = u32::try_from(number(1)?).ok()?;
    Some((ppid, number(11)?, number(12)?, number(13)? + number(14)?))
}

impl CpuMeter {
    /// Counts `server` (a process id) and the PostgreSQL whose data
    /// directory is `pgdata`, when known; this process always.
    pub fn new(server: Option<u32>, pgdata: Option<PathBuf>) -> Self {
        Self {
            server,
            postmaster_pid_file: pgdata.map(|dir| dir.join("postmaster.pid")),
            ticks_per_second: rustix::param::clock_ticks_per_second() as f64,
        }
    }

    /// What each group has used so far.
    pub fn sample(&self) -> CpuSample {
        CpuSample {
            server: self
                .server
                .and_then(|pid| stat(&pid.to_string()))
                .map(|(_, own, _)| own as f64 / self.ticks_per_second),
            server_kernel: self
                .server
                .and_then(|pid| stat_fields(&pid.to_string()))
                .map(|(_, _, system, _)| system as f64 / self.ticks_per_second),
            postgres: self
                .postgres()
                .map(|ticks| ticks as f64 / self.ticks_per_second),
            // Nanoseconds, not /proc's 10 ms ticks: a smoke-sized run of
            // this process can use less than one tick.
            load_tool: Some(seconds(rustix::time::clock_gettime(
                rustix::time::ClockId::ProcessCPUTime,
            ))),
        }
    }

    /// The postmaster, the backends it has reaped, and those still running.
    fn postgres(&self) -> Option<u64> {
        let file = std::fs::read_to_string(self.postmaster_pid_file.as_ref()?).ok()?;
        let postmaster: u32 = file.lines().next()?.trim().parse().ok()?;
        let (_, own, reaped) = stat(&postmaster.to_string())?;
        let children: u64 = std::fs::read_dir("/proc")
            .ok()?
            .filter_map(Result::ok)
            .filter_map(|entry| {
                let name = entry.file_name();
                let pid = name.to_str()?;
                pid.bytes()
                    .all(|byte| byte.is_ascii_digit())
                    .then_some(())?;
                let (ppid, time, _) = stat(pid)?;
                (ppid == postmaster).then_some(time)
            })
            .sum();
        Some(own + reaped + children)
    }

    /// Microseconds of CPU per request (or transaction) between `before`
    /// and `after`, by group.
    pub fn per_request(&self, before: CpuSample, after: CpuSample, requests: u64) -> Value {
        let each = |before: Option<f64>, after: Option<f64>| {
            let used = after? - before?;
            (requests > 0).then(|| used * 1e6 / requests as f64)
        };
        json!({
            "server": each(before.server, after.server),
            // Of which in the kernel: on loopback a socket write also runs
            // the receiving side's TCP processing, which no server change
            // removes.
            "server_kernel": each(before.server_kernel, after.server_kernel),
            "postgres": each(before.postgres, after.postgres),
            "load_tool": each(before.load_tool, after.load_tool),
        })
    }
}

fn seconds(time: rustix::time::Timespec) -> f64 {
    time.tv_sec as f64 + time.tv_nsec as f64 / 1e9
}
