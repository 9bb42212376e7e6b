use super::*;
use crate::apply::record::{parse, Targets};

fn targets() -> Targets {
    let mut t = Targets::new();
    t.insert(
        "public.p".into(),
        TargetTable {
            dropped: Vec::new(),
            name: TableName::new("public", "p"),
            key: vec!["id".into()],
            columns: vec!["id".into(), "v".into(), "doc".into()],
            column_types: vec!["integer".into(), "text".into(), "jsonb".into()],
            json_columns: vec![("doc".into(), "jsonb".into())],
            admit: Default::default(),
            merge: vec![],
        },
    );
    t
}

/// An envelope as the capture side writes it.
fn record(op: Op, id: &str, hlc: u64, cols: &[(&str, &str)]) -> Vec<u8> {
    let row: serde_json::Map<String, serde_json::Value> = cols
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::Value::from(*v)))
        .collect();
    let key = serde_json::json!({ "id": id });
    let (before, after) = match op {
        Op::Delete => (key, serde_json::Value::Null),
        Op::Truncate => (serde_json::Value::Null, serde_json::Value::Null),
        _ => (serde_json::Value::Null, serde_json::Value::Object(row)),
    };
    serde_json::json!({
        "before": before, "after": after, "op": op.code(), "ts_ms": 1,
        "source": {"schema": "public", "table": "p"},
        "pgrelay": {"hlc": hlc, "origin": "us", "commit_lsn": "0/1"}
    })
    .to_string()
    .into_bytes()
}

fn parsed<'a>(records: &'a [Vec<u8>], targets: &'a Targets) -> Vec<Incoming<'a>> {
    records
        .iter()
        .map(|r| parse(Some(r), targets).expect("valid record"))
        .collect()
}

#[test]
fn newest_change_per_key_wins_within_a_batch() {
    let t = targets();
    let records = vec![
        record(Op::Insert, "1", 10, &[("id", "1"), ("v", "a")]),
        record(Op::Update, "1", 30, &[("id", "1"), ("v", "c")]),
        record(Op::Update, "1", 20, &[("id", "1"), ("v", "b")]),
        record(Op::Insert, "2", 5, &[("id", "2"), ("v", "x")]),
        record(Op::Delete, "2", 6, &[]),
    ];
    let plan = plan(&parsed(&records, &t));
    assert_eq!(plan.len(), 2);
    let upsert = plan.iter().find(|s| s.kind == Kind::Upsert).unwrap();
    assert_eq!(upsert.members, vec![1]);
    // columns in name order, then the stamp
    assert_eq!(upsert.rows, "1\tc\t30\n");
    assert!(upsert
        .stage
        .as_ref()
        .unwrap()
        .copy
        .ends_with(r#"("id", "v", "_pgrelay_hlc") FROM STDIN"#));
    let delete = plan.iter().find(|s| s.kind == Kind::Delete).unwrap();
    assert_eq!(delete.members, vec![4]);
    let rows: serde_json::Value = serde_json::from_str(&delete.rows).unwrap();
    assert_eq!(rows, serde_json::json!([{"id": "2", "_pgrelay_hlc": 6}]));
    let mut sup: Vec<usize> = plan.iter().flat_map(|s| s.superseded.clone()).collect();
    sup.sort();
    assert_eq!(sup, vec![0, 2, 3]);
}

#[test]
fn an_update_in_the_batch_keeps_the_columns_an_earlier_change_carried() {
    let t = targets();
    let records = vec![
        // insert with a large value, then an update that left it out
        record(
            Op::Insert,
            "1",
            10,
            &[("id", "1"), ("v", "a"), ("doc", "big")],
        ),
        record(Op::Update, "1", 11, &[("id", "1"), ("v", "b")]),
        record(Op::Update, "1", 12, &[("id", "1"), ("v", "c")]),
        // a delete in between: the re-insert stands alone
        record(
            Op::Insert,
            "2",
            10,
            &[("id", "2"), ("v", "a"), ("doc", "old")],
        ),
        record(Op::Delete, "2", 11, &[]),
        record(Op::Insert, "2", 12, &[("id", "2"), ("v", "x")]),
    ];
    let mut changes = parsed(&records, &t);
    fill_from_earlier(&mut changes);
    assert_eq!(changes[2].value("doc"), Some("big"));
    assert_eq!(changes[2].value("v"), Some("c"));
    assert_eq!(changes[2].columns, vec!["doc", "id", "v"]);
    assert_eq!(changes[5].value("doc"), None);
    assert_eq!(changes[5].columns, vec!["id", "v"]);
    let plan = plan(&changes);
    let upsert = plan.iter().find(|s| s.members == vec![2]).unwrap();
    assert_eq!(upsert.rows, "big\t1\tc\t12\n");
}

#[test]
fn rows_keep_escapes_and_nulls_exactly() {
    let t = targets();
    let rec = br#"{"before":null,"after":{"id":"1","v":"a\"b\\c\u00e9\n","doc":null},"op":"c","ts_ms":1,"source":{"schema":"public","table":"p"},"pgrelay":{"hlc":9,"commit_lsn":"0/1"}}"#;
    let records = vec![rec.to_vec()];
    let plan = plan(&parsed(&records, &t));
    // COPY text: doc (NULL), id, v — backslash, newline escaped; the rest as is
    assert_eq!(plan[0].rows, "\\N\t1\ta\"b\\\\c\u{e9}\\n\t9\n");
}

#[test]
fn unchanged_columns_get_their_own_statement_and_are_not_written() {
    let t = targets();
    let records = vec![
        record(Op::Update, "1", 10, &[("id", "1"), ("v", "a")]),
        record(
            Op::Update,
            "2",
            10,
            &[("id", "2"), ("v", "b"), ("doc", "d")],
        ),
        record(Op::Update, "3", 10, &[("v", "c"), ("id", "3")]),
    ];
    let plan = plan(&parsed(&records, &t));
    assert_eq!(plan.len(), 2);
    let narrow = plan.iter().find(|s| s.members == vec![0, 2]).unwrap();
    assert!(!narrow.sql.contains("\"doc\""));
    let wide = plan.iter().find(|s| s.members == vec![1]).unwrap();
    assert_ne!(narrow.stage, wide.stage, "one staging table per column set");
    assert!(wide.stage.as_ref().unwrap().copy.contains(r#""doc""#));
}

#[test]
fn upserts_and_deletes_carry_their_conflict_statement() {
    let t = targets();
    let records = vec![
        record(Op::Update, "1", 10, &[("id", "1"), ("v", "a")]),
        record(Op::Delete, "2", 11, &[]),
        record(Op::Truncate, "", 12, &[]),
    ];
    let plan = plan(&parsed(&records, &t));
    let upsert = plan.iter().find(|s| s.kind == Kind::Upsert).unwrap();
    let sql = upsert.conflicts.as_deref().unwrap();
    // reads the losers from the staging table the upsert used
    let stage = &upsert.stage.as_ref().unwrap().name;
    assert!(sql.contains(&format!("FROM \"{stage}\" AS r")), "{sql}");
    assert!(!sql.contains("$3"), "{sql}");
    let delete = plan.iter().find(|s| s.kind == Kind::Delete).unwrap();
    let sql = delete.conflicts.as_deref().unwrap();
    assert!(sql.contains("$3::text::json"), "{sql}");
    for s in [upsert, delete] {
        let sql = s.conflicts.as_deref().unwrap();
        // strictly newer, from another region; recorded once
        assert!(
            sql.contains(
                "WHERE w.hlc > r.\"_pgrelay_hlc\" AND (w.hlc & 63) <> (r.\"_pgrelay_hlc\" & 63)"
            ),
            "{sql}"
        );
        assert!(
            sql.contains("ON CONFLICT (table_name, pk, loser_hlc) DO NOTHING"),
            "{sql}"
        );
    }
    let truncate = plan.iter().find(|s| s.kind == Kind::Truncate).unwrap();
    assert!(truncate.conflicts.is_none());
}

fn merge_targets() -> Targets {
    let mut t = Targets::new();
    t.insert(
        "public.s".into(),
        TargetTable {
            dropped: Vec::new(),
            name: TableName::new("public", "s"),
            key: vec!["id".into()],
            columns: vec![
                "_pgrelay_counts".into(),
                "id".into(),
                "n".into(),
                "tags".into(),
            ],
            column_types: vec![
                "jsonb".into(),
                "integer".into(),
                "bigint".into(),
                "text[]".into(),
            ],
            json_columns: vec![("_pgrelay_counts".into(), "jsonb".into())],
            admit: Default::default(),
            merge: vec![
                ("n".into(), crate::config::MergeKind::Counter),
                ("tags".into(), crate::config::MergeKind::Union),
            ],
        },
    );
    t
}

/// A change of table `s`; `counts` is the row's parts (`None`: a row
/// without kept parts).
fn merge_record(op: &str, id: &str, hlc: u64, n: &str, counts: Option<&str>) -> Vec<u8> {
    let mut after = serde_json::json!({"id": id, "n": n, "tags": format!("{{t{hlc}}}")});
    if let Some(counts) = counts {
        after["_pgrelay_counts"] = serde_json::json!(counts);
    }
    let meta = serde_json::json!({"hlc": hlc, "origin": "us", "commit_lsn": "0/1"});
    let (before, after) = if op == "d" {
        (serde_json::json!({ "id": id }), serde_json::Value::Null)
    } else {
        (serde_json::Value::Null, after)
    };
    serde_json::json!({
        "before": before, "after": after, "op": op, "ts_ms": 1,
        "source": {"schema": "public", "table": "s"}, "pgrelay": meta
    })
    .to_string()
    .into_bytes()
}

#[test]
fn merge_statements_carry_every_change_and_each_key_floor() {
    let t = merge_targets();
    let records = [
        merge_record("c", "1", 10, "5", Some(r#"{"n":{"1":[5,10]}}"#)),
        merge_record("u", "1", 11, "7", Some(r#"{"n":{"1":[7,11]}}"#)),
        merge_record("u", "2", 12, "3", Some(r#"{"n":{"1":[3,12]}}"#)),
        merge_record("d", "2", 13, "", None),
        merge_record("c", "2", 14, "4", Some(r#"{"n":{"1":[4,14]}}"#)),
        // a row without kept parts (older than pgrelay): its value
        merge_record("c", "3", 15, "9", None),
    ];
    let plan = plan(&parsed(&records, &t));
    let merges: Vec<&Statement> = plan.iter().filter(|s| s.kind == Kind::Merge).collect();
    assert_eq!(
        merges.len(),
        2,
        "one for the counters, one per union column"
    );
    let counter = merges
        .iter()
        .find(|s| s.sql.contains("pgrelay.counts_merge"))
        .unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&counter.rows).unwrap();
    // every change, in order; a delete carries no parts and raises its
    // key's floor for the changes after it
    assert_eq!(
        rows,
        serde_json::json!([
            {"id": "1", "n": "5", "_pgrelay_counts": r#"{"n":{"1":[5,10]}}"#, "_pgrelay_hlc": 10, "_pgrelay_floor": -1},
            {"id": "1", "n": "7", "_pgrelay_counts": r#"{"n":{"1":[7,11]}}"#, "_pgrelay_hlc": 11, "_pgrelay_floor": -1},
            {"id": "2", "n": "3", "_pgrelay_counts": r#"{"n":{"1":[3,12]}}"#, "_pgrelay_hlc": 12, "_pgrelay_floor": -1},
            {"id": "2", "_pgrelay_counts": "{}", "_pgrelay_hlc": 13, "_pgrelay_floor": 13},
            {"id": "2", "n": "4", "_pgrelay_counts": r#"{"n":{"1":[4,14]}}"#, "_pgrelay_hlc": 14, "_pgrelay_floor": 13},
            {"id": "3", "n": "9", "_pgrelay_counts": null, "_pgrelay_hlc": 15, "_pgrelay_floor": -1},
        ])
        .as_array()
        .unwrap()
        .clone()
    );
    assert_eq!(counter.members.len(), 6);
    let union = merges.iter().find(|s| s.sql.contains("array_agg")).unwrap();
    let rows: Vec<serde_json::Value> = serde_json::from_str(&union.rows).unwrap();
    let items: Vec<&str> = rows.iter().map(|r| r["tags"].as_str().unwrap()).collect();
    assert_eq!(items, vec!["{t10}", "{t11}", "{t14}", "{t15}"]);
    // the upserts write a new row's counters as zero and its parts as
    // none (the merge statement then merges every change's parts) and
    // never overwrite a merge column or the parts of an existing row
    let upserts: Vec<&Statement> = plan.iter().filter(|s| s.kind == Kind::Upsert).collect();
    let copied: String = upserts.iter().map(|s| s.rows.as_str()).collect();
    assert!(copied.contains("{}\t1\t0\t{t11}\t11\n"), "{copied}");
    assert!(copied.contains("3\t0\t{t15}\t15\n"), "{copied}");
    for u in &upserts {
        assert!(!u.sql.contains("\"n\" = EXCLUDED"), "{}", u.sql);
        assert!(!u.sql.contains("\"tags\" = EXCLUDED"), "{}", u.sql);
        assert!(
            !u.sql.contains("\"_pgrelay_counts\" = EXCLUDED"),
            "{}",
            u.sql
        );
    }
}

#[test]
fn truncate_cuts_the_batch() {
    let t = targets();
    let records = vec![
        record(Op::Insert, "1", 10, &[("id", "1")]),
        record(Op::Truncate, "", 11, &[]),
        record(Op::Insert, "1", 12, &[("id", "1")]),
    ];
    let plan = plan(&parsed(&records, &t));
    let kinds: Vec<Kind> = plan.iter().map(|s| s.kind).collect();
    assert_eq!(kinds, vec![Kind::Upsert, Kind::Truncate, Kind::Upsert]);
    assert_eq!(plan[1].rows, r#"[{"_pgrelay_hlc":11}]"#);
}

#[test]
fn key_buckets_are_stable_sorted_and_cover_truncates() {
    let t = targets();
    let records = vec![
        record(Op::Update, "1", 10, &[("id", "1")]),
        record(Op::Update, "1", 20, &[("id", "1")]),
        record(Op::Insert, "2", 5, &[("id", "2")]),
        record(Op::Truncate, "", 30, &[]),
    ];
    let p = parsed(&records, &t);
    assert_eq!(key_buckets(&p[0..1]), key_buckets(&p[1..2]));
    let both = key_buckets(&[p[2].clone(), p[0].clone(), p[1].clone()]);
    assert!(both.windows(2).all(|w| w[0] < w[1]));
    assert!(both.len() <= 2);
    assert_eq!(
        key_buckets(&[p[0].clone(), p[3].clone()]).len(),
        KEY_BUCKETS as usize
    );
    // the bucket is the capture side's partition hash
    let h = row_hash(&TableName::new("public", "p"), [("id", Some("2"))]);
    assert_eq!(key_buckets(&p[2..3]), vec![h % KEY_BUCKETS]);
    assert_eq!(buckets_param(&[3, 7]), "{3,7}");
}

#[test]
fn a_column_type_change_stages_into_a_new_table() {
    let mut t = targets();
    let tt = t.get_mut("public.p").unwrap();
    let (before, _) = upsert_sql(tt, &["id", "v"]);
    assert_eq!(before, upsert_sql(tt, &["id", "v"]).0, "stable name");
    tt.column_types[1] = "character varying(20)".into();
    let (after, _) = upsert_sql(tt, &["id", "v"]);
    assert_ne!(before.name, after.name);
    // a type of a column that is not staged changes nothing
    tt.column_types[2] = "json".into();
    assert_eq!(after, upsert_sql(tt, &["id", "v"]).0);
}

#[test]
fn identifiers_are_quoted() {
    let mut t = targets();
    let tt = t.get_mut("public.p").unwrap();
    tt.name = TableName::new("public", "we\"ird");
    let (stage, sql) = upsert_sql(tt, &["id", "a\"b"]);
    assert!(sql.contains("\"public\".\"we\"\"ird\""));
    assert!(sql.contains("\"a\"\"b\""));
    assert!(stage.create.contains("FROM \"public\".\"we\"\"ird\""));
    assert!(stage.copy.contains("\"a\"\"b\""));
}

#[test]
fn an_upsert_is_rechecked_only_below_the_newest_tombstone() {
    let t = targets();
    let records = vec![
        record(Op::Update, "1", 40, &[("id", "1"), ("v", "a")]),
        record(Op::Update, "2", 25, &[("id", "2"), ("v", "b")]),
        record(Op::Update, "1", 50, &[("id", "1"), ("v", "c")]),
        record(Op::Delete, "3", 20, &[]),
    ];
    let plan = plan(&parsed(&records, &t));
    let upsert = plan.iter().find(|s| s.kind == Kind::Upsert).unwrap();
    // the survivors are stamped 50 and 25: the superseded 40 does not count
    assert_eq!(upsert.members, vec![1, 2]);
    assert_eq!(upsert.oldest, Hlc::new(25));
    let delete = plan.iter().find(|s| s.kind == Kind::Delete).unwrap();
    assert_eq!(delete.oldest, Hlc::new(20));
    // no tombstone, or only older ones: the fast path
    assert!(!needs_recheck(-1, upsert.oldest));
    assert!(!needs_recheck(24, upsert.oldest));
    // a tombstone as new as a row may cover it (a tie covers: LWW keeps
    // the delete)
    assert!(needs_recheck(25, upsert.oldest));
    assert!(needs_recheck(i64::MAX, upsert.oldest));
    assert!(!needs_recheck(i64::MAX, Hlc::new(u64::MAX)));
    assert!(needs_recheck(0, Hlc::ZERO));
}

#[test]
fn the_upsert_looks_tombstones_up_only_for_rows_not_above_the_newest() {
    let t = targets();
    let records = vec![record(Op::Insert, "1", 40, &[("id", "1"), ("v", "a")])];
    let plan = plan(&parsed(&records, &t));
    let upsert = plan.iter().find(|s| s.kind == Kind::Upsert).unwrap();
    let stage = upsert.stage.as_ref().unwrap();
    assert_eq!(
        stage.newest_tombstone,
        "SELECT coalesce(max(ts.hlc), -1) FROM pgrelay.tombstones ts \
         WHERE ts.table_name = 'public.p'"
    );
    // the newest tombstone is read once (an uncorrelated subquery), the
    // per-row lookup only where a row is not above it; the table-wide
    // tombstone of a truncate is among both
    assert!(
        upsert.sql.contains(&format!(
            "WHERE (r.\"_pgrelay_hlc\" > ({}) OR NOT EXISTS (SELECT 1 FROM pgrelay.tombstones ts \
             WHERE ts.table_name = 'public.p' AND ts.pk IN (jsonb_build_object('id', r.\"id\"::text), \
             '{{}}'::jsonb) AND ts.hlc >= r.\"_pgrelay_hlc\")) ON CONFLICT",
            stage.newest_tombstone
        )),
        "{}",
        upsert.sql
    );
    // the recheck itself is unchanged: the key's or the table's tombstone
    // at or above the row's stamp takes the row back
    assert!(stage.recheck.contains(
        "ts.pk IN (jsonb_build_object('id', cur.\"id\"::text), '{}'::jsonb) AND ts.hlc >= cur.\"_pgrelay_hlc\""
    ));
}

#[test]
fn inserts_get_a_plain_insert_of_the_keys_the_target_lacks() {
    let t = targets();
    let records = vec![
        record(Op::Insert, "1", 10, &[("id", "1"), ("v", "a")]),
        record(Op::Update, "2", 11, &[("id", "2"), ("v", "b")]),
        record(Op::Insert, "3", 12, &[("id", "3"), ("v", "c")]),
        // inserted, then updated in the batch: an update
        record(Op::Insert, "4", 13, &[("id", "4"), ("v", "d")]),
        record(Op::Update, "4", 14, &[("id", "4"), ("v", "e")]),
    ];
    let plan = plan(&parsed(&records, &t));
    assert_eq!(plan.len(), 2, "{plan:#?}");
    let inserts = plan.iter().find(|s| s.members == vec![0, 2]).unwrap();
    let updates = plan.iter().find(|s| s.members == vec![1, 4]).unwrap();
    assert_eq!(inserts.kind, Kind::Upsert);
    assert_eq!(inserts.oldest, Hlc::new(10));
    assert_eq!(updates.oldest, Hlc::new(11));
    // the same staging table and upsert for both
    assert_eq!(
        inserts.stage.as_ref().unwrap().name,
        updates.stage.as_ref().unwrap().name
    );
    assert_eq!(inserts.sql, updates.sql);
    assert!(updates.stage.as_ref().unwrap().insert.is_none());
    let stage = inserts.stage.as_ref().unwrap();
    let insert = stage.insert.as_deref().unwrap();
    assert_eq!(
        insert,
        format!(
            "INSERT INTO \"public\".\"p\" (\"id\", \"v\", \"_pgrelay_hlc\") \
             SELECT r.\"id\", r.\"v\", r.\"_pgrelay_hlc\" FROM \"{name}\" AS r \
             WHERE NOT EXISTS (SELECT 1 FROM \"public\".\"p\" AS cur WHERE cur.\"id\" = r.\"id\" OFFSET 0) \
             AND (r.\"_pgrelay_hlc\" > ({newest}) OR NOT EXISTS (SELECT 1 FROM pgrelay.tombstones ts \
             WHERE ts.table_name = 'public.p' AND ts.pk IN (jsonb_build_object('id', r.\"id\"::text), \
             '{{}}'::jsonb) AND ts.hlc >= r.\"_pgrelay_hlc\"))",
            name = stage.name,
            newest = stage.newest_tombstone,
        )
    );
    // no ON CONFLICT: a row of the key that committed meanwhile is a
    // unique violation, and the upsert does it all
    assert!(!insert.contains("ON CONFLICT"));
    // the upsert holds rows back by the same tombstone condition
    assert!(inserts
        .sql
        .contains(&insert[insert.find("(r.\"_pgrelay_hlc\" >").unwrap()..]));
}

#[test]
fn a_composite_key_is_looked_up_whole() {
    let mut t = targets();
    let mut tt = t.get("public.p").unwrap().clone();
    tt.key = vec!["id".into(), "v".into()];
    t.insert("public.p".into(), tt);
    let records = vec![record(Op::Insert, "1", 10, &[("id", "1"), ("v", "a")])];
    let plan = plan(&parsed(&records, &t));
    let insert = plan[0].stage.as_ref().unwrap().insert.clone().unwrap();
    assert!(
        insert.contains("WHERE cur.\"id\" = r.\"id\" AND cur.\"v\" = r.\"v\" OFFSET 0"),
        "{insert}"
    );
}
