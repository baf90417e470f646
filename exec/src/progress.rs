//! Progress: bars on a terminal, one line per operator otherwise.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use volley_common::ProgressMode;

use crate::stats::ExecutionStats;

pub(crate) struct Progress {
    bars: Option<(MultiProgress, Vec<ProgressBar>)>,
    lines: bool,
}

impl Progress {
    pub fn new(mode: ProgressMode, names: &[String]) -> Self {
        let tty = std::io::stderr().is_terminal();
        let (bars, lines) = match mode {
            ProgressMode::Off => (false, false),
            ProgressMode::Bars => (true, false),
            ProgressMode::Lines => (false, true),
            ProgressMode::Auto => (tty, !tty),
        };
        let bars = bars.then(|| {
            let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
            let style =
                ProgressStyle::with_template("{prefix:>30} [{bar:30}] {pos}/{len} tasks {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> ");
            let list = names
                .iter()
                .map(|n| {
                    let pb = multi.add(ProgressBar::new(0));
                    pb.set_style(style.clone());
                    pb.set_prefix(truncate(n, 30));
                    pb
                })
                .collect();
            (multi, list)
        });
        Self { bars, lines }
    }

    pub fn update(&self, i: usize, done: usize, total: usize, rows: u64) {
        if let Some((_, bars)) = &self.bars {
            let pb = &bars[i];
            pb.set_length(total as u64);
            pb.set_position(done as u64);
            pb.set_message(format!("{rows} rows"));
        }
    }

    pub fn finish(&self, stats: &ExecutionStats) {
        if let Some((multi, bars)) = &self.bars {
            for pb in bars {
                pb.finish();
            }
            let _ = multi.clear();
        }
        if self.lines {
            for op in &stats.operators {
                eprintln!("volley: {op}");
            }
            if let Some((peak, limit)) = stats.object_store {
                eprintln!(
                    "volley: object stores: peak {} of {} budget",
                    volley_common::format_bytes(peak),
                    volley_common::format_bytes(limit)
                );
            }
        }
    }
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        let tail: String = s
            .chars()
            .rev()
            .take(n - 1)
            .collect::<Vec<_>>()
            .into_iter()
            .rev()
            .collect();
        format!("…{tail}")
    }
}
