//! Failovers, as the capture side sees them: a new primary behind the same
//! region.
//!
//! Each time the capture side connects it asks the server who it is
//! (`IDENTIFY_SYSTEM`: system identifier and timeline) and compares with
//! the primary it streamed from before, kept in `pgrelay.primary_identity`
//! of the region's own database (a physical standby carries that row, so a
//! promoted standby shows the same system and a higher timeline; a primary
//! rebuilt from scratch shows a new system). A change is recorded once, in
//! `pgrelay.events` (kind `failover`) of the region, counted in
//! `pgrelay_failovers_total` and shown by `status`.
//!
//! The event names the WAL the old primary had written past the slot's
//! confirmed position when the sidecar last heard from it (`old_wal_end`,
//! known when the same process streamed from the old primary): what lies
//! in between was not yet in Kafka, and whatever of it the standby had not
//! received is lost with the old primary.

use tokio_postgres::Client;

use crate::event::Lsn;

/// Who a server is, from `IDENTIFY_SYSTEM`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub system_id: String,
    pub timeline: i32,
}

/// How the current primary relates to the one seen before.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Nothing seen before (first start after setup).
    First,
    Same,
    /// A promoted standby (same system, new timeline) or a new system.
    Failover {
        previous: Identity,
    },
}

/// Pure comparison of the recorded identity with the current one.
pub fn compare(previous: Option<&Identity>, current: &Identity) -> Change {
    match previous {
        None => Change::First,
        Some(p) if p == current => Change::Same,
        Some(p) => Change::Failover {
            previous: p.clone(),
        },
    }
}

/// Parses an `IDENTIFY_SYSTEM` row: systemid, timeline, xlogpos, dbname.
pub fn parse_identify(row: &[Option<String>]) -> Result<(Identity, Lsn), String> {
    let field = |i: usize, name: &str| {
        row.get(i)
            .cloned()
            .flatten()
            .ok_or_else(|| format!("IDENTIFY_SYSTEM returned no {name}"))
    };
    let system_id = field(0, "systemid")?;
    let timeline = field(1, "timeline")?
        .parse()
        .map_err(|e| format!("IDENTIFY_SYSTEM timeline: {e}"))?;
    let xlogpos = field(2, "xlogpos")?;
    let lsn = xlogpos
        .parse::<Lsn>()
        .map_err(|e| format!("IDENTIFY_SYSTEM xlogpos {xlogpos}: {e}"))?;
    Ok((
        Identity {
            system_id,
            timeline,
        },
        lsn,
    ))
}

/// Whether the slot came through a failover: same system, and the slot's
/// confirmed position lies before the new timeline's switch point (a slot
/// created on the new primary starts after it).
pub fn slot_carried(
    previous: &Identity,
    current: &Identity,
    confirmed: Lsn,
    switchpoint: Option<Lsn>,
) -> bool {
    previous.system_id == current.system_id
        && switchpoint.is_some_and(|switch| confirmed.0 > 0 && confirmed <= switch)
}

/// The switch point of the newest timeline from a `TIMELINE_HISTORY`
/// file's content (`parent_tli<TAB>switchpoint<TAB>reason` lines; as text
/// or as the `\\x…` hex a bytea column reads as).
pub fn parse_switchpoint(history: &str) -> Option<Lsn> {
    let text = match history.strip_prefix("\\x") {
        Some(hex) => {
            let bytes: Option<Vec<u8>> = (0..hex.len() / 2)
                .map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok())
                .collect();
            String::from_utf8(bytes?).ok()?
        }
        None => history.to_string(),
    };
    text.lines()
        .rfind(|l| !l.trim().is_empty() && !l.starts_with('#'))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A recorded failover.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub previous: Identity,
    pub current: Identity,
    pub confirmed: Lsn,
    pub old_wal_end: Option<Lsn>,
    /// The slot came through the failover (a synced failover slot): its
    /// confirmed position predates the new primary. When not, the slot is
    /// new and what the old one had not delivered needs `pgrelay resync`.
    pub slot_carried: bool,
}

impl Event {
    /// Bytes of WAL the old primary had past the confirmed position, when
    /// known: the upper bound of what may be lost.
    pub fn unconfirmed_bytes(&self) -> Option<u64> {
        self.old_wal_end
            .map(|end| end.0.saturating_sub(self.confirmed.0))
    }
}

/// Compares `current` with the identity recorded in the region's database,
/// records it, and on a change writes the `failover` event. One
/// transaction; a concurrent sidecar start records the event once.
pub async fn observe(
    client: &mut Client,
    region: &str,
    current: &Identity,
    confirmed: Lsn,
    old_wal_end: Option<Lsn>,
    switchpoint: Option<Lsn>,
) -> Result<Option<Event>, tokio_postgres::Error> {
    let tx = client.transaction().await?;
    let previous = tx
        .query_opt(
            "SELECT system_id, timeline FROM pgrelay.primary_identity WHERE region = $1 FOR UPDATE",
            &[&region],
        )
        .await?
        .map(|r| Identity {
            system_id: r.get(0),
            timeline: r.get(1),
        });
    let change = compare(previous.as_ref(), current);
    if change == Change::Same {
        tx.rollback().await?;
        return Ok(None);
    }
    tx.execute(
        "INSERT INTO pgrelay.primary_identity (region, system_id, timeline) VALUES ($1, $2, $3) \
         ON CONFLICT (region) DO UPDATE SET system_id = excluded.system_id, \
         timeline = excluded.timeline, seen_at = now()",
        &[&region, &current.system_id, &current.timeline],
    )
    .await?;
    let event = match change {
        Change::Failover { previous } => Some(Event {
            slot_carried: slot_carried(&previous, current, confirmed, switchpoint),
            previous,
            current: current.clone(),
            confirmed,
            old_wal_end,
        }),
        _ => None,
    };
    if let Some(e) = &event {
        let old_end = e.old_wal_end.map(|l| l.to_string());
        let unconfirmed = e.unconfirmed_bytes().map(|b| b as i64);
        tx.execute(
            "INSERT INTO pgrelay.events (region, kind, detail) VALUES ($1, 'failover', \
             jsonb_strip_nulls(jsonb_build_object(\
                'old_system_id', $2::text, 'old_timeline', $3::int, \
                'new_system_id', $4::text, 'new_timeline', $5::int, \
                'confirmed_lsn', $6::text, 'old_wal_end', $7::text, \
                'unconfirmed_wal_bytes', $8::bigint, 'slot_carried', $9::bool)))",
            &[
                &region,
                &e.previous.system_id,
                &e.previous.timeline,
                &e.current.system_id,
                &e.current.timeline,
                &e.confirmed.to_string(),
                &old_end,
                &unconfirmed,
                &e.slot_carried,
            ],
        )
        .await?;
    }
    tx.commit().await?;
    Ok(event)
}

/// Turns an existing logical slot into a failover slot (PostgreSQL 17+,
/// `ALTER_REPLICATION_SLOT`, a replication command); fails while a sidecar
/// streams from it.
pub async fn make_failover_slot(dsn: &str, region: &str, slot: &str) -> Result<(), String> {
    use crate::source::conn::{ConnParams, ReplConnection};
    let params =
        ConnParams::from_dsn(dsn, &format!("pgrelay_setup_{region}")).map_err(|e| e.to_string())?;
    let mut conn = ReplConnection::connect(&params)
        .await
        .map_err(|e| format!("replication connection to {}: {e}", params.target()))?;
    conn.simple_query(&format!(
        "ALTER_REPLICATION_SLOT {} ( FAILOVER true )",
        crate::event::quote_ident(slot)
    ))
    .await
    .map_err(|e| e.to_string())?;
    Ok(())
}

/// Records a finished resync (`to`: comma-separated destinations, empty
/// for all) in the region's `pgrelay.events`.
pub async fn record_resync(
    config: &crate::config::Config,
    region: &str,
    to: &str,
) -> Result<(), crate::source::catalog::CatalogError> {
    let client = crate::source::catalog::connect(&config.regions[region].dsn, region).await?;
    client
        .execute(
            "INSERT INTO pgrelay.events (region, kind, detail) \
             VALUES ($1, 'resync', jsonb_build_object('to', $2::text))",
            &[&region, &to],
        )
        .await
        .map_err(|source| crate::source::catalog::CatalogError::Query {
            region: region.to_string(),
            context: "recording the resync in pgrelay.events".into(),
            source,
        })?;
    Ok(())
}

/// After the region's last failover, if its slot did not come through
/// (PostgreSQL 15/16, or a standby without a synced slot): when it was,
/// and the destinations of each resync since (`""`: all).
pub async fn unrecovered(
    client: &Client,
) -> Result<Option<(String, Vec<String>)>, tokio_postgres::Error> {
    if !crate::source::catalog::table_exists(client, "pgrelay.events").await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT f.at::text, coalesce((f.detail->>'slot_carried')::bool, false), \
             coalesce((SELECT array_agg(coalesce(r.detail->>'to', '')) FROM pgrelay.events r \
                       WHERE r.kind = 'resync' AND r.id > f.id), '{}') \
             FROM pgrelay.events f WHERE f.kind = 'failover' ORDER BY f.id DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.and_then(|r| {
        let carried: bool = r.get(1);
        (!carried).then(|| (r.get(0), r.get(2)))
    }))
}

/// Why a pair is `rebuilding` after a failover that lost the slot: no
/// resync to `destination` yet, or its records not yet applied.
pub fn rebuilding(
    source: &str,
    destination: &str,
    unrecovered: Option<&(String, Vec<String>)>,
    backlog: Option<i64>,
) -> Option<String> {
    let (at, resyncs) = unrecovered?;
    let covered = resyncs
        .iter()
        .any(|to| to.is_empty() || to.split(',').any(|d| d == destination));
    if !covered {
        return Some(format!(
            "rebuilding: the failover of {source} at {at} came without its slot; run pgrelay \
             resync --region {source} --to {destination}"
        ));
    }
    match backlog {
        Some(0) => None,
        Some(n) => Some(format!(
            "rebuilding: the resync after the failover of {source} at {at} is being applied \
             ({n} records to go)"
        )),
        None => Some(format!(
            "rebuilding: the resync after the failover of {source} at {at}: backlog unknown"
        )),
    }
}

/// The region's last recorded failover, as one line for `status`.
pub async fn last_event(client: &Client) -> Result<Option<String>, tokio_postgres::Error> {
    if !crate::source::catalog::table_exists(client, "pgrelay.events").await? {
        return Ok(None);
    }
    let row = client
        .query_opt(
            "SELECT at::text, detail->>'old_timeline', detail->>'new_timeline', \
             detail->>'old_system_id' IS DISTINCT FROM detail->>'new_system_id', \
             detail->>'unconfirmed_wal_bytes' \
             FROM pgrelay.events WHERE kind = 'failover' ORDER BY id DESC LIMIT 1",
            &[],
        )
        .await?;
    Ok(row.map(|r| {
        let at: String = r.get(0);
        let old_tl: Option<String> = r.get(1);
        let new_tl: Option<String> = r.get(2);
        let new_system: bool = r.get(3);
        let unconfirmed: Option<String> = r.get(4);
        let mut line = format!(
            "at {at}: timeline {} -> {}",
            old_tl.unwrap_or_default(),
            new_tl.unwrap_or_default()
        );
        if new_system {
            line.push_str(" (new system identifier)");
        }
        match unconfirmed {
            Some(b) => line.push_str(&format!(
                ", {b} bytes of WAL past the confirmed LSN on the old primary"
            )),
            None => line.push_str(", old primary's WAL end unknown"),
        }
        line
    }))
}

/// What `check` says about the server's major and failover readiness:
/// which loop prevention runs, whether the slot is a failover slot, and
/// whether the DSN's standbys hold a synced copy of it.
pub async fn check_lines(
    config: &crate::config::Config,
    cat: &crate::source::catalog::Catalog<'_>,
    dsn: &str,
    region: &str,
    slot: &str,
) -> Result<Vec<String>, crate::source::catalog::CatalogError> {
    use crate::config::OriginFilter;
    use crate::source::server;
    let version = cat.server_version_num().await?;
    let loops = match config.capture.origin_filter {
        OriginFilter::Server if server::origin_filter(version) => {
            "the walsender drops every change that carries a replication origin \
             (origin_filter = \"server\")"
        }
        OriginFilter::Server => {
            "origin_filter = \"server\" needs 16+: the capture side reads each transaction's \
             Origin message and skips pgrelay's own"
        }
        OriginFilter::Message if server::origin_filter(version) => {
            "the capture side reads each transaction's Origin message and skips pgrelay's own \
             (origin_filter = \"server\" would let the walsender drop them, see docs/operations.md, \
             PostgreSQL versions)"
        }
        OriginFilter::Message => {
            "the capture side reads each transaction's Origin message and skips pgrelay's own"
        }
    };
    let mut out = vec![format!(
        "region {region}: PostgreSQL {}: loop prevention: {loops}; failover slots {}",
        server::display(version),
        if server::failover_slots(version) {
            "available (17+)"
        } else {
            "not available before 17: after a failover run pgrelay setup and pgrelay resync (docs/operations.md, Failover and split brain)"
        }
    )];
    if config.capture.origin_filter == OriginFilter::Server && server::origin_filter(version) {
        let foreign = cat.foreign_origins().await?;
        if !foreign.is_empty() {
            out.push(format!(
                "region {region}: warning: replication origins {} write here (native \
                 subscriptions?): with origin_filter = \"server\" their changes are not \
                 replicated; use \"message\" if they should be",
                foreign.join(", ")
            ));
        }
    }
    if !server::failover_slots(version) {
        return Ok(out);
    }
    match cat.slot_failover(slot).await? {
        Some(true) => out.push(format!("region {region}: slot {slot} is a failover slot")),
        Some(false) => out.push(format!(
            "region {region}: slot {slot} is NOT a failover slot (made before PostgreSQL 17 or by \
             hand): a promoted standby will not carry it; drop it while the sidecar is stopped \
             (SELECT pg_drop_replication_slot('{slot}')), run pgrelay setup, then pgrelay resync"
        )),
        None => {}
    }
    let standbys = crate::source::catalog::standby_slots(dsn, region, slot).await;
    if standbys.is_empty() {
        out.push(format!(
            "region {region}: no standby among the hosts of regions.{region}.dsn: list the \
             standby too (host=primary,standby target_session_attrs=read-write) so the sidecar \
             follows a promotion and check can see the synced slot"
        ));
    }
    for (host, synced) in standbys {
        out.push(match synced {
            Ok(Some((lsn, false))) => {
                format!("region {region}: slot {slot} synced to standby {host} (confirmed {lsn})")
            }
            Ok(Some((_, true))) => format!(
                "region {region}: slot {slot} NOT yet synced to standby {host}: its copy waits \
                 for the primary's slot to pass the standby's position (it does once the sidecar \
                 streams and confirms); a promotion now would drop it"
            ),
            Ok(None) => format!(
                "region {region}: slot {slot} NOT synced to standby {host}: on the standby set \
                 sync_replication_slots = on, hot_standby_feedback = on, primary_slot_name and a \
                 dbname in primary_conninfo; on the primary list that slot in \
                 synchronized_standby_slots"
            ),
            Err(e) => format!("region {region}: standby {host}: cannot read its slots: {e}"),
        });
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str, tl: i32) -> Identity {
        Identity {
            system_id: s.into(),
            timeline: tl,
        }
    }

    #[test]
    fn a_new_timeline_or_system_is_a_failover() {
        assert_eq!(compare(None, &id("1", 1)), Change::First);
        assert_eq!(compare(Some(&id("1", 1)), &id("1", 1)), Change::Same);
        assert_eq!(
            compare(Some(&id("1", 1)), &id("1", 2)),
            Change::Failover {
                previous: id("1", 1)
            }
        );
        assert_eq!(
            compare(Some(&id("1", 1)), &id("2", 1)),
            Change::Failover {
                previous: id("1", 1)
            }
        );
    }

    #[test]
    fn identify_system_rows_parse_or_name_the_field() {
        let row = vec![
            Some("7300000000000000001".to_string()),
            Some("2".to_string()),
            Some("0/3000148".to_string()),
            Some("postgres".to_string()),
        ];
        let (ident, lsn) = parse_identify(&row).unwrap();
        assert_eq!(ident, id("7300000000000000001", 2));
        assert_eq!(lsn, "0/3000148".parse().unwrap());
        let err = parse_identify(&row[..1]).unwrap_err();
        assert!(err.contains("timeline"), "{err}");
    }

    #[test]
    fn a_slot_is_carried_when_its_position_predates_the_switch() {
        let history = "1\t0/3093FB8\tno recovery target specified\n";
        let switch = parse_switchpoint(history);
        assert_eq!(switch, Some("0/3093FB8".parse().unwrap()));
        let (a1, a2) = (id("7", 1), id("7", 2));
        assert!(slot_carried(&a1, &a2, "0/308DFF8".parse().unwrap(), switch));
        // a slot created on the new primary starts after the switch
        assert!(!slot_carried(
            &a1,
            &a2,
            "0/3100000".parse().unwrap(),
            switch
        ));
        // a new system never carries the old slot
        assert!(!slot_carried(&a1, &id("8", 1), Lsn(1), switch));
        assert!(!slot_carried(&a1, &a2, Lsn(1), None));
        assert_eq!(parse_switchpoint(""), None);
        let hex: String = history.bytes().map(|b| format!("{b:02x}")).collect();
        assert_eq!(parse_switchpoint(&format!("\\x{hex}")), switch);
    }

    #[test]
    fn a_pair_rebuilds_until_a_resync_to_it_is_applied() {
        let none: Option<&(String, Vec<String>)> = None;
        assert_eq!(rebuilding("us", "eu", none, Some(5)), None);
        let waiting = ("t".to_string(), vec![]);
        let why = rebuilding("us", "eu", Some(&waiting), Some(0)).unwrap();
        assert!(why.contains("pgrelay resync --region us --to eu"), "{why}");
        let other = ("t".to_string(), vec!["cn".to_string()]);
        assert!(rebuilding("us", "eu", Some(&other), Some(0)).is_some());
        let all = ("t".to_string(), vec![String::new()]);
        assert!(rebuilding("us", "eu", Some(&all), Some(3))
            .unwrap()
            .contains("3 records to go"));
        assert_eq!(rebuilding("us", "eu", Some(&all), Some(0)), None);
        let eu = ("t".to_string(), vec!["cn,eu".to_string()]);
        assert_eq!(rebuilding("us", "eu", Some(&eu), Some(0)), None);
    }

    #[test]
    fn unconfirmed_wal_is_the_gap_when_the_end_is_known() {
        let e = Event {
            previous: id("1", 1),
            current: id("1", 2),
            confirmed: Lsn(100),
            old_wal_end: Some(Lsn(350)),
            slot_carried: true,
        };
        assert_eq!(e.unconfirmed_bytes(), Some(250));
        let unknown = Event {
            old_wal_end: None,
            ..e
        };
        assert_eq!(unknown.unconfirmed_bytes(), None);
    }
}
