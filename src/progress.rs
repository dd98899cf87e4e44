//! A one-line progress bar for long work on the terminal: done/total, a bar, the rate (it/s or
//! s/it) and the time left. It draws on standard error only when that is a terminal, at most
//! ten times a second, and stays quiet otherwise (logs, pipes, CI).

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

/// A progress bar over `total` units of work.
pub struct Progress {
    label: String,
    total: usize,
    start: Instant,
    last_draw: Option<Instant>,
    enabled: bool,
    /// Shown after the rate (e.g. the smoothed loss).
    note: String,
}

impl Progress {
    /// A bar labelled `label`, shown when standard error is a terminal.
    pub fn new(label: &str, total: usize) -> Progress {
        Progress::with_output(label, total, std::io::stderr().is_terminal())
    }

    /// As [`Progress::new`], shown or not as `enabled` says.
    pub fn with_output(label: &str, total: usize, enabled: bool) -> Progress {
        Progress { label: label.to_string(), total, start: Instant::now(), last_draw: None, enabled, note: String::new() }
    }

    /// Sets the text shown after the rate (e.g. "loss 0.1234").
    pub fn set_note(&mut self, note: &str) {
        self.note = note.to_string();
    }

    /// Restarts the clock (after set-up work that should not count towards the rate).
    pub fn restart(&mut self) {
        self.start = Instant::now();
    }

    /// Reports `done` units finished (of `total`, which may be updated).
    pub fn update(&mut self, done: usize, total: usize) {
        self.total = total;
        if !self.enabled {
            return;
        }
        let now = Instant::now();
        let due = self.last_draw.is_none_or(|t| now - t >= Duration::from_millis(100));
        if !due && done < total {
            return;
        }
        self.last_draw = Some(now);
        let line = self.line(done, now - self.start);
        let mut err = std::io::stderr().lock();
        let _ = write!(err, "\r{line}\x1b[K");
        let _ = err.flush();
    }

    /// Ends the bar's line.
    pub fn finish(&mut self) {
        if self.enabled && self.last_draw.is_some() {
            let _ = writeln!(std::io::stderr());
        }
        self.last_draw = None;
    }

    /// The text of the bar after `elapsed` with `done` units finished.
    pub fn line(&self, done: usize, elapsed: Duration) -> String {
        const WIDTH: usize = 30;
        let total = self.total.max(1);
        let done = done.min(total);
        let filled = done * WIDTH / total;
        let bar: String = "#".repeat(filled) + &"-".repeat(WIDTH - filled);
        let secs = elapsed.as_secs_f64();
        let rate = if done > 0 && secs > 0.0 {
            let r = done as f64 / secs;
            if r >= 1.0 { format!("{r:.2} it/s") } else { format!("{:.2} s/it", 1.0 / r) }
        } else {
            "-- it/s".to_string()
        };
        let eta = if done > 0 && done < total {
            format!(", ETA {}", clock(secs / done as f64 * (total - done) as f64))
        } else {
            String::new()
        };
        let note = if self.note.is_empty() { String::new() } else { format!(", {}", self.note) };
        format!("{} {done}/{total} [{bar}] {rate}{note}, {}{eta}", self.label, clock(secs))
    }
}

/// Seconds as m:ss (or h:mm:ss).
pub fn clock(secs: f64) -> String {
    let s = secs.round() as u64;
    if s >= 3600 { format!("{}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60) } else { format!("{}:{:02}", s / 60, s % 60) }
}
