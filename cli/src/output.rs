//! Output formats shared by every inspecting command: a table for people, JSON for scripts.

use clap::ValueEnum;

/// `-o table|json`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, Default)]
pub(crate) enum Output {
    /// Aligned columns for people.
    #[default]
    Table,
    /// JSON for scripts.
    Json,
}

/// Prints rows as left-aligned columns under `headers`.
pub(crate) fn print_table(headers: &[&str], rows: &[Vec<String>]) {
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
        println!("{}", s.trim_end());
    };
    line(headers.to_vec());
    for row in rows {
        line(row.iter().map(String::as_str).collect());
    }
}

/// A duration as people read it: `23h59m`, `4m10s`, `expired`.
pub(crate) fn human_left(d: std::time::Duration) -> String {
    let s = d.as_secs();
    if s == 0 {
        return "expired".into();
    }
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
}
