use super::*;
use crate::apply::record::{parse, Targets};

fn targets() -> Targets {
    let mut t = Targets::new();
    t.insert(
        "public.p".into(),
        TargetTable {
            name: TableName::new("public", "p"),
            key: vec!["id".into()],
            columns: vec!["id".into(), "v".into(), "doc".into()],
            column_types: vec!["integer".into(), "text".into(), "jsonb".into()],
            json_columns: vec![("doc".into(), "jsonb".into())],
            admit: Default::default(),
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
