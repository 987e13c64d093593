//! The job as a child process: started in a process group of its own,
//! its standard error passed through and its tail kept, the wrapper's
//! SIGINT and SIGTERM passed on to it, and its end.
//!
//! A process group of its own, so that a signal reaches everything the job
//! started (a shell script's children too) and the group can be killed
//! whole if it does not stop; a terminal's Ctrl-C then reaches the wrapper
//! only, which passes it on.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rustix::process::{Pid, Signal};
use tokio::process::Child;
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::oneshot;

use super::{RESULT_VAR, TOKEN_VAR};

/// Most lines of standard error kept for the failure's error.
pub const TAIL_LINES: usize = 20;
/// Most bytes of standard error kept for the failure's error.
pub const TAIL_BYTES: usize = 4 * 1024;
/// How long the end of standard error is waited for once the job has
/// exited.
const STDERR_AFTER_EXIT: Duration = Duration::from_secs(1);

/// The wrapper's SIGINT and SIGTERM, as they arrive.
pub struct Signals {
    interrupt: tokio::signal::unix::Signal,
    terminate: tokio::signal::unix::Signal,
}

impl Signals {
    /// Handles SIGINT and SIGTERM from now on, instead of dying of them.
    pub fn listen() -> std::io::Result<Self> {
        Ok(Self {
            interrupt: signal(SignalKind::interrupt())?,
            terminate: signal(SignalKind::terminate())?,
        })
    }

    /// The next one received.
    pub async fn recv(&mut self) -> Signal {
        tokio::select! {
            _ = self.interrupt.recv() => Signal::INT,
            _ = self.terminate.recv() => Signal::TERM,
        }
    }
}

/// How the job's process ended.
#[derive(Debug)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal (its number) killed it.
    Killed(i32),
    /// It could not be started.
    NotStarted {
        /// The program.
        program: String,
        /// Why.
        error: std::io::Error,
    },
}

/// The job's end, as the run records it.
#[derive(Debug)]
pub struct JobEnd {
    /// How its process ended.
    pub exit: Exit,
    /// The signal the wrapper received and passed on, if it was told to
    /// stop.
    pub stopped_by: Option<Signal>,
    /// Whether it was killed (SIGKILL) for not stopping within the grace
    /// period.
    pub killed: bool,
    /// The last lines of its standard error.
    pub stderr_tail: String,
}

impl JobEnd {
    /// A job whose program could not be started.
    pub fn not_started(command: &[OsString], error: std::io::Error) -> Self {
        let program = command
            .first()
            .map(|program| program.to_string_lossy().into_owned())
            .unwrap_or_default();
        Self {
            exit: Exit::NotStarted { program, error },
            stopped_by: None,
            killed: false,
            stderr_tail: String::new(),
        }
    }

    /// The wrapper's exit code: the job's, 128 + the signal's number for
    /// a job killed by one (as shells do), and as shells, 127 for a
    /// program not found and 126 for one that cannot be run.
    pub fn exit_code(&self) -> i32 {
        match &self.exit {
            Exit::Code(code) => *code,
            Exit::Killed(signal) => 128 + signal,
            Exit::NotStarted { error, .. } if error.kind() == std::io::ErrorKind::NotFound => 127,
            Exit::NotStarted { .. } => 126,
        }
    }

    /// How it ended, to follow "the job": "exited with code 3".
    pub fn ended(&self) -> String {
        match &self.exit {
            Exit::Code(code) => format!("exited with code {code}"),
            Exit::Killed(signal) => {
                format!("was killed by {} (signal {signal})", signal_name(*signal))
            }
            Exit::NotStarted { program, error } => {
                format!("could not be started ({program}: {error})")
            }
        }
    }

    /// A sentence saying how the job ended.
    pub fn describe(&self) -> String {
        format!("the job {}", self.ended())
    }
}

/// The job, running.
pub struct Job {
    child: Child,
    /// Its pid, which is also its process group's id.
    group: Option<Pid>,
    tail: Arc<Mutex<Tail>>,
    /// Resolves once its standard error has been copied to the end.
    copied: oneshot::Receiver<()>,
}

/// Starts `command` (a program and its arguments) with the result file's
/// path in its environment, in a process group of its own, with standard
/// input and output inherited and standard error through a pipe.
pub fn spawn(command: &[OsString], result_file: &Path) -> std::io::Result<Job> {
    let Some((program, args)) = command.split_first() else {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "no command",
        ));
    };
    let (reader, writer) = std::io::pipe()?;
    let tail = Arc::new(Mutex::new(Tail::default()));
    let (done, copied) = oneshot::channel();
    // A thread of its own: copying blocks on the wrapper's standard error
    // as long as whoever reads it is slow, and must not hold up the
    // runtime. Started first, so that a job that cannot be started leaves
    // it at end-of-file rather than a job without a reader.
    std::thread::Builder::new()
        .name("job-stderr".into())
        .spawn({
            let tail = Arc::clone(&tail);
            move || {
                tee(reader, &tail);
                let _ = done.send(());
            }
        })?;
    let mut job = tokio::process::Command::new(program);
    job.args(args)
        .env(RESULT_VAR, result_file)
        // The token is the wrapper's; the job has no use for it.
        .env_remove(TOKEN_VAR)
        .stdin(std::process::Stdio::inherit())
        .stdout(std::process::Stdio::inherit())
        .stderr(writer)
        .process_group(0);
    let spawned = job.spawn();
    // Closes the wrapper's copy of the pipe's writing end: the copying
    // ends when the job's copies close.
    drop(job);
    let child = spawned?;
    let group = child
        .id()
        .and_then(|pid| i32::try_from(pid).ok())
        .and_then(Pid::from_raw);
    Ok(Job {
        child,
        group,
        tail,
        copied,
    })
}

impl Job {
    /// Waits for the job to end, passing on every SIGINT and SIGTERM the
    /// wrapper receives to its process group; a job still running `grace`
    /// after the first is killed with its group.
    pub async fn wait(mut self, signals: &mut Signals, grace: Duration) -> JobEnd {
        let mut stopped_by = None;
        let mut kill_at = None;
        let mut killed = false;
        let status = loop {
            tokio::select! {
                status = self.child.wait() => break status,
                received = signals.recv() => {
                    self.signal(received);
                    if stopped_by.is_none() {
                        stopped_by = Some(received);
                        kill_at = Some(tokio::time::Instant::now() + grace);
                    }
                }
                () = sleep_until(kill_at) => {
                    super::say(format_args!(
                        "the job did not stop within {} s of {}: killing it (SIGKILL)",
                        grace.as_secs(),
                        signal_name(stopped_by.map_or(0, Signal::as_raw))
                    ));
                    self.signal(Signal::KILL);
                    killed = true;
                    kill_at = None;
                }
            }
        };
        if stopped_by.is_some() {
            // Told to stop: nothing the job started outlives it.
            self.signal(Signal::KILL);
        }
        let exit = match status {
            Ok(status) => match (status.code(), status.signal()) {
                (Some(code), _) => Exit::Code(code),
                (None, Some(signal)) => Exit::Killed(signal),
                (None, None) => Exit::Code(1),
            },
            Err(error) => Exit::NotStarted {
                program: "the job".into(),
                error,
            },
        };
        // A process the job left running may hold the pipe open; its later
        // lines go unread once the wrapper has exited.
        let _ = tokio::time::timeout(STDERR_AFTER_EXIT, self.copied).await;
        let stderr_tail = self.tail.lock().map(|tail| tail.text()).unwrap_or_default();
        JobEnd {
            exit,
            stopped_by,
            killed,
            stderr_tail,
        }
    }

    /// Sends `signal` to the job's process group, then SIGCONT, so that a
    /// stopped job wakes to handle it. A group that is gone is no error.
    fn signal(&self, signal: Signal) {
        let Some(group) = self.group else {
            return;
        };
        let _ = rustix::process::kill_process_group(group, signal);
        if signal != Signal::KILL {
            let _ = rustix::process::kill_process_group(group, Signal::CONT);
        }
    }
}

async fn sleep_until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Copies the job's standard error to the wrapper's as it comes, keeping
/// its tail. A closed standard error of the wrapper's stops the copying,
/// not the reading, so the job never blocks on a full pipe.
fn tee(mut from: std::io::PipeReader, tail: &Mutex<Tail>) {
    let mut out = std::io::stderr();
    let mut passing = true;
    let mut buffer = [0u8; 8 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) => break,
            Ok(read) => read,
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let chunk = &buffer[..read];
        if passing {
            passing = out.write_all(chunk).is_ok();
        }
        if let Ok(mut tail) = tail.lock() {
            tail.push(chunk);
        }
    }
}

/// The last bytes of a stream, enough for [`TAIL_LINES`] lines within
/// [`TAIL_BYTES`].
#[derive(Debug, Default)]
pub struct Tail {
    bytes: VecDeque<u8>,
    cut: bool,
}

impl Tail {
    /// Adds `chunk`, forgetting what falls out of the window.
    pub fn push(&mut self, chunk: &[u8]) {
        self.bytes.extend(chunk);
        let excess = self.bytes.len().saturating_sub(TAIL_BYTES);
        if excess > 0 {
            self.bytes.drain(..excess);
            self.cut = true;
        }
    }

    /// The last lines, as text (invalid UTF-8 replaced), "…" in front when
    /// the first line shown is not whole.
    pub fn text(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let bytes = [front, back].concat();
        let text = String::from_utf8_lossy(&bytes);
        let text = text.trim_end();
        // A line cut by the byte window starts mid-way; so may a character.
        let mut lines: Vec<&str> = text.lines().collect();
        let mut cut = self.cut;
        if lines.len() > TAIL_LINES {
            lines.drain(..lines.len() - TAIL_LINES);
            cut = true;
        } else if cut && let Some(first) = lines.first_mut() {
            *first = first.trim_start_matches('\u{FFFD}');
        }
        let text = lines.join("\n");
        if cut && !text.is_empty() {
            format!("…{text}")
        } else {
            text
        }
    }
}

/// A signal's name by its number: `SIGTERM`, or `signal 42` for one
/// without a name here.
pub fn signal_name(number: i32) -> String {
    const NAMES: [(Signal, &str); 20] = [
        (Signal::HUP, "SIGHUP"),
        (Signal::INT, "SIGINT"),
        (Signal::QUIT, "SIGQUIT"),
        (Signal::ILL, "SIGILL"),
        (Signal::TRAP, "SIGTRAP"),
        (Signal::ABORT, "SIGABRT"),
        (Signal::BUS, "SIGBUS"),
        (Signal::FPE, "SIGFPE"),
        (Signal::KILL, "SIGKILL"),
        (Signal::USR1, "SIGUSR1"),
        (Signal::SEGV, "SIGSEGV"),
        (Signal::USR2, "SIGUSR2"),
        (Signal::PIPE, "SIGPIPE"),
        (Signal::ALARM, "SIGALRM"),
        (Signal::TERM, "SIGTERM"),
        (Signal::XCPU, "SIGXCPU"),
        (Signal::XFSZ, "SIGXFSZ"),
        (Signal::VTALARM, "SIGVTALRM"),
        (Signal::PROF, "SIGPROF"),
        (Signal::SYS, "SIGSYS"),
    ];
    NAMES
        .iter()
        .find(|(signal, _)| signal.as_raw() == number)
        .map_or_else(
            || format!("signal {number}"),
            |(_, name)| (*name).to_owned(),
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_keeps_the_last_lines() {
        let mut tail = Tail::default();
        tail.push(b"one\ntwo\n");
        assert_eq!(tail.text(), "one\ntwo");
        for line in 0..30 {
            tail.push(format!("line {line}\n").as_bytes());
        }
        let text = tail.text();
        assert!(text.starts_with("…line 10\n"), "{text}");
        assert!(text.ends_with("line 29"), "{text}");
        assert_eq!(text.lines().count(), TAIL_LINES);
    }

    #[test]
    fn the_tail_keeps_the_last_bytes() {
        let mut tail = Tail::default();
        tail.push(&vec![b'x'; 3 * TAIL_BYTES]);
        tail.push("é\nend\n".as_bytes());
        let text = tail.text();
        assert!(text.len() <= TAIL_BYTES + "…".len(), "{}", text.len());
        assert!(text.starts_with("…x") && text.ends_with("é\nend"));
        // A character cut in half by the window is dropped, not garbled.
        let mut tail = Tail::default();
        tail.push("é".repeat(TAIL_BYTES).as_bytes());
        tail.push(b"z");
        let text = tail.text();
        assert!(text.starts_with("…é") && text.ends_with('z'), "{text}");
        assert!(!text.contains('\u{FFFD}'));
    }

    #[test]
    fn signals_are_named() {
        assert_eq!(signal_name(Signal::TERM.as_raw()), "SIGTERM");
        assert_eq!(signal_name(Signal::KILL.as_raw()), "SIGKILL");
        assert_eq!(signal_name(99), "signal 99");
    }
}
