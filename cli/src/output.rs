//! Output shared by every command: a table or JSON on stdout, colour and quietness settings, and
//! the one rule for a closed stdout.
//!
//! Nothing here panics when stdout goes away (`meshgate routes | head -1`): every write returns
//! [`StdoutClosed`] on a broken pipe, commands pass it up with `?`, and `main` exits quietly with
//! status 141 (128 + SIGPIPE, what a shell reports for a program killed by SIGPIPE).

use std::{
    fmt,
    io::{IsTerminal as _, Write as _},
    sync::OnceLock,
};

use clap::ValueEnum;
use serde::Serialize;

/// `-o table|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// Exit status when stdout closed before everything was written: 128 + SIGPIPE (13).
pub(crate) const EXIT_STDOUT_CLOSED: u8 = 141;

/// The reader of stdout went away (EPIPE). Not an error to report: `main` exits with
/// [`EXIT_STDOUT_CLOSED`] and prints nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StdoutClosed;

impl fmt::Display for StdoutClosed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("stdout was closed")
    }
}

impl std::error::Error for StdoutClosed {}

/// Settings every command reads: set once in `main`.
#[derive(Debug, Clone, Copy, Default)]
struct Settings {
    color: bool,
    quiet: bool,
}

static SETTINGS: OnceLock<Settings> = OnceLock::new();

/// Whether colour may be used: not with `--no-color`, not when `NO_COLOR` is set to anything
/// non-empty (<https://no-color.org>), and only on a terminal.
pub(crate) fn color_wanted(no_color_flag: bool, terminal: bool) -> bool {
    let env_off = std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty());
    !no_color_flag && !env_off && terminal
}

/// Records `--no-color`/`NO_COLOR` and `--quiet` for the whole process.
pub(crate) fn init(no_color: bool, quiet: bool) {
    let color = color_wanted(no_color, std::io::stderr().is_terminal());
    let _ = SETTINGS.set(Settings { color, quiet });
}

fn settings() -> Settings {
    SETTINGS.get().copied().unwrap_or_default()
}

/// `--quiet`: print only what a script needs (or nothing on success).
pub(crate) fn quiet() -> bool {
    settings().quiet
}

/// Whether stderr output may carry ANSI colour.
pub(crate) fn color() -> bool {
    settings().color
}

/// The kinds of highlighted words in messages.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Paint {
    /// `error`
    Error,
    /// `warning`
    Warning,
    /// `hint`
    Hint,
}

/// `word` in the colour of `paint` when colour is on, else as is.
pub(crate) fn paint(paint: Paint, word: &str) -> String {
    if !color() {
        return word.to_owned();
    }
    let code = match paint {
        Paint::Error => "1;31",
        Paint::Warning => "1;33",
        Paint::Hint => "36",
    };
    format!("\x1b[{code}m{word}\x1b[0m")
}

/// Writes `args` and a newline to stdout; a closed stdout is [`StdoutClosed`].
pub(crate) fn write_line(args: fmt::Arguments<'_>) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_fmt(args)
        .and_then(|()| out.write_all(b"\n"))
        .map_err(stdout_error)
}

/// Writes raw bytes to stdout and flushes; a closed stdout is [`StdoutClosed`].
pub(crate) fn write_bytes(bytes: &[u8]) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(bytes)
        .and_then(|()| out.flush())
        .map_err(stdout_error)
}

/// Flushes stdout (before waiting for a long time, e.g. `dev` after its banner).
pub(crate) fn flush() -> anyhow::Result<()> {
    std::io::stdout().lock().flush().map_err(stdout_error)
}

fn stdout_error(e: std::io::Error) -> anyhow::Error {
    if e.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(e).context("cannot write to stdout")
    }
}

/// `println!` that never panics: a closed stdout returns [`StdoutClosed`] from the enclosing
/// function (which must return `anyhow::Result`).
#[macro_export]
macro_rules! outln {
    () => {
        $crate::output::write_line(format_args!(""))?
    };
    ($($arg:tt)*) => {
        $crate::output::write_line(format_args!($($arg)*))?
    };
}

/// Pretty JSON on stdout.
pub(crate) fn print_json(v: &impl Serialize) -> anyhow::Result<()> {
    let text = serde_json::to_string_pretty(v)?;
    write_line(format_args!("{text}"))
}

/// Prints rows as left-aligned columns under `headers`.
pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) -> anyhow::Result<()> {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        s.trim_end().to_owned()
    };
    let mut text = line(headers.to_vec());
    text.push('\n');
    for row in rows {
        text.push_str(&line(row.iter().map(String::as_str).collect()));
        text.push('\n');
    }
    write_bytes(text.as_bytes())
}

/// Time left, as people read it: `23h59m`, `4m10s`, `expired` (nothing left).
pub(crate) fn human_left(d: std::time::Duration) -> String {
    if d.as_secs() == 0 {
        return "expired".into();
    }
    human_duration(d)
}

/// `d` in the two largest units (`3d4h`, `2h5m`, `0m7s`).
pub(crate) fn human_duration(d: std::time::Duration) -> String {
    let s = d.as_secs();
    let (days, h, m, sec) = (s / 86400, s / 3600 % 24, s / 60 % 60, s % 60);
    if days > 0 {
        format!("{days}d{h}h")
    } else if h > 0 {
        format!("{h}h{m}m")
    } else {
        format!("{m}m{sec}s")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn human_durations() {
        for (secs, want) in [
            (0, "expired"),
            (59, "0m59s"),
            (3599, "59m59s"),
            (86399, "23h59m"),
            (90000, "1d1h"),
        ] {
            assert_eq!(human_left(Duration::from_secs(secs)), want);
        }
    }

    #[test]
    fn broken_pipe_is_its_own_error() {
        let e = stdout_error(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(e.downcast_ref::<StdoutClosed>().is_some());
        let e = stdout_error(std::io::Error::from(std::io::ErrorKind::StorageFull));
        assert!(e.downcast_ref::<StdoutClosed>().is_none());
        assert!(format!("{e:#}").starts_with("cannot write to stdout"));
    }
}
