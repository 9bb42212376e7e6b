use std::collections::BTreeMap;
use std::sync::Arc;

use super::classify::{judge, Held, Judgement, Rules, Side};
use super::policy::{self, Form, Share};
use super::*;
use crate::config::{parse_with_env, Config};
use crate::event::{Change, ColumnDesc, Datum, Lsn, Op, TableName, TableSchema, TxMeta};
use crate::residency::{Policy, Verdict};

const CONFIG: &str = r#"
[kafka]
brokers = "k:9092"

[regions.us]
id = 1
dsn = "host=us"
hash_key = "us-key-0123456789abcdef0123456789"
hash_key_id = "k7"
[regions.eu]
id = 2
dsn = "host=eu"
hash_key = "eu-key-0123456789abcdef0123456789"
[regions.cn]
id = 3
dsn = "host=cn"
hash_key = "cn-key-0123456789abcdef0123456789"

[[tables]]
name = "products"
class = "global"

[[tables]]
name = "currencies"
class = "owned"
owner = "us"

[[tables]]
name = "orders"
class = "partitioned"
home_column = "country"
aliases = { DE = "eu", FR = "eu", US = "us", CN = "cn" }
[tables.allow]
us = ["eu", "cn"]
eu = ["cn"]

[[tables.columns]]
name = "email"
action = "hash"
to = ["cn"]

[[tables.columns]]
name = "email"
action = "drop"
to = ["eu"]

[[tables.columns]]
name = "card"
action = "mask"
mask = "****"
"#;

const REGIONS: [&str; 3] = ["cn", "eu", "us"];
const COLUMNS: [&str; 5] = ["id", "country", "email", "card", "note"];

fn config() -> Config {
    parse_with_env(CONFIG, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"))
}

fn orders_insert(country: &str) -> Change {
    let schema = Arc::new(TableSchema {
        oid: 7,
        table: TableName::new("public", "orders"),
        columns: COLUMNS
            .iter()
            .enumerate()
            .map(|(i, name)| ColumnDesc {
                name: name.to_string(),
                type_oid: 25,
                is_key: i == 0,
            })
            .collect(),
    });
    let values = ["1", country, "a@example.com", "4111", "n"];
    Change {
        schema,
        op: Op::Insert,
        before: None,
        after: Some(values.iter().map(|v| Datum::Text(v.to_string())).collect()),
        hlc: crate::hlc::Hlc::new(1),
        tx: Arc::new(TxMeta {
            xid: 1,
            commit_lsn: Lsn(1),
            commit_ts_us: 0,
        }),
        seq: 0,
    }
}

/// Verify's reading of the policy is the one routing applies: a row goes
/// from any source to a destination exactly when verify does not count it
/// as forbidden there, and two regions share it exactly when both may hold
/// it.
#[test]
fn rows_verify_expects_are_the_rows_routing_sends() {
    let config = config();
    let orders = config.table(&TableName::new("public", "orders")).unwrap();
    let homes = policy::home_values(&config, orders);
    assert_eq!(homes["DE"], "eu");
    assert_eq!(homes["cn"], "cn");
    for source in REGIONS {
        let routing = Policy::compile(&config, source).unwrap();
        for value in homes.keys() {
            let change = orders_insert(value);
            for (i, dest) in routing.destinations().iter().enumerate() {
                let sent = matches!(routing.route(&change, i), Verdict::Publish(_));
                let forbidden = policy::forbidden_homes(&config, orders, dest).contains_key(value);
                assert_eq!(sent, !forbidden, "{value} from {source} to {dest}");
                // the home region holds its rows; a destination that
                // receives them shares them with the home
                let home = &homes[value];
                if home != dest {
                    let shared = match policy::share(&config, orders, home, dest) {
                        Share::Homes(values) => values.contains(value),
                        Share::All => true,
                        Share::Nothing => false,
                    };
                    assert_eq!(shared, sent, "{value}: {home} and {dest}");
                }
            }
        }
    }
}

/// A column is left out of a pair's comparison exactly when routing
/// alters it (drops, hashes or masks it) towards either region.
#[test]
fn columns_compared_are_the_columns_routing_leaves_alone() {
    let config = config();
    let orders = config.table(&TableName::new("public", "orders")).unwrap();
    for source in REGIONS {
        let routing = Policy::compile(&config, source).unwrap();
        let change = orders_insert("US");
        let sent_as_is = change.after.clone().unwrap();
        for (i, dest) in routing.destinations().iter().enumerate() {
            let Verdict::Publish(routed) = routing.route(&change, i) else {
                panic!("US rows go everywhere");
            };
            let after = routed.after.unwrap();
            for (c, column) in COLUMNS.iter().enumerate() {
                let arrives = routed
                    .columns
                    .iter()
                    .position(|n| n == column)
                    .map(|j| after[j].clone());
                let altered = arrives.as_ref() != Some(&sent_as_is[c]);
                if altered {
                    assert!(
                        policy::altered_between(orders, column, source, dest),
                        "{column} from {source} to {dest}"
                    );
                }
                assert_eq!(
                    policy::altered_between(orders, column, dest, dest),
                    altered,
                    "{column} at {dest}"
                );
            }
        }
    }
    // what arrives masked or hashed, per region (dropped: not checked)
    let all: Vec<String> = ["id", "country", "email", "card", "doc"]
        .map(String::from)
        .to_vec();
    let forms = policy::arriving_forms(&config, orders, "cn", &all);
    assert_eq!(forms[0].0, "email");
    assert!(matches!(&forms[0].1, Form::Hash { key_ids } if key_ids.contains(&"k7".to_string())));
    assert_eq!(forms[1], ("card".to_string(), Form::Mask("****".into())));
    let forms = policy::arriving_forms(&config, orders, "eu", &all);
    assert_eq!(forms, vec![("card".to_string(), Form::Mask("****".into()))]);
    // a column the table lacks (renamed, not there yet) is not checked
    assert!(policy::arriving_forms(&config, orders, "eu", &all[..3]).is_empty());
}

#[test]
fn global_and_owned_tables_are_shared_whole_and_never_leak() {
    let config = config();
    for name in ["products", "currencies"] {
        let table = config.table(&TableName::new("public", name)).unwrap();
        assert_eq!(policy::share(&config, table, "eu", "cn"), Share::All);
        assert!(policy::forbidden_homes(&config, table, "eu").is_empty());
    }
}

fn ids() -> BTreeMap<u8, String> {
    [(1, "us"), (2, "eu"), (3, "cn")]
        .into_iter()
        .map(|(i, n)| (i, n.to_string()))
        .collect()
}

fn stamp(ms: u64, region: u8) -> i64 {
    crate::hlc::Hlc::compose(ms, 0, region).to_sql()
}

fn row(stamp: i64, digest: i64) -> Held {
    Held::Row {
        stamp,
        digest,
        shared: true,
    }
}

fn gone(tombstone: i64) -> Held {
    Held::Gone { tombstone }
}

fn judge_pair(a: Held, b: Held, wm_b_from_us: i64, owner: Option<&str>) -> Judgement {
    let ids = ids();
    let wm_a: BTreeMap<u8, i64> = [(2, i64::MAX), (3, i64::MAX)].into_iter().collect();
    let wm_b: BTreeMap<u8, i64> = [(1, wm_b_from_us), (3, i64::MAX)].into_iter().collect();
    let rules = Rules {
        regions: &ids,
        owner,
        merges: false,
    };
    judge(
        &Side {
            region: "us",
            held: a,
            watermarks: &wm_a,
            caught_up: &BTreeMap::new(),
        },
        &Side {
            region: "eu",
            held: b,
            watermarks: &wm_b,
            caught_up: &BTreeMap::new(),
        },
        &rules,
    )
}

fn differ(kind: Kind, source: &str, destination: &str, preferred: &str) -> Judgement {
    Judgement::Differ {
        kind,
        source: source.into(),
        destination: destination.into(),
        preferred: Some(preferred.into()),
    }
}

#[test]
fn a_key_is_judged_by_stamps_tombstones_and_watermarks() {
    let s = stamp(1_000, 1);
    // equal
    assert_eq!(judge_pair(row(s, 5), row(s, 5), s, None), Judgement::Agree);
    // same stamp, other content
    assert_eq!(
        judge_pair(row(s, 5), row(s, 6), s, None),
        differ(Kind::Diverged, "us", "eu", "us")
    );
    // eu lacks a row us wrote and eu has applied past it
    assert_eq!(
        judge_pair(row(s, 5), gone(0), s, None),
        differ(Kind::Missing, "us", "eu", "us")
    );
    // ... or not yet: in flight, not a difference
    assert_eq!(
        judge_pair(row(s, 5), gone(0), s - 1, None),
        Judgement::InFlight
    );
    // a watermark behind (a quiet session), but eu has applied all us
    // committed until after the stamp's time
    let ids = ids();
    let marks: BTreeMap<u8, i64> = BTreeMap::new();
    let after: BTreeMap<u8, u64> = [(1, 1_001)].into_iter().collect();
    let before: BTreeMap<u8, u64> = [(1, 1_000)].into_iter().collect();
    let rules = Rules {
        regions: &ids,
        owner: None,
        merges: false,
    };
    let us = |caught_up| Side {
        region: "us",
        held: row(s, 5),
        watermarks: &marks,
        caught_up,
    };
    let eu = |caught_up| Side {
        region: "eu",
        held: gone(0),
        watermarks: &marks,
        caught_up,
    };
    assert_eq!(
        judge(&us(&before), &eu(&after), &rules),
        differ(Kind::Missing, "us", "eu", "us")
    );
    assert_eq!(
        judge(&us(&after), &eu(&before), &rules),
        Judgement::InFlight
    );
    // an older version at eu, the newer one delivered
    let older = stamp(900, 1);
    assert_eq!(
        judge_pair(row(s, 5), row(older, 4), s, None),
        differ(Kind::Missing, "us", "eu", "us")
    );
    // a delete eu made (tombstone newer than us's row) us lacks
    let delete = stamp(1_100, 2);
    assert_eq!(
        judge_pair(row(s, 5), gone(delete), s, None),
        differ(Kind::Missing, "eu", "us", "eu")
    );
    // a tombstone older than the row: the row was written again after
    let old_delete = stamp(500, 2);
    assert_eq!(
        judge_pair(row(s, 5), gone(old_delete), s, None),
        differ(Kind::Missing, "us", "eu", "us")
    );
    // both gone
    assert_eq!(judge_pair(gone(delete), gone(0), s, None), Judgement::Agree);
    // an owned table's row the owner did not write: extra where it is
    let by_eu = stamp(1_000, 2);
    assert_eq!(
        judge_pair(gone(0), row(by_eu, 1), s, Some("us")),
        differ(Kind::Extra, "us", "eu", "us")
    );
    // a row the owner wrote that eu lost: missing
    assert_eq!(
        judge_pair(row(s, 1), gone(0), s, Some("us")),
        differ(Kind::Missing, "us", "eu", "us")
    );
}

#[test]
fn a_row_that_moved_home_must_leave_the_other_region() {
    let s = stamp(1_000, 1);
    let moved = Held::Row {
        stamp: stamp(1_200, 1),
        digest: 9,
        shared: false,
    };
    // us moved it out of eu's reach; eu still holds the shared version
    assert_eq!(
        judge_pair(moved.clone(), row(s, 5), stamp(1_200, 1), None),
        differ(Kind::Missing, "us", "eu", "us")
    );
    // eu already removed it: agree
    assert_eq!(
        judge_pair(moved, gone(stamp(1_200, 1)), stamp(1_200, 1), None),
        Judgement::Agree
    );
}

#[test]
fn merge_tables_wait_for_every_region_before_a_same_stamp_difference() {
    let ids = ids();
    let s = stamp(1_000, 1);
    let behind: BTreeMap<u8, i64> = [(1, s), (3, s - 1)].into_iter().collect();
    let caught_up: BTreeMap<u8, i64> = [(1, s), (3, s)].into_iter().collect();
    let us_marks: BTreeMap<u8, i64> = [(2, s), (3, s)].into_iter().collect();
    let rules = Rules {
        regions: &ids,
        owner: None,
        merges: true,
    };
    let none = BTreeMap::new();
    let side = |region, held, marks| Side {
        region,
        held,
        watermarks: marks,
        caught_up: &none,
    };
    assert_eq!(
        judge(
            &side("us", row(s, 1), &us_marks),
            &side("eu", row(s, 2), &behind),
            &rules
        ),
        Judgement::InFlight
    );
    assert_eq!(
        judge(
            &side("us", row(s, 1), &us_marks),
            &side("eu", row(s, 2), &caught_up),
            &rules
        ),
        differ(Kind::Diverged, "us", "eu", "us")
    );
}

#[test]
fn one_difference_seen_by_several_pairs_is_reported_once() {
    let d = |kind, source: &str, destination: &str, column: Option<&str>| Difference {
        table: "public.products".into(),
        kind,
        source: source.into(),
        destination: destination.into(),
        column: column.map(str::to_string),
        key: Some(r#"{"id": "1"}"#.into()),
    };
    let out = dedupe(vec![
        (d(Kind::Missing, "cn", "eu", None), Some("us".into())),
        (d(Kind::Missing, "us", "eu", None), Some("us".into())),
        (d(Kind::Diverged, "eu", "cn", None), Some("us".into())),
        (d(Kind::Diverged, "us", "cn", None), Some("us".into())),
        (d(Kind::Leaked, "us", "cn", Some("email")), None),
        (d(Kind::Leaked, "us", "cn", None), None),
    ]);
    assert_eq!(
        out,
        vec![
            d(Kind::Leaked, "us", "cn", None),
            d(Kind::Leaked, "us", "cn", Some("email")),
            d(Kind::Missing, "us", "eu", None),
            d(Kind::Diverged, "us", "cn", None),
        ]
    );
}

#[test]
fn output_carries_keys_only_when_asked() {
    let report = Report {
        pairs: vec![],
        differences: vec![Difference {
            table: "public.orders".into(),
            kind: Kind::Leaked,
            source: "eu".into(),
            destination: "us".into(),
            column: None,
            key: Some(r#"{"id": "7"}"#.into()),
        }],
        ..Report::default()
    };
    let plain = report::json(&report, false).to_string();
    assert!(!plain.contains("\"7\""), "{plain}");
    assert!(report::json(&report, true)
        .to_string()
        .contains(r#"{\"id\": \"7\"}"#));
    let text = report::text(&report, false);
    assert!(text.contains("LEAKED public.orders"), "{text}");
    assert!(!text.contains("\"7\""), "{text}");
}

#[test]
fn hash_pattern_escapes_key_ids() {
    assert_eq!(
        sql::hash_pattern(&["k1".into(), "a.b".into()]),
        r"^(k1|a\.b):[0-9a-f]{64}$"
    );
}

fn found(
    table: &str,
    kind: Kind,
    source: &str,
    destination: &str,
    key: &str,
    preferred: Option<&str>,
) -> (Difference, Option<String>) {
    (
        Difference {
            table: table.into(),
            kind,
            source: source.into(),
            destination: destination.into(),
            column: None,
            key: Some(key.into()),
        },
        preferred.map(str::to_string),
    )
}

fn planned(found: Vec<(Difference, Option<String>)>, verified: &[&str]) -> Vec<plan::Step> {
    let report = Report {
        differences: dedupe(found.clone()),
        found,
        ..Report::default()
    };
    let verified: Vec<String> = verified.iter().map(|r| r.to_string()).collect();
    plan::plan(&config(), &report, &verified)
}

fn summary(steps: &[plan::Step]) -> Vec<(&'static str, Kind, String, Option<String>, String)> {
    steps
        .iter()
        .map(|s| {
            (
                plan::action_name(&s.action),
                s.kind,
                s.table.to_string(),
                s.from.clone(),
                s.to.clone(),
            )
        })
        .collect()
}

#[test]
fn repair_resends_from_the_writer_and_removes_only_what_must_not_stay() {
    let all = ["cn", "eu", "us"];
    let some = |s: &str| Some(s.to_string());
    let steps = planned(
        vec![
            found(
                "public.products",
                Kind::Missing,
                "cn",
                "eu",
                "1",
                Some("us"),
            ),
            found(
                "public.products",
                Kind::Missing,
                "us",
                "eu",
                "1",
                Some("us"),
            ),
            // cn diverged: the pair without the writer names no authority
            found(
                "public.products",
                Kind::Diverged,
                "cn",
                "eu",
                "2",
                Some("us"),
            ),
            found(
                "public.products",
                Kind::Diverged,
                "us",
                "cn",
                "2",
                Some("us"),
            ),
            found(
                "public.currencies",
                Kind::Extra,
                "us",
                "eu",
                "Z",
                Some("us"),
            ),
            found("public.orders", Kind::Leaked, "eu", "us", "9", None),
        ],
        &all,
    );
    assert_eq!(
        summary(&steps),
        vec![
            (
                "replace",
                Kind::Extra,
                "public.currencies".into(),
                some("us"),
                "eu".into()
            ),
            (
                "remove",
                Kind::Leaked,
                "public.orders".into(),
                None,
                "us".into()
            ),
            (
                "resend",
                Kind::Missing,
                "public.products".into(),
                some("us"),
                "eu".into()
            ),
            (
                "replace",
                Kind::Diverged,
                "public.products".into(),
                some("us"),
                "cn".into()
            ),
        ]
    );
    // the owner lacks its own row: a copy from elsewhere would be refused
    let steps = planned(
        vec![found(
            "public.currencies",
            Kind::Missing,
            "eu",
            "us",
            "C",
            Some("us"),
        )],
        &all,
    );
    assert!(
        matches!(steps[0].action, plan::Action::Report(_)),
        "{steps:?}"
    );
    // an extra row whose owner was not verified: reported, not removed
    let steps = planned(
        vec![found(
            "public.currencies",
            Kind::Extra,
            "cn",
            "eu",
            "Z",
            Some("us"),
        )],
        &["cn", "eu"],
    );
    assert!(
        matches!(steps[0].action, plan::Action::Report(_)),
        "{steps:?}"
    );
    // eu's copy of a us-homed order lacks its email (dropped on the way to
    // eu): only rows eu wrote itself may go from eu to us
    let steps = planned(
        vec![found(
            "public.orders",
            Kind::Missing,
            "eu",
            "us",
            "4",
            Some("us"),
        )],
        &all,
    );
    assert!(steps[0].own_only, "{steps:?}");
    let steps = planned(
        vec![found(
            "public.products",
            Kind::Missing,
            "eu",
            "us",
            "4",
            Some("us"),
        )],
        &all,
    );
    assert!(!steps[0].own_only, "{steps:?}");
}

#[test]
fn repair_removals_keep_their_guards() {
    let shape = sql::Shape {
        table: TableName::new("public", "orders"),
        key: vec![("id".into(), "bigint".into())],
    };
    let remove = sql::remove(&shape, &sql::guard_homed_elsewhere("country"));
    assert_eq!(
        remove,
        "DELETE FROM \"public\".\"orders\" t USING unnest($1::text[], $2::int8[]) AS k(pk, stamp) \
         WHERE t.\"id\" = (k.pk::jsonb ->> 'id')::bigint AND (t.\"country\"::text = ANY ($4::text[]) \
         AND (coalesce(t.\"_pgrelay_hlc\", 0) & 63) <> $3::int)"
    );
    assert!(sql::guard_clear_value("email", false).contains("!~ ($4::text[])[1]"));
    assert!(sql::guard_same_stamp().ends_with("= k.stamp"));
}

#[test]
fn periodic_counts_are_per_peer_with_zeros_for_every_pair_compared() {
    let pair = |a: &str, b: &str| PairSummary {
        table: "public.products".into(),
        a: a.into(),
        b: b.into(),
        rows_a: 1,
        rows_b: 1,
        buckets_differing: 0,
    };
    let diff = |kind, source: &str, destination: &str| Difference {
        table: "public.products".into(),
        kind,
        source: source.into(),
        destination: destination.into(),
        column: None,
        key: None,
    };
    let report = Report {
        pairs: vec![pair("eu", "us"), pair("cn", "us")],
        differences: vec![
            diff(Kind::Missing, "us", "eu"),
            diff(Kind::Missing, "us", "eu"),
            diff(Kind::Extra, "eu", "us"),
            // a leak in eu of a row from cn: counted against cn
            diff(Kind::Leaked, "cn", "eu"),
        ],
        ..Report::default()
    };
    let counts = schedule::counts(&report, "eu");
    let get =
        |peer: &str, kind| counts.get(&(peer.to_string(), "public.products".to_string(), kind));
    assert_eq!(get("us", Kind::Missing), Some(&2));
    assert_eq!(get("us", Kind::Extra), Some(&1));
    assert_eq!(get("us", Kind::Diverged), Some(&0));
    assert_eq!(get("cn", Kind::Leaked), Some(&1));
    // the pair cn-us is not eu's
    assert_eq!(get("cn", Kind::Missing), None);
    let json = schedule::counts_json(&counts).to_string();
    assert!(json.contains(r#""peer":"us""#), "{json}");
}
