//! Parsing and validation cases, one test per rule (a file of their own:
//! they outweigh the code they test).

use super::env::interpolate;
use super::*;

const BASE: &str = r#"
[relay]
prefix = "pgrelay"

[kafka]
brokers = "localhost:9092"

[regions.us]
id = 1
dsn = "host=us port=5432 user=pgrelay password=s3cret dbname=app"
hash_key = "pepper-pepper-pepper-pepper-pepper"

[regions.eu]
id = 2
dsn = "host=eu dbname=app"
hash_key = "eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu"

[regions.cn]
id = 3
dsn = "host=cn dbname=app"
hash_key = "cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn"
"#;

fn no_env(_: &str) -> Option<String> {
    None
}

fn ok(text: &str) -> Config {
    match parse_with_env(text, "relay.toml", no_env) {
        Ok(c) => c,
        Err(e) => panic!("unexpected error: {e}"),
    }
}

fn err(text: &str) -> String {
    match parse_with_env(text, "relay.toml", no_env) {
        Ok(_) => panic!("expected an error"),
        Err(e) => e.to_string(),
    }
}

fn with_tables(tables: &str) -> String {
    format!("{BASE}\n{tables}")
}

#[track_caller]
fn assert_err(text: &str, parts: &[&str]) {
    let e = err(text);
    for p in parts {
        assert!(e.contains(p), "error {e:?} should contain {p:?}");
    }
}

#[test]
fn example_file_parses() {
    let text = include_str!("../../relay.toml.example");
    let config = parse_with_env(text, "relay.toml.example", |name| {
        Some(match name.ends_with("_DR_KEY") {
            true => DR_KEY.to_string(),
            false => format!("value-of-{name}-0123456789abcdef"),
        })
    })
    .unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(
        config.regions.keys().collect::<Vec<_>>(),
        ["cn", "eu", "us"]
    );
    assert!(config.tables.len() >= 4);
    assert!(config.regions["us"].hash_key.is_some());
}

#[test]
fn defaults_and_helpers() {
    let c = ok(BASE);
    assert_eq!(c.prefix, "pgrelay");
    assert_eq!(c.max_clock_skew, Duration::from_millis(500));
    assert_eq!(c.capture, CaptureSettings::default());
    assert_eq!(c.apply, ApplySettings::default());
    assert_eq!(c.apply.tombstone_horizon, Duration::from_secs(604_800));
    assert_eq!(c.apply.schema_wait, Duration::from_secs(600));
    assert_eq!(c.http.listen, None);
    assert_eq!(c.topic("us", "eu"), "pgrelay.us.eu");
    assert_eq!(c.dlq_topic("eu"), "pgrelay.dlq.eu");
    assert_eq!(c.slot_name("eu"), "pgrelay_eu");
    assert_eq!(c.publication_name(), "pgrelay");
    assert_eq!(c.region("us").unwrap().id, 1);
    assert_eq!(c.kafka_for("cn").brokers, "localhost:9092");
    let e = c.region("xx").unwrap_err().to_string();
    assert_eq!(
        e,
        "region \"xx\" is not declared in relay.toml; declared regions: cn, eu, us"
    );
    let panic = std::panic::catch_unwind(|| c.kafka_for("xx").brokers.clone());
    assert!(panic.is_err());
}

#[test]
fn conflict_log_is_all_off_or_a_percentage() {
    let c = ok(BASE);
    assert_eq!(c.apply.conflict_log_percent, 100);
    assert_eq!(c.apply.conflict_retention, Duration::from_secs(30 * 86_400));
    let with = |v: &str| format!("{BASE}\n[relay.apply]\nconflict_log = \"{v}\"\n");
    assert_eq!(ok(&with("off")).apply.conflict_log_percent, 0);
    assert_eq!(ok(&with("25%")).apply.conflict_log_percent, 25);
    for bad in ["some", "101%", "-1%", "0.5"] {
        let err = parse(&with(bad), "t.toml").unwrap_err().to_string();
        assert!(err.contains("relay.apply.conflict_log"), "{err}");
        assert!(err.contains("\"10%\""), "{err}");
    }
}

#[test]
fn origin_filter_defaults_to_message_and_names_bad_values() {
    assert_eq!(ok(BASE).capture.origin_filter, OriginFilter::Message);
    let c = ok(&format!(
        "{BASE}\n[relay.capture]\norigin_filter = \"server\"\n"
    ));
    assert_eq!(c.capture.origin_filter, OriginFilter::Server);
    let err = parse(
        &format!("{BASE}\n[relay.capture]\norigin_filter = \"none\"\n"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("relay.capture.origin_filter = \"none\""),
        "{err}"
    );
}

#[test]
fn before_image_defaults_to_key_and_names_bad_values() {
    let c = ok(BASE);
    assert_eq!(c.capture.before_image, BeforeImage::Key);
    assert!(!c.needs_full_identity(&TableClass::Global));
    let err = parse(
        &format!("{BASE}\n[relay.capture]\nbefore_image = \"old\"\n"),
        "t.toml",
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("relay.capture.before_image"), "{err}");
    assert!(err.contains("\"key\" or \"full\""), "{err}");
}

#[test]
fn full_settings() {
    let c = ok(&format!(
        r#"{BASE}
[relay.capture]
slot = "my_slot"
publication = "my_pub"
status_interval = "250ms"
max_in_flight = 10
before_image = "full"

[relay.apply]
batch_max_records = 7
batch_max_wait = "0ms"
max_retries = 0
tombstone_horizon = "2h"
schema_wait = "0s"

[http]
listen = "0.0.0.0:9187"
"#
    ));
    assert_eq!(c.slot_name("us"), "my_slot");
    assert_eq!(c.publication_name(), "my_pub");
    assert_eq!(c.capture.status_interval, Duration::from_millis(250));
    assert_eq!(c.capture.max_in_flight, 10);
    assert_eq!(c.capture.before_image, BeforeImage::Full);
    assert!(c.needs_full_identity(&TableClass::Global));
    assert_eq!(c.apply.batch_max_records, 7);
    assert_eq!(c.apply.batch_max_wait, Duration::ZERO);
    assert_eq!(c.apply.max_retries, 0);
    assert_eq!(c.apply.tombstone_horizon, Duration::from_secs(7200));
    assert_eq!(c.apply.schema_wait, Duration::ZERO);
    assert_eq!(c.http.listen, Some("0.0.0.0:9187".parse().unwrap()));
}

#[test]
fn durations() {
    assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
    assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
    assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
    assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
    assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(604_800)));
    for bad in ["", "5", "ms", "1.5s", "-1s", "5 parsecs", "5S"] {
        assert!(parse_duration(bad).is_err(), "{bad:?}");
    }
    assert!(parse_duration("99999999999999999999d").is_err());
    // a bad duration in the file is reported with its line
    let text = format!("{BASE}\n[relay.apply]\nbatch_max_wait = \"soon\"\n");
    let line = text.lines().count();
    assert_err(
        &text,
        &[
            &format!("relay.toml, line {line}, column 18: "),
            "invalid duration \"soon\"",
        ],
    );
    assert_err(
        &format!("{BASE}\n[relay.apply]\nbatch_max_wait = 100\n"),
        &["a duration string"],
    );
    assert_err(
        &BASE.replace("[relay]", "[relay]\nmax_clock_skew = \"0s\""),
        &["relay.max_clock_skew must be greater than zero"],
    );
}

#[test]
fn unknown_key_names_file_and_line() {
    let text = BASE.replace("id = 2", "id = 2\nregion_id = 2");
    let line = text.lines().position(|l| l == "region_id = 2").unwrap() + 1;
    let e = err(&text);
    assert!(
        e.starts_with(&format!("relay.toml, line {line}, column 1: ")),
        "{e}"
    );
    assert!(e.contains("unknown field `region_id`"), "{e}");
    assert!(e.contains(&format!("{line} | region_id = 2")), "{e}");

    let e = err(&format!("{BASE}\n[relay.capture]\nslots = \"x\"\n"));
    assert!(e.contains("unknown field `slots`"), "{e}");
    assert!(e.contains("expected one of"), "{e}");
}

#[test]
fn malformed_toml_names_the_line() {
    let text = BASE.replace("prefix = \"pgrelay\"", "prefix = \"pgrelay\nbroken");
    let line = text
        .lines()
        .position(|l| l == "prefix = \"pgrelay")
        .unwrap()
        + 1;
    let e = err(&text);
    assert!(e.starts_with(&format!("relay.toml, line {line}")), "{e}");
    assert!(
        e.contains(&format!("\n  {line} | prefix = \"pgrelay")),
        "{e}"
    );
}

#[test]
fn syntax_error_does_not_show_interpolated_secret() {
    // the dsn line is broken (missing closing quote) after a secret was inserted
    let text = BASE.replace("password=s3cret dbname=app\"", "password=${PW} dbname=app");
    let e = parse_with_env(&text, "relay.toml", |_| Some("hunter2".into()))
        .unwrap_err()
        .to_string();
    assert!(!e.contains("hunter2"), "{e}");
    assert!(e.contains("${PW}"), "{e}");
}

#[test]
fn env_interpolation() {
    let text = BASE
        .replace("s3cret", "${PG_US_PASSWORD}")
        .replace("\"pepper-pepper-pepper-pepper-pepper\"", "\"${SALT}\"")
        .replace(
            "[kafka]",
            "# brokers can come from ${ANYTHING} too\n[kafka]",
        )
        .replace("\"localhost:9092\"", "\"$${literal}\"");
    let c = parse_with_env(&text, "relay.toml", |name| match name {
        "PG_US_PASSWORD" => Some("pa\"ss\\word".into()),
        "SALT" => Some("salty-salty-salty-salty-salty-salty".into()),
        _ => None,
    })
    .unwrap_or_else(|e| panic!("{e}"));
    // escaped for the connection string too: its parser gives the
    // password back as it is
    assert_eq!(
        c.regions["us"].dsn,
        "host=us port=5432 user=pgrelay password=pa\"ss\\\\word dbname=app"
    );
    let dsn = crate::source::dsn::Dsn::parse(&c.regions["us"].dsn).unwrap();
    assert_eq!(dsn.config.get_password(), Some(&b"pa\"ss\\word"[..]));
    assert_eq!(
        c.regions["us"].hash_key.as_deref(),
        Some("salty-salty-salty-salty-salty-salty")
    );
    assert_eq!(c.regions["us"].kafka.brokers, "${literal}");
}

#[test]
fn env_values_are_escaped_for_the_connection_string_they_land_in() {
    let pw = "a\\b'c d";
    let env = |name: &str| match name {
        "PW" => Some(pw.to_string()),
        "EMPTY" => Some(String::new()),
        _ => None,
    };
    let dsn_of = |line: &str| {
        let text = interpolate(line, "f.toml", &env, &mut Vec::new()).unwrap();
        let value: toml::Table = toml::from_str(&text).unwrap_or_else(|e| panic!("{text}: {e}"));
        let mut value = &toml::Value::Table(value);
        while let toml::Value::Table(t) = value {
            value = t.values().next().unwrap();
        }
        value.as_str().unwrap().to_string()
    };
    let password = |line: &str| {
        let dsn = dsn_of(line);
        let parsed = crate::source::dsn::Dsn::parse(&dsn).unwrap_or_else(|e| panic!("{dsn}: {e}"));
        String::from_utf8(parsed.config.get_password().unwrap().to_vec()).unwrap()
    };
    for line in [
        "dsn = \"host=h user=u password=${PW} dbname=d\"",
        "dsn = \"host=h user=u password=${PW}\"",
        "dsn = \"host=h user=u password = '${PW}' dbname=d\"",
        "setup_dsn = \"user=u password=${PW}\"",
        "dsn = \"host=h password=\\\\x${PW}\"",
        "regions.us.dsn = \"user=u password=${PW}\"",
        "us = { id = 1, dsn = \"user=u password=${PW}\" }",
        "dsn = \"postgres://u:${PW}@h:5432/d?sslmode=disable\"",
        "dsn = \"postgresql://u@h/d?password=${PW}\"",
    ] {
        let want = if line.contains("\\x") {
            format!("x{pw}")
        } else {
            pw.to_string()
        };
        assert_eq!(password(line), want, "{line}");
    }
    // an empty value stays a value
    assert_eq!(password("dsn = \"user=u password=${EMPTY} dbname=d\""), "");
    // other strings are left as they are
    assert_eq!(
        dsn_of("note = \"password=${PW}\""),
        format!("password={pw}")
    );
    assert_eq!(
        dsn_of("dsn_note = \"password=${PW}\""),
        format!("password={pw}")
    );
}

#[test]
fn env_interpolation_contexts() {
    let env = |name: &str| match name {
        "N" => Some("42".to_string()),
        "Q" => Some("it's".to_string()),
        "NL" => Some("a\nb".to_string()),
        _ => None,
    };
    let run = |t: &str| interpolate(t, "f.toml", &env, &mut Vec::new());
    assert_eq!(run("x = ${N}\n").unwrap(), "x = 42\n");
    assert_eq!(run("x = '${N}'").unwrap(), "x = '42'");
    assert_eq!(run("x = \"${NL}\"").unwrap(), "x = \"a\\nb\"");
    assert_eq!(
        run("x = \"\"\"\n${Q}\"\"\"").unwrap(),
        "x = \"\"\"\nit's\"\"\""
    );
    assert_eq!(run("x = '''${Q}'''").unwrap(), "x = '''it's'''");
    // an escaped backslash does not hide the ${ that follows
    assert_eq!(run("x = \"\\\\${N}\"").unwrap(), "x = \"\\\\42\"");
    assert_eq!(run("# ${MISSING}\nx = 1").unwrap(), "# ${MISSING}\nx = 1");
    assert_eq!(run("x = \"a#b${N}\"").unwrap(), "x = \"a#b42\"");
    assert_eq!(run("x = \"$5 $${N}\"").unwrap(), "x = \"$5 ${N}\"");
    let e = run("x = 1\ny = '${Q}'").unwrap_err().to_string();
    assert!(
        e.starts_with("f.toml, line 2: the value of environment variable Q"),
        "{e}"
    );
    assert!(!e.contains("it's"), "{e}");
    let e = run("x = ${NL}").unwrap_err().to_string();
    assert!(e.contains("line break"), "{e}");
    let e = run("x = \"${N\"\n}").unwrap_err().to_string();
    assert!(e.contains("without a closing"), "{e}");
    let e = run("x = \"${1X}\"").unwrap_err().to_string();
    assert!(e.contains("not a variable name"), "{e}");
}

#[test]
fn missing_env_var_names_variable_and_line() {
    // outside a region's secrets: an error at once
    let text = BASE.replace("\"pgrelay\"", "\"${PREFIX}\"");
    let line = text.lines().position(|l| l.contains("PREFIX")).unwrap() + 1;
    let e = err(&text);
    assert!(
        e.starts_with(&format!(
            "relay.toml, line {line}: environment variable PREFIX is not set"
        )),
        "{e}"
    );
    // in a region's DSN: an error for the commands that need it only
    let text = BASE.replace("s3cret", "${PG_US_PASSWORD}");
    let line = text
        .lines()
        .position(|l| l.contains("PG_US_PASSWORD"))
        .unwrap()
        + 1;
    let c = ok(&text);
    assert!(c.require(&c.run_needs("eu", true, true)).is_ok());
    assert!(c
        .require(&[Need::Database("cn"), Need::Kafka("us")])
        .is_ok());
    let e = c.require(&[Need::Database("us")]).unwrap_err().to_string();
    assert_eq!(
        e,
        format!(
            "relay.toml, line {line}: environment variable PG_US_PASSWORD is not set \
             (or not valid UTF-8), and regions.us.dsn needs it for this command; export it"
        )
    );
    let e = c.require(&c.run_needs("us", false, true)).unwrap_err();
    assert!(e.to_string().contains("PG_US_PASSWORD"), "{e}");
    // a hash key: only its own region's capture side needs it
    let text = BASE.replace(
        "\"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"",
        "\"${EU_HASH_KEY}\"",
    );
    let c = ok(&text);
    assert!(c.require(&c.run_needs("us", true, true)).is_ok());
    assert!(c.require(&c.run_needs("eu", false, true)).is_ok());
    let e = c.hash_key("eu").unwrap_err().to_string();
    assert!(
        e.contains("EU_HASH_KEY") && e.contains("regions.eu.hash_key"),
        "{e}"
    );
    // unset in a string that also breaks validation: the variable is named
    let text = BASE.replace("\"localhost:9092\"", "\"${BROKERS}\"");
    let c = ok(&text);
    let e = c.require(&[Need::Kafka("cn")]).unwrap_err().to_string();
    assert!(
        e.contains("BROKERS") && e.contains("Kafka cluster of region cn"),
        "{e}"
    );
    // used in a region's DSN and elsewhere: the other use fails at once
    let text = BASE
        .replace("s3cret", "${PW}")
        .replace("\"pgrelay\"", "\"${PW}\"");
    assert!(err(&text).contains("environment variable PW is not set"));
}

#[test]
fn config_errors_come_before_secrets_and_every_missing_variable_at_once() {
    // every region's secrets unset, as in one region's sidecar
    let secrets = BASE
        .replace("s3cret", "${PG_US_PASSWORD}")
        .replace(
            "dsn = \"host=us port=5432 user=pgrelay password=${PG_US_PASSWORD} dbname=app\"",
            "dsn = \"host=us port=5432 user=pgrelay password=${PG_US_PASSWORD} dbname=app\"\n\
             setup_dsn = \"host=us user=admin password=${PG_US_SETUP_PASSWORD} dbname=app\"",
        )
        .replace(
            "dsn = \"host=eu dbname=app\"",
            "dsn = \"host=eu password=${PG_EU_PASSWORD} dbname=app\"",
        )
        .replace(
            "\"pepper-pepper-pepper-pepper-pepper\"",
            "\"${US_HASH_KEY}\"",
        );
    // a typo is named with its line, not a secret
    let typo = secrets.replace("[relay]\n", "[relay]\nmax_clok_skew = \"1s\"\n");
    let e = err(&typo);
    assert!(e.contains("max_clok_skew") && e.contains("line 3"), "{e}");
    assert!(!e.contains("PG_"), "{e}");
    // a rule broken elsewhere than on a secret's line, likewise
    let e = err(&secrets.replace("id = 3", "id = 2"));
    assert!(e.contains("regions.eu.id = 2 is already the id"), "{e}");
    // a command asks only for what it needs, all of it at once
    let c = ok(&secrets);
    assert!(c.require(&c.run_needs("cn", true, true)).is_ok());
    let e = c
        .require(&c.run_needs("us", true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("environment variables PG_US_PASSWORD (line 10: regions.us.dsn), US_HASH_KEY"),
        "{e}"
    );
    assert!(
        e.contains("regions.us.hash_key") && e.contains("export them"),
        "{e}"
    );
    assert!(!e.contains("SETUP") && !e.contains("PG_EU"), "{e}");
    // variables outside a region's secrets: all named at once
    let e = err(&BASE
        .replace(
            "\"pgrelay\"",
            "\"${PREFIX}\"\n[relay.capture]\nslot = \"${SLOT}\"",
        )
        .replace("\"localhost:9092\"", "\"${BROKERS}\""));
    assert!(
        e.contains("environment variables PREFIX (line 3), SLOT (line 5) are not set"),
        "{e}"
    );
    assert!(!e.contains("BROKERS"), "a region's cluster: {e}");
}

#[test]
fn hash_keys_are_per_region_and_long() {
    let short = BASE.replace("pepper-pepper-pepper-pepper-pepper", "short");
    assert_err(
        &short,
        &["regions.us.hash_key is 5 bytes: a hash key needs at least 32"],
    );
    let c = ok(&BASE.replace(
        "hash_key = \"pepper-pepper-pepper-pepper-pepper\"",
        "hash_key = \"pepper-pepper-pepper-pepper-pepper\"\nhash_key_id = \"k2\"",
    ));
    assert_eq!(c.regions["us"].hash_key_id, "k2");
    assert_eq!(c.regions["eu"].hash_key_id, "k1");
    assert_err(
        &BASE.replace("[regions.eu]", "[regions.eu]\nhash_key_id = \"k 2\""),
        &["regions.eu.hash_key_id = \"k 2\""],
    );
    assert_err(
        &BASE.replace("[relay]\nprefix", "[relay]\nhash_salt = \"x\"\nprefix"),
        &["relay.hash_salt is no longer used", "hash_key"],
    );
    let debug = format!("{:?}", ok(BASE));
    assert!(!debug.contains("pepper"), "{debug}");
}

#[test]
fn setup_dsn_and_grantee() {
    let c = ok(BASE);
    assert_eq!(c.regions["us"].setup_dsn(), c.regions["us"].dsn);
    assert_eq!(c.regions["us"].grantee(), None);
    let c = ok(&BASE.replace(
        "[regions.eu]",
        "[regions.eu]\nsetup_dsn = \"host=eu user=admin password=a\"",
    ));
    assert_eq!(c.regions["eu"].setup_dsn(), "host=eu user=admin password=a");
    // the user of dsn, when it has one (eu's dsn names none)
    assert_eq!(c.regions["eu"].grantee(), None);
    let c = ok(&BASE.replace(
        "[regions.us]",
        "[regions.us]\nsetup_dsn = \"host=us user=admin\"",
    ));
    assert_eq!(c.regions["us"].grantee().as_deref(), Some("pgrelay"));
    let c = ok(&BASE.replace("[regions.cn]", "[regions.cn]\nrun_role = \"relay_cn\""));
    assert_eq!(c.regions["cn"].grantee().as_deref(), Some("relay_cn"));
    assert_eq!(dsn_user("postgres://u:p@h/db").as_deref(), Some("u"));
    assert_eq!(dsn_user("postgresql://h/db?user=v").as_deref(), Some("v"));
    assert_eq!(dsn_user("host=a user='w' dbname=b").as_deref(), Some("w"));
}

#[test]
fn http_listen_and_token() {
    let c = ok(&format!("{BASE}\n[http]\nlisten = \"9187\"\n"));
    assert_eq!(c.http.listen, Some("127.0.0.1:9187".parse().unwrap()));
    let c = ok(&format!("{BASE}\n[http]\nlisten = \":9188\"\n"));
    assert_eq!(c.http.listen, Some("127.0.0.1:9188".parse().unwrap()));
    let c = ok(&format!("{BASE}\n[http]\nlisten = \"0.0.0.0:9189\"\n"));
    assert_eq!(c.http.listen, Some("0.0.0.0:9189".parse().unwrap()));
    assert_err(
        &format!("{BASE}\n[http]\ntoken = \"short\"\n"),
        &["http.token is shorter than 16 characters"],
    );
    let c = ok(&format!(
        "{BASE}\n[http]\nlisten = \"9187\"\ntoken = \"${{METRICS_TOKEN}}\"\n"
    ));
    let e = c
        .require(&c.run_needs("us", true, true))
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("METRICS_TOKEN") && e.contains("http.token"),
        "{e}"
    );
    assert!(!format!("{:?}", c.http).contains("METRICS"));
}

#[test]
fn dsn_password_is_redacted_in_debug() {
    let c = ok(BASE);
    let debug = format!("{c:?}");
    assert!(!debug.contains("s3cret"), "{debug}");
    assert!(!debug.contains("pepper"), "{debug}");
    assert!(debug.contains("password=***"), "{debug}");

    let cases = [
        ("host=a password=x dbname=b", "host=a password=*** dbname=b"),
        ("password = 'a b\\' c' host=a", "password = '***' host=a"),
        ("host=a PASSWORD=x", "host=a PASSWORD=***"),
        ("host=a sslpassword=x", "host=a sslpassword=***"),
        ("host=a mypassword=x", "host=a mypassword=x"),
        ("host=a", "host=a"),
        (
            "postgres://u:secret@h:5432/db?sslmode=require&password=p2",
            "postgres://u:***@h:5432/db?sslmode=require&password=***",
        ),
        ("postgresql://u@h/db", "postgresql://u@h/db"),
        ("postgresql://u:p@w@h", "postgresql://u:***@h"),
    ];
    for (dsn, want) in cases {
        assert_eq!(redact_dsn(dsn), want, "{dsn}");
    }
}

#[test]
fn kafka_settings_that_weaken_security_are_refused() {
    let with = |props: &str| {
        BASE.replace(
            "brokers = \"localhost:9092\"",
            &format!("brokers = \"localhost:9092\"\n[kafka.properties]\n{props}"),
        )
    };
    let e = err(&with(
        "\"security.protocol\" = \"SASL_PLAINTEXT\"\n\"sasl.mechanisms\" = \"PLAIN\"",
    ));
    assert!(e.contains("in clear") && e.contains("sasl_ssl"), "{e}");
    let e = err(&with("\"security.protocol\" = \"sasl_ssl\""));
    assert!(e.contains("GSSAPI"), "{e}");
    let e = err(&with("\"enable.ssl.certificate.verification\" = false"));
    assert!(e.contains("ssl.ca.location"), "{e}");
    let e = err(&with(
        "\"ssl.endpoint.identification.algorithm\" = \"none\"",
    ));
    assert!(e.contains("host name"), "{e}");
    for fine in [
        "\"security.protocol\" = \"sasl_ssl\"\n\"sasl.mechanisms\" = \"PLAIN\"",
        "\"security.protocol\" = \"sasl_plaintext\"\n\"sasl.mechanism\" = \"SCRAM-SHA-512\"",
        "\"security.protocol\" = \"ssl\"\n\"ssl.ca.location\" = \"/etc/ca.pem\"",
    ] {
        ok(&with(fine));
    }
}

#[test]
fn kafka_secrets_are_redacted_in_debug() {
    let c = ok(&BASE.replace(
        "brokers = \"localhost:9092\"",
        "brokers = \"localhost:9092\"\n[kafka.properties]\n\"sasl.password\" = \"kpw\"\n\"linger.ms\" = 5\n\"socket.keepalive.enable\" = false",
    ));
    let kafka = c.kafka_for("eu");
    assert_eq!(kafka.properties["linger.ms"], "5");
    assert_eq!(kafka.properties["socket.keepalive.enable"], "false");
    let debug = format!("{kafka:?}");
    assert!(!debug.contains("kpw"), "{debug}");
    assert!(debug.contains("linger.ms"), "{debug}");
}

#[test]
fn per_region_kafka_replaces_the_default() {
    let c = ok(&BASE.replace(
        "hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"",
        "hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n[regions.cn.kafka]\nbrokers = \"kafka.cn:9092\"\n[regions.cn.kafka.properties]\n\"acks\" = \"all\"",
    ));
    assert_eq!(c.kafka_for("cn").brokers, "kafka.cn:9092");
    assert_eq!(c.kafka_for("cn").properties.len(), 1);
    assert_eq!(c.kafka_for("us").brokers, "localhost:9092");
}

#[test]
fn region_without_kafka() {
    let text = BASE.replace("[kafka]\nbrokers = \"localhost:9092\"", "");
    assert_err(
        &text,
        &["region cn has no Kafka cluster", "[regions.cn.kafka]"],
    );
    assert_err(
        &BASE.replace("brokers = \"localhost:9092\"", "brokers = \" \""),
        &["kafka.brokers is empty"],
    );
}

#[test]
fn region_rules() {
    let only_us = "[kafka]\nbrokers = \"k:9092\"\n[regions.us]\nid = 1\ndsn = \"host=us\"\n";
    assert_err(only_us, &["at least 2 regions", "declared: us"]);
    assert_err(
        "[kafka]\nbrokers = \"k:9092\"\n",
        &["at least 2 regions", "declared: none"],
    );
    assert_err(
        &BASE.replace("id = 3", "id = 1"),
        &["regions.us.id = 1 is already the id of region cn"],
    );
    assert_err(
        &BASE.replace("id = 3", "id = 0"),
        &["regions.cn.id = 0: must be between 1 and 63"],
    );
    assert_err(&BASE.replace("id = 3", "id = 64"), &["regions.cn.id = 64"]);
    assert_err(
        &BASE.replace("[regions.cn]", "[regions.CN]"),
        &["region name \"CN\""],
    );
    assert_err(
        &BASE.replace("[regions.cn]", "[regions.\"c-n\"]"),
        &["region name \"c-n\""],
    );
    assert_err(
        &BASE.replace("[regions.cn]", "[regions.dlq]"),
        &["\"dlq\" is reserved"],
    );
    // its apply origin would be pgrelay_replay, the origin of `dlq replay`
    assert_err(
        &BASE.replace("[regions.cn]", "[regions.replay]"),
        &[
            "region name \"replay\" is reserved",
            "replication origin pgrelay_replay",
            "pick another name",
        ],
    );
    assert_err(
        &BASE.replace("dsn = \"host=cn dbname=app\"", "dsn = \"\""),
        &["regions.cn.dsn is empty"],
    );
    assert_err(&BASE.replace("id = 3\n", ""), &["missing field `id`"]);
}

#[test]
fn relay_rules() {
    assert_err(
        &BASE.replace("prefix = \"pgrelay\"", "prefix = \"a b\""),
        &["relay.prefix = \"a b\""],
    );
    assert_err(
        &format!("{BASE}\n[relay.capture]\nslot = \"Bad-Slot\"\n"),
        &["relay.capture.slot = \"Bad-Slot\""],
    );
    assert_err(
        &format!("{BASE}\n[relay.capture]\npublication = \"\"\n"),
        &["relay.capture.publication"],
    );
    assert_err(
        &format!("{BASE}\n[relay.capture]\nmax_in_flight = 0\n"),
        &["relay.capture.max_in_flight = 0: must be at least 1"],
    );
    assert_err(
        &format!("{BASE}\n[relay.capture]\nstatus_interval = \"0s\"\n"),
        &["status_interval must be greater than zero"],
    );
    assert_err(
        &format!("{BASE}\n[relay.apply]\nbatch_max_records = 0\n"),
        &["batch_max_records = 0"],
    );
    assert_err(
        &format!("{BASE}\n[relay.apply]\nmax_retries = -1\n"),
        &["max_retries = -1"],
    );
    assert_err(
        &format!("{BASE}\n[relay.apply]\ntombstone_horizon = \"0d\"\n"),
        &["tombstone_horizon must be greater than zero"],
    );
    assert_err(
        &format!("{BASE}\n[http]\nlisten = \"localhost\"\n"),
        &["http.listen = \"localhost\""],
    );
}

const ORDERS: &str = r#"
[[tables]]
name = "public.users"
class = "local"

[[tables]]
name = "products"
class = "global"

[[tables]]
name = "public.currencies"
class = "owned"
owner = "us"

[[tables]]
name = "public.orders"
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
name = "card_number"
action = "mask"
mask = "****"
"#;

#[test]
fn tables_are_typed() {
    let c = ok(&with_tables(ORDERS));
    assert_eq!(c.tables.len(), 4);
    assert_eq!(c.tables[0].class, TableClass::Local);
    assert_eq!(c.tables[1].name, TableName::new("public", "products"));
    assert_eq!(
        c.table(&TableName::new("public", "currencies"))
            .unwrap()
            .class,
        TableClass::Owned { owner: "us".into() }
    );
    let orders = c.table(&TableName::new("public", "orders")).unwrap();
    let TableClass::Partitioned {
        home_column,
        aliases,
        allow,
    } = &orders.class
    else {
        panic!("{:?}", orders.class)
    };
    assert_eq!(home_column, "country");
    assert_eq!(aliases["DE"], "eu");
    assert_eq!(
        allow["us"],
        ["cn".to_string(), "eu".to_string()].into_iter().collect()
    );
    assert!(allow["eu"].is_empty());
    assert_eq!(orders.columns.len(), 3);
    assert_eq!(orders.columns[0].action, ColumnAction::Hash);
    assert!(orders.columns[0].applies_to("cn"));
    assert!(!orders.columns[0].applies_to("eu"));
    assert_eq!(orders.columns[2].action, ColumnAction::Mask("****".into()));
    assert!(orders.columns[2].applies_to("eu"));
    assert_eq!(
        orders.missing_columns(&["id", "email", "card_number"]),
        ["country"]
    );
    assert!(c.table(&TableName::new("other", "orders")).is_none());
}

#[track_caller]
fn table_err(table: &str, parts: &[&str]) {
    assert_err(&with_tables(table), parts);
}

#[test]
fn undeclared_regions_are_named() {
    let declared = "declared regions: cn, eu, us";
    table_err(
        "[[tables]]\nname = \"public.orders\"\nclass = \"partitioned\"\nhome_column = \"c\"\naliases = { DE = \"xx\" }\n",
        &["table public.orders: alias DE -> \"xx\" names an undeclared region; declared regions: cn, eu, us"],
    );
    table_err(
        "[[tables]]\nname = \"t\"\nclass = \"owned\"\nowner = \"xx\"\n",
        &[
            "table public.t: owner \"xx\" names an undeclared region",
            declared,
        ],
    );
    table_err(
        "[[tables]]\nname = \"t\"\nclass = \"partitioned\"\nhome_column = \"c\"\n[tables.allow]\nxx = []\n",
        &["allow key \"xx\" names an undeclared region", declared],
    );
    table_err(
        "[[tables]]\nname = \"t\"\nclass = \"partitioned\"\nhome_column = \"c\"\n[tables.allow]\nus = [\"eu\", \"yy\"]\n",
        &["allow.us entry \"yy\" names an undeclared region", declared],
    );
    table_err(
        "[[tables]]\nname = \"t\"\nclass = \"global\"\n[[tables.columns]]\nname = \"a\"\naction = \"drop\"\nto = [\"zz\"]\n",
        &["column a: to entry \"zz\" names an undeclared region", declared],
    );
}

#[test]
fn table_rules() {
    let t = "[[tables]]\nname = \"t\"\n";
    table_err(
        &format!("{t}class = \"owned\"\n"),
        &["table public.t: class = \"owned\" needs owner"],
    );
    table_err(
        &format!("{t}class = \"global\"\nowner = \"us\"\n"),
        &["owner is only for class = \"owned\" (this table is global)"],
    );
    for key in ["home_column = \"c\"", "aliases = {}", "allow = {}"] {
        let name = key.split(' ').next().unwrap();
        table_err(
            &format!("{t}class = \"owned\"\nowner = \"us\"\n{key}\n"),
            &[&format!("{name} is only for class = \"partitioned\"")],
        );
    }
    table_err(
        &format!("{t}class = \"partitioned\"\n"),
        &["needs home_column"],
    );
    table_err(
        &format!("{t}class = \"shared\"\n"),
        &["unknown variant `shared`"],
    );
    table_err(
        "[[tables]]\nname = \"a.b.c\"\nclass = \"global\"\n",
        &["invalid table name"],
    );
    // duplicates, also when spelled differently
    let text = with_tables(&format!(
        "{t}class = \"global\"\n[[tables]]\nname = \"public.t\"\nclass = \"local\"\n"
    ));
    let first = text.lines().position(|l| l == "name = \"t\"").unwrap() + 1;
    let second = text
        .lines()
        .position(|l| l == "name = \"public.t\"")
        .unwrap()
        + 1;
    assert_err(
        &text,
        &[&format!(
            "relay.toml, line {second}: table public.t is declared twice (first on line {first})"
        )],
    );
}

#[test]
fn column_rules() {
    let rule = |class: &str, rule: &str| {
        format!("[[tables]]\nname = \"t\"\n{class}\n[[tables.columns]]\n{rule}\n")
    };
    let partitioned = "class = \"partitioned\"\nhome_column = \"country\"";
    table_err(
        &rule("class = \"local\"", "name = \"a\"\naction = \"drop\""),
        &["column rule on a: a local table never leaves its region"],
    );
    table_err(
        &rule(partitioned, "name = \"country\"\naction = \"hash\""),
        &["column country is the home column"],
    );
    table_err(
        &rule("class = \"global\"", "name = \"a\"\naction = \"mask\""),
        &["column a: action = \"mask\" needs mask"],
    );
    table_err(
        &rule(
            "class = \"global\"",
            "name = \"a\"\naction = \"drop\"\nmask = \"x\"",
        ),
        &["column a: mask is only for action = \"mask\""],
    );
    table_err(
        &rule(
            "class = \"global\"",
            "name = \"a\"\naction = \"drop\"\nto = []",
        ),
        &["column a: to = [] matches no destination"],
    );
    table_err(
        &rule("class = \"global\"", "name = \"a\"\naction = \"erase\""),
        &["unknown variant `erase`"],
    );
    table_err(
        &rule("class = \"global\"", "name = \"\"\naction = \"drop\""),
        &["empty name"],
    );
    table_err(
        &format!(
            "{}[[tables.columns]]\nname = \"a\"\naction = \"hash\"\nto = [\"eu\"]\n",
            rule(
                "class = \"global\"",
                "name = \"a\"\naction = \"drop\"\nto = [\"cn\", \"eu\"]"
            )
        ),
        &["column a has two rules for destination eu"],
    );
    // earlier names: each once, never the current name or the home column,
    // never on a merge column; a rule under an earlier name is a clash
    table_err(
        &rule(
            "class = \"global\"",
            "name = \"a\"\naction = \"drop\"\nformerly = [\"a\"]",
        ),
        &["column a: formerly entry \"a\" must be an earlier name"],
    );
    table_err(
        &rule(
            "class = \"global\"",
            "name = \"a\"\naction = \"drop\"\nformerly = [\"b\", \"b\"]",
        ),
        &["formerly entry \"b\""],
    );
    table_err(
        &rule(
            partitioned,
            "name = \"a\"\naction = \"drop\"\nformerly = [\"country\"]",
        ),
        &["formerly entry \"country\" is the home column"],
    );
    table_err(
        &rule(
            "class = \"global\"",
            "name = \"a\"\nmerge = \"counter\"\nformerly = [\"b\"]",
        ),
        &["column a: formerly is for drop, hash and mask rules"],
    );
    table_err(
        &format!(
            "{}[[tables.columns]]\nname = \"b\"\naction = \"hash\"\n",
            rule(
                "class = \"global\"",
                "name = \"a\"\naction = \"drop\"\nformerly = [\"b\"]"
            )
        ),
        &["column b has two rules for destination"],
    );
    let c = ok(&with_tables(&rule(
        "class = \"global\"",
        "name = \"a\"\naction = \"drop\"\nformerly = [\"b\"]",
    )));
    let t = &c.tables[0];
    assert_eq!(t.columns[0].formerly, ["b"]);
    assert!(t.missing_columns(&["id", "b"]).is_empty());
    assert_eq!(t.missing_columns(&["id", "c"]), ["a"]);
    // hash needs the key of every region that sends the table
    let text = with_tables(&rule(
        "class = \"global\"",
        "name = \"a\"\naction = \"hash\"",
    ))
    .replace("hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n", "");
    let line = text.lines().position(|l| l == "name = \"t\"").unwrap() + 1;
    assert_err(
        &text,
        &[&format!("relay.toml, line {line}: table public.t: column a: action = \"hash\" needs the hash key of every region that sends the table"), "[regions.cn]"],
    );
    // an owned table: its owner's key only
    let text = with_tables(&rule(
        "class = \"owned\"\nowner = \"us\"",
        "name = \"a\"\naction = \"hash\"",
    ))
    .replace("hash_key = \"cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn-cn\"\n", "");
    ok(&text);
}

#[test]
fn breakers() {
    let tables = "[[tables]]\nname = \"public.orders\"\nclass = \"global\"\n\
                  [[tables]]\nname = \"public.users\"\nclass = \"local\"\n";
    let c = ok(&with_tables(&format!(
        "{tables}[[breakers]]\nmax_deletes = 100\n\
         [[breakers]]\nsource = \"us\"\ntable = \"public.orders\"\nmax_fraction = 0.25\nwindow = \"30s\"\n"
    )));
    assert_eq!(c.breakers.len(), 2);
    assert_eq!(c.breakers[1].window, Duration::from_secs(30));
    assert!(c.breakers[0].truncate, "truncates trip by default");
    assert!(ok(&with_tables(tables)).breakers.is_empty());
    assert_err(
        &with_tables(&format!(
            "{tables}[[breakers]]\ntable = \"public.users\"\nmax_deletes = 1\n"
        )),
        &[
            "relay.toml",
            "breakers[0].table",
            "not a declared, replicated table",
        ],
    );
    assert_err(
        &with_tables(&format!("{tables}[[breakers]]\nsource = \"mars\"\n")),
        &["breakers[0].source = \"mars\"", "declared: cn, eu, us"],
    );
    assert_err(
        &with_tables(&format!(
            "{tables}[[breakers]]\nmax_deletes = 1\nmax_delete = 2\n"
        )),
        &["max_delete"],
    );
}

#[test]
fn merge_columns_are_declared_per_column_on_global_tables() {
    let c = ok(&with_tables(
        "[[tables]]\nname = \"public.stock\"\nclass = \"global\"\n\
         [[tables.columns]]\nname = \"n\"\nmerge = \"counter\"\n\
         [[tables.columns]]\nname = \"tags\"\nmerge = \"union\"\n\
         [[tables.columns]]\nname = \"secret\"\naction = \"drop\"\n",
    ));
    let t = &c.tables[0];
    assert_eq!(t.merge_kind("n"), Some(MergeKind::Counter));
    assert_eq!(t.merge_kind("tags"), Some(MergeKind::Union));
    assert_eq!(t.merge_kind("secret"), None);
    assert_eq!(t.columns.len(), 1, "merge columns are not column rules");
    assert!(c.table_needs_full_identity(t), "counters need the old row");
    assert_eq!(t.missing_columns(&["n", "secret"]), vec!["tags"]);
    let owned = "[[tables]]\nname = \"t\"\nclass = \"owned\"\nowner = \"us\"\n\
                 [[tables.columns]]\nname = \"n\"\nmerge = \"counter\"\n";
    assert_err(
        &with_tables(owned),
        &[
            "column n",
            "merge = \"counter\"",
            "class = \"global\"",
            "owned",
        ],
    );
    let with_action = "[[tables]]\nname = \"t\"\nclass = \"global\"\n\
                       [[tables.columns]]\nname = \"n\"\nmerge = \"counter\"\naction = \"hash\"\n";
    assert_err(&with_tables(with_action), &["column n", "remove action"]);
    let neither =
        "[[tables]]\nname = \"t\"\nclass = \"global\"\n[[tables.columns]]\nname = \"n\"\n";
    assert_err(
        &with_tables(neither),
        &["column n", "action = ", "merge = "],
    );
    let twice = "[[tables]]\nname = \"t\"\nclass = \"global\"\n\
                 [[tables.columns]]\nname = \"n\"\nmerge = \"counter\"\n\
                 [[tables.columns]]\nname = \"n\"\naction = \"drop\"\n";
    assert_err(
        &with_tables(twice),
        &["column n", "cannot also have a column rule"],
    );
    let bad_kind = "[[tables]]\nname = \"t\"\nclass = \"global\"\n\
                    [[tables.columns]]\nname = \"n\"\nmerge = \"max\"\n";
    assert_err(&with_tables(bad_kind), &["max"]);
}

const DR_KEY: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

#[test]
fn dr_regions_are_declared_and_not_the_home() {
    let table = |extra: &str| {
        with_tables(&format!(
            "[[tables]]\nname = \"public.users\"\nclass = \"owned\"\nowner = \"eu\"\n{extra}\n"
        ))
    };
    let c = ok(&table("dr = [\"us\"]"));
    assert_eq!(c.tables[0].dr.iter().collect::<Vec<_>>(), ["us"]);
    assert_eq!(
        c.dr_topics("eu"),
        [("us".to_string(), "pgrelay.dr.eu.us".to_string())]
    );
    assert_eq!(c.dr_homes("us"), ["eu"]);
    assert!(c.dr_homes("cn").is_empty());
    assert_err(
        &table("dr = [\"mars\"]"),
        &["dr entry \"mars\"", "undeclared region"],
    );
    assert_err(&table("dr = [\"eu\"]"), &["is the owner"]);
    assert_err(&table("dr = [\"us\", \"us\"]"), &["names us twice"]);
    assert_err(
        &with_tables("[[tables]]\nname = \"public.t\"\nclass = \"local\"\ndr = [\"us\"]\n"),
        &["local table is not captured"],
    );
    // a partitioned table: each region's own rows go to the other DR regions
    let c = ok(&with_tables(
        "[[tables]]\nname = \"public.t\"\nclass = \"partitioned\"\nhome_column = \"r\"\ndr = [\"us\"]\n",
    ));
    assert!(c.sends_dr("eu") && c.sends_dr("cn") && !c.sends_dr("us"));
}

#[test]
fn dr_key_is_32_bytes_and_only_its_region_needs_it() {
    let tables =
        "[[tables]]\nname = \"public.users\"\nclass = \"owned\"\nowner = \"eu\"\ndr = [\"us\"]\n";
    let with_key = |key: &str| {
        with_tables(tables).replace(
            "hash_key = \"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"",
            &format!("hash_key = \"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"\ndr_key = \"{key}\"\ndr_key_id = \"k7\""),
        )
    };
    let c = ok(&with_key(DR_KEY));
    assert_eq!(c.dr_key("eu").unwrap().id(), "k7");
    assert_err(&with_key("abcd"), &["regions.eu.dr_key", "32 bytes"]);
    // unset: the other regions' sidecars start, eu's capture names the variable
    let c = ok(&with_key("${EU_DR_KEY}"));
    assert!(c.require(&c.run_needs("us", true, true)).is_ok());
    assert!(c.require(&c.run_needs("eu", false, true)).is_ok());
    let e = c.require(&c.run_needs("eu", true, true)).unwrap_err();
    assert!(e.to_string().contains("EU_DR_KEY"), "{e}");
    // not declared at all: a clear error when it is needed
    let c = ok(&with_tables(tables));
    let e = c.dr_key("eu").unwrap_err().to_string();
    assert!(e.contains("regions.eu.dr_key is not set"), "{e}");
}

#[test]
fn verify_section_schedules_the_sidecars_own_verify() {
    assert_eq!(ok(BASE).verify, VerifySettings::default());
    let c = ok(&format!(
        "{BASE}\n[verify]\ninterval = \"15m\"\nrate = 20000\n"
    ));
    assert_eq!(c.verify.interval, Some(std::time::Duration::from_secs(900)));
    assert_eq!(c.verify.rate, Some(20000));
    assert_err(
        &format!("{BASE}\n[verify]\ninterval = \"0s\"\n"),
        &["verify.interval must be greater than zero"],
    );
    assert_err(
        &format!("{BASE}\n[verify]\nrate = 0\n"),
        &["verify.rate = 0"],
    );
    assert_err(&format!("{BASE}\n[verify]\nevery = \"1m\"\n"), &["every"]);
}

#[test]
fn old_dr_keys_open_copies_by_their_id_and_only_restore_needs_them() {
    let tables =
        "[[tables]]\nname = \"public.users\"\nclass = \"owned\"\nowner = \"eu\"\ndr = [\"us\"]\n";
    let with_old = |old: &str| {
        with_tables(tables).replace(
            "hash_key = \"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"",
            &format!(
                "hash_key = \"eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu-eu\"\ndr_key = \"{DR_KEY}\"\n\
                 dr_key_id = \"k2\"\ndr_old_keys = {{ {old} }}"
            ),
        )
    };
    let c = ok(&with_old(&format!("k1 = \"{}\"", "ab".repeat(32))));
    let ring = c.dr_key_ring("eu").unwrap();
    assert_eq!(ring.current.id(), "k2");
    assert_eq!(ring.get("k1").unwrap().id(), "k1");
    assert_err(
        &with_old("k1 = \"abcd\""),
        &["regions.eu.dr_old_keys.k1", "32 bytes"],
    );
    assert_err(
        &with_old(&format!("k2 = \"{}\"", "ab".repeat(32))),
        &["dr_old_keys", "not the current dr_key_id"],
    );
    // an unset old key stops neither capture nor apply, only what opens copies
    let c = ok(&with_old("k1 = \"${EU_DR_KEY_K1}\""));
    assert!(c.require(&c.run_needs("eu", true, true)).is_ok());
    let e = c.dr_key_ring("eu").unwrap_err().to_string();
    assert!(e.contains("EU_DR_KEY_K1"), "{e}");
}
