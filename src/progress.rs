//! Progress of long commands (`resync`, `setup`, `repair`, `dr restore`): on a terminal a bar on
//! stderr (done, rate, ETA), redrawn in place; otherwise, for logs and
//! pipes, one plain line every [`PLAIN_EVERY`] and one at the end.
//!
//! Stdout stays the command's result; progress never goes there.

use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a plain progress line is printed when stderr is not a terminal.
pub const PLAIN_EVERY: Duration = Duration::from_secs(10);

enum Output {
    Bar(ProgressBar),
    Plain { every: Duration, last: Instant },
    Hidden,
}

pub struct Progress {
    what: String,
    unit: &'static str,
    total: Option<u64>,
    /// The total is an estimate (shown as `~N`).
    estimated: bool,
    done: u64,
    label: String,
    started: Instant,
    output: Output,
}

impl Progress {
    /// A bar when stderr is a terminal, plain lines otherwise.
    pub fn start(what: &str, unit: &'static str, total: Option<u64>) -> Progress {
        if std::io::stderr().is_terminal() {
            let bar = ProgressBar::with_draw_target(total, ProgressDrawTarget::stderr());
            style(&bar, total.is_some(), false, unit);
            bar.set_prefix(what.to_string());
            bar.enable_steady_tick(Duration::from_millis(200));
            Self::new(what, unit, total, Output::Bar(bar))
        } else {
            Self::plain(what, unit, total, PLAIN_EVERY)
        }
    }

    /// Plain lines every `every` (tests choose a short one).
    pub fn plain(what: &str, unit: &'static str, total: Option<u64>, every: Duration) -> Progress {
        let output = Output::Plain {
            every,
            last: Instant::now(),
        };
        Self::new(what, unit, total, output)
    }

    /// Counts, shows nothing.
    pub fn hidden() -> Progress {
        Self::new("", "", None, Output::Hidden)
    }

    fn new(what: &str, unit: &'static str, total: Option<u64>, output: Output) -> Progress {
        Progress {
            what: what.to_string(),
            unit,
            total,
            estimated: false,
            done: 0,
            label: String::new(),
            started: Instant::now(),
            output,
        }
    }

    /// An estimate of the amount of work, once known.
    pub fn set_total(&mut self, total: u64) {
        self.total = Some(total);
        self.estimated = true;
        if let Output::Bar(bar) = &self.output {
            style(bar, true, true, self.unit);
            bar.set_length(total);
        }
    }

    /// What is being worked on now (a table, a step).
    pub fn set_label(&mut self, label: &str) {
        self.label = label.to_string();
        if let Output::Bar(bar) = &self.output {
            bar.set_message(label.to_string());
        }
    }

    pub fn inc(&mut self, n: u64) {
        self.done += n;
        match &mut self.output {
            Output::Bar(bar) => bar.inc(n),
            Output::Plain { every, last } => {
                if last.elapsed() >= *every {
                    *last = Instant::now();
                    let total = self.total.map(|t| (t, self.estimated));
                    eprintln!(
                        "{}",
                        line(
                            &self.what,
                            self.unit,
                            self.done,
                            total,
                            self.started.elapsed(),
                            &self.label
                        )
                    );
                }
            }
            Output::Hidden => {}
        }
    }

    pub fn done(&self) -> u64 {
        self.done
    }

    /// Clears the bar and prints the last line (plain mode only: on a
    /// terminal the command's own summary follows).
    pub fn finish(&mut self) {
        match &self.output {
            Output::Bar(bar) => bar.finish_and_clear(),
            Output::Plain { .. } => eprintln!(
                "{}",
                line(
                    &self.what,
                    self.unit,
                    self.done,
                    None,
                    self.started.elapsed(),
                    "done"
                )
            ),
            Output::Hidden => {}
        }
        self.output = Output::Hidden;
    }
}

impl Drop for Progress {
    fn drop(&mut self) {
        if let Output::Bar(bar) = &self.output {
            bar.abandon();
        }
    }
}

fn style(bar: &ProgressBar, with_total: bool, estimated: bool, unit: &str) {
    if let Ok(style) = ProgressStyle::with_template(&template(with_total, estimated, unit)) {
        bar.set_style(style.progress_chars("=> "));
    }
}

fn template(with_total: bool, estimated: bool, unit: &str) -> String {
    let about = if estimated { "~" } else { "" };
    if with_total {
        format!("{{prefix}} [{{bar:30}}] {{human_pos}}/{about}{{human_len}} {unit} {{msg}} ({{per_sec}}, ETA {{eta}})")
    } else {
        format!("{{prefix}} {{spinner}} {{human_pos}} {unit} {{msg}} ({{per_sec}})")
    }
}

/// One plain progress line: `resync eu: 1200/~5000 rows (24%), 400 rows/s,
/// ETA 10s, 3.0s elapsed, public.orders`. `total`: the amount of work and
/// whether it is an estimate.
pub fn line(
    what: &str,
    unit: &str,
    done: u64,
    total: Option<(u64, bool)>,
    elapsed: Duration,
    label: &str,
) -> String {
    let secs = elapsed.as_secs_f64();
    let rate = if secs > 0.0 { done as f64 / secs } else { 0.0 };
    let mut out = format!("{what}: {done}");
    match total {
        Some((total, estimated)) if total > 0 => {
            let pct = (done as f64 / total as f64 * 100.0).min(100.0);
            let about = if estimated { "~" } else { "" };
            out.push_str(&format!("/{about}{total} {unit} ({pct:.0}%)"));
        }
        _ => out.push_str(&format!(" {unit}")),
    }
    out.push_str(&format!(", {rate:.0} {unit}/s"));
    if let Some((total, _)) = total {
        if rate > 0.0 && total > done {
            let eta = ((total - done) as f64 / rate).ceil() as u64;
            out.push_str(&format!(", ETA {}", duration(eta)));
        }
    }
    out.push_str(&format!(", {:.1}s elapsed", secs));
    if !label.is_empty() {
        out.push_str(", ");
        out.push_str(label);
    }
    out
}

fn duration(secs: u64) -> String {
    match secs {
        0..=59 => format!("{secs}s"),
        60..=3599 => format!("{}m{:02}s", secs / 60, secs % 60),
        _ => format!("{}h{:02}m", secs / 3600, secs % 3600 / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_line_has_count_rate_eta_and_label() {
        let l = line(
            "resync eu",
            "rows",
            1200,
            Some((5000, true)),
            Duration::from_secs(3),
            "public.orders",
        );
        assert_eq!(
            l,
            "resync eu: 1200/~5000 rows (24%), 400 rows/s, ETA 10s, 3.0s elapsed, public.orders"
        );
        // past an underestimated total: no ETA, no percentage above 100
        let l = line(
            "r",
            "rows",
            90,
            Some((60, true)),
            Duration::from_secs(90),
            "",
        );
        assert_eq!(l, "r: 90/~60 rows (100%), 1 rows/s, 90.0s elapsed");
        let l = line(
            "setup",
            "statements",
            3,
            Some((4, false)),
            Duration::from_secs(1),
            "x",
        );
        assert_eq!(
            l,
            "setup: 3/4 statements (75%), 3 statements/s, ETA 1s, 1.0s elapsed, x"
        );
        let l = line("setup", "steps", 3, None, Duration::ZERO, "");
        assert_eq!(l, "setup: 3 steps, 0 steps/s, 0.0s elapsed");
        assert_eq!(duration(3725), "1h02m");
        assert_eq!(duration(61), "1m01s");
    }

    #[test]
    fn the_bar_templates_parse() {
        for with_total in [true, false] {
            for estimated in [true, false] {
                let t = template(with_total, estimated, "rows");
                assert!(ProgressStyle::with_template(&t).is_ok(), "{t}");
            }
        }
    }

    #[test]
    fn plain_lines_come_at_the_interval_and_count_everything() {
        let mut p = Progress::plain("t", "rows", Some(10), Duration::ZERO);
        for _ in 0..10 {
            p.inc(1);
        }
        assert_eq!(p.done(), 10);
        p.finish();
        let mut h = Progress::hidden();
        h.inc(5);
        assert_eq!(h.done(), 5);
    }
}
