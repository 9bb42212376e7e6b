//! `pgrelay status`: one line per region pair.

use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Result};

use super::{all_clusters, load};
use crate::config::Need;

pub async fn status(path: &Path, json: bool, watch: Option<u64>) -> Result<ExitCode> {
    let config = load(path)?;
    let mut needs: Vec<Need> = config.regions.keys().map(|r| Need::Database(r)).collect();
    needs.extend(all_clusters(&config));
    config.require(&needs)?;
    if let Some(every) = watch {
        if every == 0 {
            bail!("--watch 0: give the refresh interval in seconds (1 or more)");
        }
        return watch_loop(&config, json, Duration::from_secs(every)).await;
    }
    let rows = crate::status::collect(&config).await;
    if json {
        println!("{}", serde_json::to_string_pretty(&rows)?);
    } else {
        print!("{}", crate::status::render(&rows));
        print!(
            "{}",
            crate::status::render_egress(&rows, config.status.egress_price_per_gb)
        );
        print!("{}", crate::status::render_verify(&rows));
        // DR pairs: the text output only (the JSON stays one row per pair)
        let dr = crate::status::collect_dr(&config).await;
        print!("{}", crate::status::render_dr(&dr));
    }
    if rows.iter().any(|r| r.state == "failed") {
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// `status --watch`: collects and prints until interrupted. On a terminal
/// each table replaces the previous one (cursor home, clear to the end);
/// into a pipe or file each is printed after a line with its time.
async fn watch_loop(
    config: &crate::config::Config,
    json: bool,
    every: Duration,
) -> Result<ExitCode> {
    let in_place = std::io::stdout().is_terminal() && !json;
    if in_place {
        print!("\x1b[2J");
    }
    loop {
        let started = std::time::Instant::now();
        let rows = crate::status::collect(config).await;
        let body = if json {
            serde_json::to_string(&rows)? + "\n"
        } else {
            crate::status::render(&rows)
                + &crate::status::render_egress(&rows, config.status.egress_price_per_gb)
                + &crate::status::render_verify(&rows)
        };
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        let mut out = std::io::stdout().lock();
        if in_place {
            // home, draw each line over the last one's, clear what is left
            let body = body.replace('\n', "\x1b[K\n");
            write!(
                out,
                "\x1b[H{body}\x1b[J\nrefreshed every {}s (unix time {now}); Ctrl-C to stop\x1b[K\n",
                every.as_secs()
            )?;
        } else if json {
            write!(out, "{body}")?;
        } else {
            write!(out, "-- unix time {now}\n{body}")?;
        }
        out.flush()?;
        drop(out);
        tokio::time::sleep(every.saturating_sub(started.elapsed())).await;
    }
}
