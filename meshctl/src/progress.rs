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

    /// One step done.
    pub fn inc(&self) {
        self.bar.inc(1);
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}
