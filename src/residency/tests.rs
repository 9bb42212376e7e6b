use super::*;
use crate::config::parse_with_env;
use crate::event::{ColumnDesc, Lsn, TxMeta};

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
name = "users"
class = "local"

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
eu = []

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

fn config() -> Config {
    parse_with_env(CONFIG, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"))
}

fn policy(source: &str) -> Policy {
    Policy::compile(&config(), source).unwrap()
}

fn schema(oid: u32, table: &str, columns: &[&str]) -> Arc<TableSchema> {
    Arc::new(TableSchema {
        oid,
        table: TableName::new("public", table),
        columns: columns
            .iter()
            .enumerate()
            .map(|(i, name)| ColumnDesc {
                name: name.to_string(),
                type_oid: 25,
                is_key: i == 0,
            })
            .collect(),
    })
}

fn orders() -> Arc<TableSchema> {
    schema(40, "orders", &["id", "country", "email", "card", "doc"])
}

fn t(s: &str) -> Datum {
    Datum::Text(s.to_string())
}

fn row(values: &[&str]) -> Vec<Datum> {
    values
        .iter()
        .map(|v| match *v {
            "NULL" => Datum::Null,
            "UNCHANGED" => Datum::Unchanged,
            v => t(v),
        })
        .collect()
}

fn change(
    schema: &Arc<TableSchema>,
    op: Op,
    before: Option<Vec<Datum>>,
    after: Option<Vec<Datum>>,
) -> Change {
    Change {
        schema: schema.clone(),
        op,
        before,
        after,
        hlc: crate::hlc::Hlc::new(1),
        tx: Arc::new(TxMeta {
            xid: 1,
            commit_lsn: Lsn(1),
            commit_ts_us: 0,
        }),
        seq: 0,
    }
}

/// Routes to the named destination.
fn route<'c>(p: &Policy, c: &'c Change, dest: &str) -> Verdict<'c> {
    let i = p.destinations().iter().position(|d| d == dest).unwrap();
    p.route(c, i)
}

fn published(v: Verdict) -> Routed {
    match v {
        Verdict::Publish(r) => r,
        Verdict::Drop(reason) => panic!("dropped: {reason:?}"),
    }
}

/// What region us (key id k7) sends for `value`.
fn hash(value: &str) -> String {
    hmac_sha256_hex(b"us-key-0123456789abcdef0123456789", "k7", value)
}

fn hmac_sha256_hex(key: &[u8], key_id: &str, value: &str) -> String {
    // RFC 2104 HMAC built on plain SHA-256, independently of the policy code
    use sha2::Digest;
    let mut block = [0u8; 64];
    block[..key.len()].copy_from_slice(key);
    let pad = |b: u8| block.iter().map(|k| k ^ b).collect::<Vec<u8>>();
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(value.as_bytes())
        .finalize();
    let outer = Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize();
    let hex: String = outer.iter().map(|b| format!("{b:02x}")).collect();
    format!("{key_id}:{hex}")
}

#[test]
fn destinations_exclude_the_source() {
    assert_eq!(policy("us").destinations(), ["cn", "eu"]);
    assert_eq!(policy("eu").destinations(), ["cn", "us"]);
    assert_eq!(policy("eu").source(), "eu");
    let e = Policy::compile(&config(), "xx").unwrap_err().to_string();
    assert!(e.contains("declared regions: cn, eu, us"), "{e}");
}

#[test]
fn declared_tables() {
    let p = policy("us");
    assert!(p.is_declared(&TableName::new("public", "products")));
    assert!(p.is_declared(&TableName::new("public", "orders")));
    assert!(p.is_declared(&TableName::new("public", "currencies")));
    assert!(!p.is_declared(&TableName::new("public", "users")));
    assert!(!p.is_declared(&TableName::new("public", "other")));
    assert!(!p.is_declared(&TableName::new("other", "orders")));
}

#[test]
fn undeclared_and_local_never_leave() {
    let p = policy("us");
    let other = schema(1, "other", &["id"]);
    let users = schema(2, "users", &["id"]);
    for dest in ["eu", "cn"] {
        let c = change(&other, Op::Insert, None, Some(row(&["1"])));
        assert_eq!(route(&p, &c, dest), Verdict::Drop(DropReason::Undeclared));
        for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
            let c = change(&users, op, Some(row(&["1"])), Some(row(&["1"])));
            assert_eq!(route(&p, &c, dest), Verdict::Drop(DropReason::Local));
        }
    }
}

#[test]
fn global_goes_everywhere_as_is() {
    let products = schema(3, "products", &["id", "name"]);
    for source in ["us", "eu", "cn"] {
        let p = policy(source);
        for i in 0..p.destinations().len() {
            let c = change(
                &products,
                Op::Update,
                Some(row(&["1", "a"])),
                Some(row(&["1", "UNCHANGED"])),
            );
            let r = published(p.route(&c, i));
            assert_eq!(r.op, Op::Update);
            assert_eq!(&*r.columns, ["id", "name"]);
            assert_eq!(r.before.as_deref(), Some(&row(&["1", "a"])[..]));
            assert_eq!(r.after.as_deref(), Some(&row(&["1", "UNCHANGED"])[..]));
        }
    }
}

#[test]
fn owned_goes_only_from_the_owner() {
    let currencies = schema(4, "currencies", &["code"]);
    let c = change(&currencies, Op::Insert, None, Some(row(&["EUR"])));
    let us = policy("us");
    assert_eq!(
        published(route(&us, &c, "eu")).after.as_deref(),
        Some(&row(&["EUR"])[..])
    );
    assert!(matches!(route(&us, &c, "cn"), Verdict::Publish(_)));
    let eu = policy("eu");
    for dest in ["us", "cn"] {
        assert_eq!(route(&eu, &c, dest), Verdict::Drop(DropReason::NotOwner));
    }
    let t = change(&currencies, Op::Truncate, None, None);
    assert_eq!(published(route(&us, &t, "cn")).op, Op::Truncate);
    assert_eq!(route(&eu, &t, "cn"), Verdict::Drop(DropReason::NotOwner));
}

#[test]
fn partitioned_insert_and_delete_follow_the_home() {
    let p = policy("eu");
    let o = orders();
    let ins = |country: &str| {
        change(
            &o,
            Op::Insert,
            None,
            Some(row(&["1", country, "a@b", "NULL", "d"])),
        )
    };
    // homed in us: allowed to eu and cn (and us)
    assert!(matches!(route(&p, &ins("US"), "us"), Verdict::Publish(_)));
    assert!(matches!(route(&p, &ins("us"), "cn"), Verdict::Publish(_)));
    // homed in eu: nowhere else
    for dest in ["us", "cn"] {
        assert_eq!(
            route(&p, &ins("DE"), dest),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
        assert_eq!(
            route(&p, &ins("eu"), dest),
            Verdict::Drop(DropReason::HomeNotAllowed)
        );
    }
    // homed in cn: only cn
    assert!(matches!(route(&p, &ins("CN"), "cn"), Verdict::Publish(_)));
    assert_eq!(
        route(&p, &ins("CN"), "us"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
    // unknown home: nowhere (values are case-sensitive)
    for value in ["NULL", "XX", "Us", "UNCHANGED"] {
        assert_eq!(
            route(&p, &ins(value), "us"),
            Verdict::Drop(DropReason::UnknownHome),
            "{value}"
        );
    }
    // deletes use the old row
    let del = |country: &str| {
        change(
            &o,
            Op::Delete,
            Some(row(&["1", country, "NULL", "NULL", "NULL"])),
            None,
        )
    };
    let d = del("US");
    let r = published(route(&p, &d, "cn"));
    assert_eq!(r.op, Op::Delete);
    assert_eq!(r.before.unwrap()[1], t("US"));
    assert_eq!(
        route(&p, &del("FR"), "cn"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
    assert_eq!(
        route(&p, &del("NULL"), "cn"),
        Verdict::Drop(DropReason::UnknownHome)
    );
    // a truncate has no homes: it stays in its region
    let tr = change(&o, Op::Truncate, None, None);
    assert_eq!(
        route(&p, &tr, "us"),
        Verdict::Drop(DropReason::TruncatePartitioned)
    );
}

#[test]
fn partitioned_update_within_allowed_homes() {
    let p = policy("us");
    let o = orders();
    // us -> us: eu may receive both, update stays an update
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "US", "a@b", "1234", "d"])),
        Some(row(&["1", "us", "c@d", "5678", "UNCHANGED"])),
    );
    let r = published(route(&p, &c, "eu"));
    assert_eq!(r.op, Op::Update);
    assert_eq!(&*r.columns, ["id", "country", "card", "doc"]);
    assert_eq!(
        r.before.as_deref(),
        Some(&row(&["1", "US", "****", "d"])[..])
    );
    assert_eq!(
        r.after.as_deref(),
        Some(&row(&["1", "us", "****", "UNCHANGED"])[..])
    );
    // no old tuple: the home is assumed unchanged
    let c = change(
        &o,
        Op::Update,
        None,
        Some(row(&["1", "DE", "x", "NULL", "d"])),
    );
    assert_eq!(
        route(&p, &c, "cn"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
    let c = change(
        &o,
        Op::Update,
        None,
        Some(row(&["1", "US", "x", "NULL", "d"])),
    );
    assert_eq!(published(route(&p, &c, "cn")).op, Op::Update);
    // old tuple without the home value (unchanged marker): assumed unchanged
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "UNCHANGED", "x", "NULL", "d"])),
        Some(row(&["1", "US", "y", "NULL", "d"])),
    );
    assert_eq!(published(route(&p, &c, "cn")).op, Op::Update);
    // new home column unchanged: taken from the old row
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "DE", "x", "NULL", "d"])),
        Some(row(&["1", "UNCHANGED", "y", "NULL", "d"])),
    );
    assert_eq!(
        route(&p, &c, "cn"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
    assert_eq!(published(route(&p, &c, "eu")).op, Op::Update);
    // neither home known
    let c = change(
        &o,
        Op::Update,
        None,
        Some(row(&["1", "NULL", "y", "NULL", "d"])),
    );
    assert_eq!(route(&p, &c, "eu"), Verdict::Drop(DropReason::UnknownHome));
}

#[test]
fn home_moving_out_becomes_a_delete() {
    let p = policy("us");
    let o = orders();
    // us -> eu: cn received the row while it was homed in us, must lose it
    let before = row(&["1", "US", "a@b", "1234", "doc"]);
    let c = change(
        &o,
        Op::Update,
        Some(before.clone()),
        Some(row(&["1", "DE", "a@b", "1234", "UNCHANGED"])),
    );
    let r = published(route(&p, &c, "cn"));
    assert_eq!(r.op, Op::Delete);
    assert_eq!(r.after, None);
    assert_eq!(&*r.columns, ["id", "country", "email", "card", "doc"]);
    assert_eq!(
        r.before.as_deref(),
        Some(&vec![t("1"), t("US"), t(&hash("a@b")), t("****"), t("doc")][..])
    );
    // eu is allowed both before and after: a plain update
    assert_eq!(published(route(&p, &c, "eu")).op, Op::Update);
    // moving to an unknown home also removes it
    let c = change(
        &o,
        Op::Update,
        Some(before),
        Some(row(&["1", "NULL", "a@b", "1234", "doc"])),
    );
    assert_eq!(published(route(&p, &c, "cn")).op, Op::Delete);
    assert_eq!(published(route(&p, &c, "eu")).op, Op::Delete);
}

#[test]
fn home_moving_in_becomes_an_insert_of_the_whole_row() {
    let p = policy("eu");
    let o = orders();
    // eu -> us: cn may now receive it; TOAST-unchanged values come from the old row
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "DE", "a@b", "NULL", "big document"])),
        Some(row(&["1", "US", "UNCHANGED", "UNCHANGED", "UNCHANGED"])),
    );
    let r = published(route(&p, &c, "cn"));
    assert_eq!(r.op, Op::Insert);
    assert_eq!(r.before, None);
    assert_eq!(
        r.after.as_deref(),
        Some(
            &vec![
                t("1"),
                t("US"),
                t(&hmac_sha256_hex(
                    b"eu-key-0123456789abcdef0123456789",
                    "k1",
                    "a@b"
                )),
                Datum::Null,
                t("big document")
            ][..]
        )
    );
    // us is the new home: also an insert there
    let r = published(route(&p, &c, "us"));
    assert_eq!(r.op, Op::Insert);
    assert_eq!(r.after.unwrap()[4], t("big document"));
    // a value the old row did not carry stays unchanged
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "DE", "a@b", "NULL", "UNCHANGED"])),
        Some(row(&["1", "US", "a@b", "NULL", "UNCHANGED"])),
    );
    assert_eq!(
        published(route(&p, &c, "cn")).after.unwrap()[4],
        Datum::Unchanged
    );
    // from an unknown home
    let c = change(
        &o,
        Op::Update,
        Some(row(&["1", "NULL", "a@b", "NULL", "d"])),
        Some(row(&["1", "CN", "a@b", "NULL", "d"])),
    );
    assert_eq!(published(route(&p, &c, "cn")).op, Op::Insert);
    assert_eq!(
        route(&p, &c, "us"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
}

#[test]
fn column_rules_per_destination() {
    let p = policy("us");
    let o = orders();
    let c = change(
        &o,
        Op::Insert,
        None,
        Some(vec![t("1"), t("US"), t("a@b"), t("4111"), Datum::Null]),
    );
    // cn: email hashed, card masked
    let r = published(route(&p, &c, "cn"));
    assert_eq!(&*r.columns, ["id", "country", "email", "card", "doc"]);
    assert_eq!(
        r.after.as_deref(),
        Some(&vec![t("1"), t("US"), t(&hash("a@b")), t("****"), Datum::Null][..])
    );
    assert_eq!(
        hash("a@b").len(),
        3 + 64,
        "key id and lowercase hex of HMAC-SHA-256"
    );
    // eu: email dropped, card masked
    let r = published(route(&p, &c, "eu"));
    assert_eq!(&*r.columns, ["id", "country", "card", "doc"]);
    assert_eq!(
        r.after.as_deref(),
        Some(&vec![t("1"), t("US"), t("****"), Datum::Null][..])
    );
    // NULL and unchanged stay as they are under hash and mask
    let c = change(
        &o,
        Op::Update,
        Some(vec![t("1"), t("US"), Datum::Null, Datum::Null, Datum::Null]),
        Some(vec![
            t("1"),
            t("US"),
            Datum::Unchanged,
            Datum::Unchanged,
            Datum::Null,
        ]),
    );
    let r = published(route(&p, &c, "cn"));
    assert_eq!(
        r.before.as_deref(),
        Some(&vec![t("1"), t("US"), Datum::Null, Datum::Null, Datum::Null][..])
    );
    assert_eq!(
        r.after.as_deref(),
        Some(
            &vec![
                t("1"),
                t("US"),
                Datum::Unchanged,
                Datum::Unchanged,
                Datum::Null
            ][..]
        )
    );
}

#[test]
fn hash_matches_the_documented_formula() {
    let p = policy("us");
    // k7:hex(HMAC-SHA-256(us's key, "a@b")), computed independently
    assert_eq!(p.hash("a@b"), hash("a@b"));
    assert_ne!(p.hash("a@b"), p.hash("a@c"));
    let hashed = p.hash("x");
    let hex = hashed.strip_prefix("k7:").expect("key id prefix");
    assert_eq!(hex.len(), 64);
    assert!(hex
        .chars()
        .all(|c| c.is_ascii_digit() || ('a'..='f').contains(&c)));
    // each source region hashes with its own key
    let eu = policy("eu").hash("a@b");
    assert!(eu.starts_with("k1:"), "{eu}");
    assert_ne!(eu[3..], p.hash("a@b")[3..]);
}

#[test]
fn schema_changes_rebuild_the_plan() {
    let p = policy("us");
    let v1 = schema(40, "orders", &["id", "country", "email", "card"]);
    let c = change(&v1, Op::Insert, None, Some(row(&["1", "US", "a@b", "c"])));
    assert_eq!(
        &*published(route(&p, &c, "eu")).columns,
        ["id", "country", "card"]
    );
    // same oid, new columns (an ALTER TABLE): the cached plan must not be reused
    let v2 = schema(40, "orders", &["id", "email", "country", "note", "card"]);
    let c = change(
        &v2,
        Op::Insert,
        None,
        Some(row(&["1", "a@b", "US", "n", "c"])),
    );
    let r = published(route(&p, &c, "eu"));
    assert_eq!(&*r.columns, ["id", "country", "note", "card"]);
    assert_eq!(
        r.after.as_deref(),
        Some(&row(&["1", "US", "n", "****"])[..])
    );
    // an equal schema in a fresh Arc hits the cache
    let v2b = schema(40, "orders", &["id", "email", "country", "note", "card"]);
    let c = change(
        &v2b,
        Op::Insert,
        None,
        Some(row(&["1", "a@b", "DE", "n", "c"])),
    );
    assert_eq!(
        route(&p, &c, "cn"),
        Verdict::Drop(DropReason::HomeNotAllowed)
    );
    // without the home column, rows stay home
    let v3 = schema(40, "orders", &["id", "email", "card"]);
    let c = change(&v3, Op::Insert, None, Some(row(&["1", "a@b", "c"])));
    assert_eq!(route(&p, &c, "eu"), Verdict::Drop(DropReason::UnknownHome));
    // a rule column renamed away: nothing of the table leaves, whatever the op
    let v4 = schema(40, "orders", &["id", "country", "email", "cardnum"]);
    for op in [Op::Insert, Op::Update, Op::Delete, Op::Truncate] {
        let r = Some(row(&["1", "US", "a@b", "4111"]));
        let (before, after) = match op {
            Op::Insert => (None, r),
            Op::Update => (r.clone(), r),
            Op::Delete => (r, None),
            Op::Truncate => (None, None),
        };
        let c = change(&v4, op, before, after);
        for dest in ["eu", "cn"] {
            assert_eq!(
                route(&p, &c, dest),
                Verdict::Drop(DropReason::RuleColumnMissing),
                "{op:?} to {dest}"
            );
        }
    }
}

#[test]
fn relations_the_rules_cannot_cover_are_refused() {
    let p = policy("us");
    let orders = TableName::new("public", "orders");
    let full = ["id", "country", "email", "card", "doc"];
    assert_eq!(p.check_relation(&orders, full, Some(b'f')), Ok(()));
    assert_eq!(p.check_relation(&orders, full, None), Ok(()));
    let renamed = ["id", "country", "mail", "card"];
    let err = p.check_relation(&orders, renamed, Some(b'f')).unwrap_err();
    assert_eq!(
        err,
        RelationError::MissingRuleColumn {
            table: orders.clone(),
            column: "email".into()
        }
    );
    let msg = err.to_string();
    assert!(
        msg.contains("public.orders") && msg.contains("\"email\""),
        "{msg}"
    );
    let err = p.check_relation(&orders, full, Some(b'd')).unwrap_err();
    assert!(
        matches!(
            err,
            RelationError::PartitionedIdentity {
                identity: "DEFAULT",
                ..
            }
        ),
        "{err:?}"
    );
    // other classes need no particular identity; local and undeclared
    // tables are never routed
    let products = TableName::new("public", "products");
    assert_eq!(p.check_relation(&products, ["id"], Some(b'd')), Ok(()));
    let users = TableName::new("public", "users");
    assert_eq!(p.check_relation(&users, ["id"], Some(b'd')), Ok(()));
    let other = TableName::new("public", "other");
    assert_eq!(p.check_relation(&other, ["id"], Some(b'n')), Ok(()));
}

#[test]
fn reasons_have_metric_labels() {
    let labels: Vec<&str> = DropReason::ALL.iter().map(|r| r.as_str()).collect();
    assert_eq!(
        labels,
        [
            "undeclared",
            "local",
            "home_not_allowed",
            "unknown_home",
            "not_owner",
            "truncate_partitioned",
            "rule_column_missing"
        ]
    );
}

#[test]
fn matrix_reads_like_the_policy() {
    let m = matrix(&config());
    assert!(
        m.starts_with("Residency matrix (relay.toml; regions: cn, eu, us)\n"),
        "{m}"
    );
    // tables sorted by name
    let pos = |s: &str| m.find(s).unwrap_or_else(|| panic!("{s:?} not in\n{m}"));
    assert!(pos("public.currencies") < pos("public.orders"));
    assert!(pos("public.orders") < pos("public.products"));
    assert!(pos("public.products") < pos("public.users"));
    assert!(
        m.contains("public.users  (local: no row leaves its region)\n"),
        "{m}"
    );
    let section = |name: &str| -> Vec<String> {
        let start = pos(&format!("{name}  ("));
        m[start..]
            .lines()
            .skip(1)
            .take_while(|l| l.starts_with("  "))
            .map(|l| l.split_whitespace().collect::<Vec<_>>().join(" "))
            .collect()
    };
    let currencies = section("public.currencies");
    assert_eq!(currencies[0], "FROM TO ROWS COLUMNS");
    assert!(
        currencies.contains(&"us eu all all columns as they are".to_string()),
        "{m}"
    );
    assert!(currencies.contains(&"eu cn none -".to_string()), "{m}");
    assert_eq!(currencies.len(), 7);
    let orders = section("public.orders");
    assert_eq!(
        orders[0],
        "home of a row: \"cn\", \"CN\" -> cn; \"eu\", \"DE\", \"FR\" -> eu; \"us\", \"US\" -> us; \
         NULL or any other value -> no home (the row stays in its region)"
    );
    let expected = [
        "FROM TO ROWS COLUMNS",
        "cn eu rows homed in eu, us other columns as they are; email dropped, card masked as \"****\"",
        "cn us rows homed in us other columns as they are; card masked as \"****\"",
        "eu cn rows homed in cn, us other columns as they are; email hashed, card masked as \"****\"",
        "eu us rows homed in us other columns as they are; card masked as \"****\"",
        "us cn rows homed in cn, us other columns as they are; email hashed, card masked as \"****\"",
        "us eu rows homed in eu, us other columns as they are; email dropped, card masked as \"****\"",
    ];
    assert_eq!(orders[1..], expected, "{m}");
    // stable
    assert_eq!(m, matrix(&config()));
}

#[test]
fn matrix_names_merge_columns() {
    let text = format!(
        "{CONFIG}\n[[tables]]\nname = \"public.stock\"\nclass = \"global\"\n\
         [[tables.columns]]\nname = \"n\"\nmerge = \"counter\"\n\
         [[tables.columns]]\nname = \"tags\"\nmerge = \"union\"\n"
    );
    let c = parse_with_env(&text, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"));
    let m = matrix(&c);
    assert!(
        m.contains(
            "public.stock  (global: every region writes, every region receives)\n  merged, not \
             last-writer-wins: n (counter: each region's increments add up), tags (union: items \
             from every region kept)\n"
        ),
        "{m}"
    );
    assert!(!matrix(&config()).contains("merged"));
}

#[test]
fn matrix_shows_dr_copies_as_such() {
    let text = format!(
        "{CONFIG}\n[[tables]]\nname = \"public.patients\"\nclass = \"owned\"\nowner = \"eu\"\n\
         dr = [\"us\"]\n"
    );
    let c = parse_with_env(&text, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"));
    let m = matrix(&c);
    let dr = "DR copy, encrypted: every row eu captures, every column, sealed with eu's dr_key \
              (us holds no key, reads nothing)";
    let line = m
        .lines()
        .find(|l| l.contains("public.patients"))
        .map(|_| ())
        .and_then(|_| {
            m.lines()
                .skip_while(|l| !l.contains("public.patients"))
                .find(|l| l.split_whitespace().take(2).collect::<Vec<_>>() == ["eu", "us"])
        })
        .unwrap_or_else(|| panic!("{m}"));
    assert!(line.contains(&format!("; and a {dr}")), "{line}");
    assert_eq!(m.matches("DR copy").count(), 1, "{m}");
}

fn table_rule(config: &Config, table: &str) -> TableRule {
    let table = config.table(&TableName::new("public", table)).unwrap();
    TableRule::compile(config, table)
}

const REGIONS: [&str; 3] = ["cn", "eu", "us"];
const OPS: [Op; 4] = [Op::Insert, Op::Update, Op::Delete, Op::Truncate];

#[test]
fn a_home_value_names_a_region_or_an_alias_or_no_home() {
    let rule = table_rule(&config(), "orders");
    assert_eq!(rule.home_column(), Some("country"));
    for (value, home) in [("eu", "eu"), ("DE", "eu"), ("FR", "eu"), ("US", "us")] {
        assert_eq!(rule.home_of(value), Some(home), "{value}");
    }
    // values are compared as written; an empty one names nothing
    for value in ["XX", "de", "Eu", "", " eu"] {
        assert_eq!(rule.home_of(value), None, "{value:?}");
        for region in REGIONS {
            assert_eq!(rule.may_hold(region, value), Err(DropReason::UnknownHome));
        }
    }
    let values: Vec<(&str, &str)> = rule.home_values().collect();
    assert_eq!(
        values,
        [
            ("CN", "cn"),
            ("DE", "eu"),
            ("FR", "eu"),
            ("US", "us"),
            ("cn", "cn"),
            ("eu", "eu"),
            ("us", "us")
        ]
    );
    // an alias spelled like a region wins over the region's own name
    let text = CONFIG.replace(
        r#"aliases = { DE = "eu", FR = "eu", US = "us", CN = "cn" }"#,
        r#"aliases = { DE = "eu", cn = "eu" }"#,
    );
    let config = parse_with_env(&text, "relay.toml", |_| None).unwrap();
    let rule = table_rule(&config, "orders");
    assert_eq!(rule.home_of("cn"), Some("eu"));
    assert_eq!(rule.may_hold("cn", "cn"), Err(DropReason::HomeNotAllowed));
    assert_eq!(rule.may_hold("eu", "cn"), Ok(()));
}

#[test]
fn a_home_allows_itself_and_the_regions_allow_lists() {
    let rule = table_rule(&config(), "orders");
    // us = ["eu", "cn"], eu = [], cn: not listed
    let held = |value: &str| -> Vec<&str> {
        REGIONS
            .into_iter()
            .filter(|r| rule.may_hold(r, value).is_ok())
            .collect()
    };
    assert_eq!(held("US"), ["cn", "eu", "us"]);
    assert_eq!(held("us"), ["cn", "eu", "us"]);
    assert_eq!(held("DE"), ["eu"]);
    assert_eq!(held("CN"), ["cn"]);
    assert_eq!(rule.may_hold("us", "DE"), Err(DropReason::HomeNotAllowed));
    assert!(rule.home_allows("us", "cn"));
    assert!(!rule.home_allows("cn", "us"));
    assert!(rule.home_allows("cn", "cn"));
}

#[test]
fn which_changes_are_ever_sent() {
    let config = config();
    let orders = table_rule(&config, "orders");
    let currencies = table_rule(&config, "currencies");
    let products = table_rule(&config, "products");
    let users = table_rule(&config, "users");
    assert_eq!(currencies.owner(), Some("us"));
    assert_eq!(orders.owner(), None);
    for source in REGIONS {
        for op in OPS {
            assert_eq!(products.sends(source, op), Ok(()));
            assert_eq!(users.sends(source, op), Err(DropReason::Local));
            let owned = match source {
                "us" => Ok(()),
                _ => Err(DropReason::NotOwner),
            };
            assert_eq!(currencies.sends(source, op), owned, "{source} {op:?}");
            let partitioned = match op {
                Op::Truncate => Err(DropReason::TruncatePartitioned),
                _ => Ok(()),
            };
            assert_eq!(orders.sends(source, op), partitioned, "{source} {op:?}");
        }
        assert_eq!(orders.leaves(source), Ok(()));
        assert_eq!(users.leaves(source), Err(DropReason::Local));
    }
    // every region may hold every row of a table without homes
    for rule in [&products, &currencies] {
        assert_eq!(rule.home_column(), None);
        assert_eq!(rule.home_of("us"), None);
        assert!(REGIONS.iter().all(|r| rule.home_allows("us", r)));
    }
}

/// Routing is the table rule: a change goes to a destination exactly when
/// the rule sends it and lets the destination hold its row, and is dropped
/// for the reason the rule gives.
#[test]
fn routing_follows_the_table_rule() {
    let config = config();
    let schemas = [
        orders(),
        schema(3, "products", &["id", "name"]),
        schema(4, "currencies", &["code"]),
        schema(2, "users", &["id"]),
    ];
    let rule = table_rule(&config, "orders");
    for source in REGIONS {
        let p = policy(source);
        for (i, dest) in p.destinations().iter().enumerate() {
            for value in ["DE", "FR", "US", "CN", "us", "eu", "cn", "XX", "NULL"] {
                let r = row(&["1", value, "a@b", "4111", "{}"]);
                let insert = change(&orders(), Op::Insert, None, Some(r));
                let expected = match value {
                    "NULL" => Err(DropReason::UnknownHome),
                    _ => rule.may_hold(dest, value),
                };
                let got = match p.route(&insert, i) {
                    Verdict::Publish(_) => Ok(()),
                    Verdict::Drop(reason) => Err(reason),
                };
                assert_eq!(got, expected, "{value} from {source} to {dest}");
            }
            for schema in &schemas {
                let rule = table_rule(&config, &schema.table.name);
                let r = row(&vec!["US"; schema.columns.len()]);
                for op in OPS {
                    let c = change(schema, op, Some(r.clone()), Some(r.clone()));
                    if let Err(reason) = rule.sends(source, op) {
                        assert_eq!(p.route(&c, i), Verdict::Drop(reason), "{op:?}");
                    }
                }
            }
        }
    }
}

#[test]
fn a_rule_with_earlier_names_covers_both_shapes_of_a_rename() {
    // `card` renamed to `cardnum` in place; the rule names the new name and
    // the old one, so changes written before the rename (old shape) and
    // after it (new shape) both leave masked
    let text = CONFIG.replace(
        "name = \"card\"\naction = \"mask\"",
        "name = \"cardnum\"\nformerly = [\"card\"]\naction = \"mask\"",
    );
    let config = parse_with_env(&text, "relay.toml", |_| None).unwrap_or_else(|e| panic!("{e}"));
    let p = Policy::compile(&config, "us").unwrap();
    let orders = TableName::new("public", "orders");
    let before = ["id", "country", "email", "card"];
    let after = ["id", "country", "email", "cardnum"];
    assert_eq!(p.check_relation(&orders, before, Some(b'f')), Ok(()));
    assert_eq!(p.check_relation(&orders, after, Some(b'f')), Ok(()));
    // a shape with neither name is still refused, under the current name
    let neither = ["id", "country", "email", "pan"];
    assert_eq!(
        p.check_relation(&orders, neither, Some(b'f')),
        Err(RelationError::MissingRuleColumn {
            table: orders.clone(),
            column: "cardnum".into()
        })
    );
    for columns in [&before, &after] {
        let s = schema(41, "orders", columns);
        let c = change(&s, Op::Insert, None, Some(row(&["1", "US", "a@b", "4111"])));
        for dest in ["eu", "cn"] {
            let r = published(route(&p, &c, dest));
            let at = r.columns.len() - 1;
            assert_eq!(r.columns[at], columns[3], "{dest}");
            assert_eq!(r.after.as_deref().unwrap()[at], t("****"), "{dest}");
        }
    }
    let s = schema(41, "orders", &neither);
    let c = change(&s, Op::Insert, None, Some(row(&["1", "US", "a@b", "4111"])));
    assert_eq!(
        route(&p, &c, "eu"),
        Verdict::Drop(DropReason::RuleColumnMissing)
    );
    assert!(matrix(&config).contains("cardnum (formerly card) masked as \"****\""));
}
