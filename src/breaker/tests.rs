use super::*;

fn rule(text: &str) -> Rule {
    let raw: RawRule = toml::from_str(text).unwrap();
    let orders = TableName::new("public", "orders");
    let products = TableName::new("public", "products");
    Rule::from_raw(raw, 0, &["us", "eu"], &[&orders, &products]).unwrap()
}

fn seen(table: &TableName, op: Op, ms: i64) -> Seen<'_> {
    Seen {
        table,
        op,
        commit_ts_ms: ms,
    }
}

#[test]
fn deletes_within_the_window_trip_at_the_first_one_past_the_limit() {
    let rules = vec![rule("max_deletes = 3\nwindow = \"10s\"")];
    let t = TableName::new("public", "orders");
    let mut c = Counter::default();
    let mut rows = |_: &TableName| None;
    for i in 0..3 {
        assert_eq!(
            c.judge(&rules, "us", &seen(&t, Op::Delete, 1000 + i), &mut rows),
            Verdict::Pass
        );
    }
    // inserts and updates do not count as deletes
    assert_eq!(
        c.judge(&rules, "us", &seen(&t, Op::Insert, 1500), &mut rows),
        Verdict::Pass
    );
    let Verdict::Hold(Some(trip)) = c.judge(&rules, "us", &seen(&t, Op::Delete, 2000), &mut rows)
    else {
        panic!("the fourth delete trips")
    };
    assert_eq!(trip.kind, "delete");
    assert!(trip
        .reason
        .contains("more than 3 deletes of public.orders from us"));
    // a held change was not counted: after the window moved on, deletes pass again
    assert_eq!(
        c.judge(&rules, "us", &seen(&t, Op::Delete, 20_000), &mut rows),
        Verdict::Pass
    );
}

#[test]
fn the_window_slides_in_commit_time() {
    let rules = vec![rule("max_updates = 2\nwindow = \"5s\"")];
    let t = TableName::new("public", "orders");
    let mut c = Counter::default();
    let mut rows = |_: &TableName| None;
    for ms in [0, 4_000, 9_100, 13_000] {
        assert_eq!(
            c.judge(&rules, "us", &seen(&t, Op::Update, ms), &mut rows),
            Verdict::Pass,
            "at {ms}"
        );
    }
    assert!(matches!(
        c.judge(&rules, "us", &seen(&t, Op::Update, 13_500), &mut rows),
        Verdict::Hold(Some(_))
    ));
}

#[test]
fn a_fraction_of_the_rows_trips_from_min_rows_on() {
    let rules = vec![rule("max_fraction = 0.5\nmin_rows = 4\ntruncate = false")];
    let t = TableName::new("public", "orders");
    let mut c = Counter::default();
    let mut asked = 0;
    let mut rows = |_: &TableName| {
        asked += 1;
        Some(6)
    };
    for i in 0..3 {
        assert_eq!(
            c.judge(&rules, "us", &seen(&t, Op::Delete, i), &mut rows),
            Verdict::Pass
        );
    }
    // 4 of 6 > 50%
    let v = c.judge(&rules, "us", &seen(&t, Op::Update, 3), &mut rows);
    let Verdict::Hold(Some(trip)) = v else {
        panic!("{v:?}")
    };
    assert_eq!(trip.kind, "change");
    assert!(trip.reason.contains("of its 6 rows"), "{}", trip.reason);
    assert_eq!(asked, 1, "row counts are asked only from min_rows on");
    // truncate = false: a truncate passes
    assert_eq!(
        c.judge(&rules, "us", &seen(&t, Op::Truncate, 4), &mut |_| None),
        Verdict::Pass
    );
}

#[test]
fn truncates_trip_and_the_most_specific_rule_wins() {
    let rules = vec![
        rule("max_deletes = 1"),
        rule("source = \"us\"\ntable = \"public.products\"\nmax_deletes = 100\ntruncate = false"),
    ];
    let orders = TableName::new("public", "orders");
    let products = TableName::new("public", "products");
    assert_eq!(rule_for(&rules, "us", &products), Some(&rules[1]));
    assert_eq!(rule_for(&rules, "eu", &products), Some(&rules[0]));
    let mut c = Counter::default();
    let mut rows = |_: &TableName| None;
    assert!(matches!(
        c.judge(&rules, "eu", &seen(&orders, Op::Truncate, 0), &mut rows),
        Verdict::Hold(Some(Trip {
            kind: "truncate",
            ..
        }))
    ));
    assert_eq!(
        c.judge(&rules, "us", &seen(&products, Op::Truncate, 0), &mut rows),
        Verdict::Pass
    );
    for i in 0..50 {
        assert_eq!(
            c.judge(&rules, "us", &seen(&products, Op::Delete, i), &mut rows),
            Verdict::Pass
        );
    }
}

#[test]
fn frozen_holds_everything_then_release_and_discard_let_the_storm_pass() {
    let rules = vec![rule("max_deletes = 1")];
    let orders = TableName::new("public", "orders");
    let products = TableName::new("public", "products");
    let mut c = Counter::default();
    let mut rows = |_: &TableName| None;
    c.frozen = Some("storm".into());
    assert_eq!(
        c.judge(&rules, "us", &seen(&products, Op::Insert, 0), &mut rows),
        Verdict::Hold(None)
    );
    // release at 5000: everything committed until then passes uncounted
    c.resume(5_000, None);
    for i in 0..10 {
        assert_eq!(
            c.judge(&rules, "us", &seen(&orders, Op::Delete, i * 100), &mut rows),
            Verdict::Pass
        );
    }
    // counting starts again after it
    assert_eq!(
        c.judge(&rules, "us", &seen(&orders, Op::Delete, 6_000), &mut rows),
        Verdict::Pass
    );
    assert!(matches!(
        c.judge(&rules, "us", &seen(&orders, Op::Delete, 6_001), &mut rows),
        Verdict::Hold(Some(_))
    ));
    // discard until 7000: the storm's kind of change is parked, the rest applies
    c.frozen = Some("storm".into());
    c.resume(7_000, Some((orders.clone(), "delete".into(), 7_000)));
    assert_eq!(
        c.judge(&rules, "us", &seen(&orders, Op::Delete, 6_001), &mut rows),
        Verdict::Discard
    );
    assert_eq!(
        c.judge(&rules, "us", &seen(&orders, Op::Update, 6_002), &mut rows),
        Verdict::Pass
    );
    assert_eq!(
        c.judge(&rules, "us", &seen(&products, Op::Delete, 6_003), &mut rows),
        Verdict::Pass
    );
    assert_eq!(
        c.judge(&rules, "us", &seen(&orders, Op::Delete, 7_500), &mut rows),
        Verdict::Pass
    );
}

#[test]
fn bad_rules_name_the_key() {
    let orders = TableName::new("public", "orders");
    let err = |text: &str| {
        let raw: RawRule = toml::from_str(text).unwrap();
        Rule::from_raw(raw, 2, &["us"], &[&orders]).unwrap_err()
    };
    assert!(err("source = \"mars\"").contains("breakers[2].source"));
    assert!(err("table = \"public.nope\"").contains("breakers[2].table"));
    assert!(err("max_fraction = 1.5").contains("max_fraction"));
    assert!(err("max_deletes = 0").contains("max_deletes = 0"));
    assert!(err("truncate = false").contains("sets no threshold"));
    assert!(err("window = \"soon\"").contains("breakers[2].window"));
    assert!(toml::from_str::<RawRule>("max_delete = 3").is_err());
    let a = rule("max_deletes = 3");
    assert!(check_unique(&[a.clone(), a])
        .unwrap_err()
        .contains("merge them"));
}
