//! What the server logs, captured for one test. A `#[tokio::test]` runs
//! on one thread, and so do the tasks of the server it spawns, so lines
//! logged on the test's thread are the test's. One global subscriber
//! (installed on first use) writes each line to the capture of the thread
//! that logged it, if any: thread-scoped subscribers would not do, since
//! tracing caches per call site whether anyone listens, across threads.

use std::cell::RefCell;
use std::io::Write;
use std::sync::{Arc, Mutex, Once};

thread_local! {
    static CAPTURE: RefCell<Option<Arc<Mutex<Vec<u8>>>>> = const { RefCell::new(None) };
}

/// Log lines written on this thread while the capture is alive.
pub struct LogCapture {
    lines: Arc<Mutex<Vec<u8>>>,
}

struct ThreadSink;

impl Write for ThreadSink {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        CAPTURE.with(|capture| {
            if let Some(lines) = &*capture.borrow() {
                lines.lock().unwrap().extend_from_slice(bytes);
            }
        });
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl LogCapture {
    /// Captures `info` and above logged on this thread until dropped.
    pub fn start() -> LogCapture {
        static INSTALL: Once = Once::new();
        INSTALL.call_once(|| {
            let _ = tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new("info,sqlx=warn"))
                .with_ansi(false)
                .with_writer(|| ThreadSink)
                .try_init();
        });
        let lines = Arc::new(Mutex::new(Vec::new()));
        CAPTURE.with(|capture| *capture.borrow_mut() = Some(lines.clone()));
        LogCapture { lines }
    }

    /// Everything captured so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.lines.lock().unwrap()).into_owned()
    }
}

impl Drop for LogCapture {
    fn drop(&mut self) {
        CAPTURE.with(|capture| *capture.borrow_mut() = None);
    }
}
