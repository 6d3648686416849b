//! Progress on the commands that wait (`install`, `upgrade`, `route split|promote --wait`, the
//! demo): a bar or a spinner drawn by indicatif on stderr when stderr is a terminal. With no
//! terminal (a log, CI, a test) nothing is drawn and each new status is a line of the command's
//! output instead, so what was waited for stays on record.

use std::fmt::Display;
use std::io::Write;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a spinner turns while nothing else changes.
const TICK: Duration = Duration::from_millis(120);

/// A bar or a spinner; cleared when dropped.
#[derive(Debug)]
pub struct Progress {
    bar: ProgressBar,
}

impl Progress {
    /// A bar of `len` steps on stderr (drawn only on a terminal).
    pub fn bar(len: u64) -> Self {
        Self::on(
            ProgressBar::with_draw_target(Some(len), ProgressDrawTarget::stderr()),
            "[{bar:24}] {pos:>2}/{len} {wide_msg}",
        )
    }

    /// A spinner on stderr (drawn only on a terminal), for a wait of unknown length.
    pub fn spinner() -> Self {
        Self::on(
            ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
            "{spinner} {elapsed:>3} {wide_msg}",
        )
    }

    /// One that never draws: every status is a line of the output.
    pub fn hidden() -> Self {
        Self {
            bar: ProgressBar::hidden(),
        }
    }

    fn on(bar: ProgressBar, template: &str) -> Self {
        if !bar.is_hidden() {
            // The templates are constants; were one refused, the default style still shows
            // the position and message.
            if let Ok(style) = ProgressStyle::with_template(template) {
                bar.set_style(style.progress_chars("#>-"));
            }
            bar.enable_steady_tick(TICK);
        }
        Self { bar }
    }

    /// Whether statuses are lines of the output (nothing is drawn).
    pub fn is_plain(&self) -> bool {
        self.bar.is_hidden()
    }

    /// Writes `line` to the command's output, above the bar.
    pub fn line(&self, out: &mut dyn Write, line: impl Display) -> std::io::Result<()> {
        self.bar.suspend(|| writeln!(out, "{line}"))
    }

    /// What is being waited for now: the bar's message on a terminal, otherwise an indented
    /// line of the output.
    pub fn status(&self, out: &mut dyn Write, status: &str) -> std::io::Result<()> {
        if self.is_plain() {
            writeln!(out, "        {status}")
        } else {
            self.bar.set_message(status.to_owned());
            Ok(())
        }
    }

    /// What is being waited for now, on a terminal only: for a command whose output already
    /// says it in its own words.
    pub fn message(&self, message: &str) {
        self.bar.set_message(message.to_owned());
    }

    /// One step done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }

    /// `inner` as a writer whose whole lines are written with the bar out of the way.
    pub fn around<'a>(&'a self, inner: &'a mut dyn Write) -> Around<'a> {
        Around {
            bar: &self.bar,
            inner,
            pending: Vec::new(),
        }
    }
}

/// A writer beside a bar ([`Progress::around`]): it keeps a partial line until its end, so
/// the bar is never drawn in the middle of one.
pub struct Around<'a> {
    bar: &'a ProgressBar,
    inner: &'a mut dyn Write,
    pending: Vec<u8>,
}

impl std::fmt::Debug for Around<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Around")
            .field("pending", &String::from_utf8_lossy(&self.pending))
            .finish_non_exhaustive()
    }
}

impl Around<'_> {
    fn write_lines(&mut self, all: bool) -> std::io::Result<()> {
        let end = if all {
            self.pending.len()
        } else {
            match self.pending.iter().rposition(|b| *b == b'\n') {
                Some(i) => i + 1,
                None => return Ok(()),
            }
        };
        let lines: Vec<u8> = self.pending.drain(..end).collect();
        let inner = &mut self.inner;
        self.bar.suspend(|| {
            inner.write_all(&lines)?;
            inner.flush()
        })
    }
}

impl Write for Around<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.pending.extend_from_slice(buf);
        self.write_lines(false)?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.write_lines(true)
    }
}

impl Drop for Around<'_> {
    fn drop(&mut self) {
        // Nothing is left to report a failure to: the output is gone.
        let _ = self.write_lines(true);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn beside_a_bar_lines_are_written_whole_and_the_rest_at_the_end() {
        let progress = Progress::hidden();
        let mut out = Vec::new();
        {
            let mut w = progress.around(&mut out);
            write!(w, "step 1: ").expect("write");
            write!(w, "v1").expect("write");
            assert!(w.pending == b"step 1: v1", "a partial line waits");
            write!(w, " at 100 %\nmeasuring").expect("write");
            assert_eq!(w.pending, b"measuring");
        }
        assert_eq!(out, b"step 1: v1 at 100 %\nmeasuring");
        // Without a terminal a status is a line of the output; a message is not.
        let mut out = Vec::new();
        progress.status(&mut out, "waiting for x").expect("status");
        progress.message("measuring");
        assert_eq!(out, b"        waiting for x\n");
    }
}
