//! Unit tests of `config`.

use super::*;

fn parse(s: &str) -> Result<Config, ConfigErrors> {
    Config::parse(s, PathBuf::from("t.toml"), PathBuf::from("/etc/civgate"))
}

const MINIMAL: &str = r#"
[tls]
cert = "certs/server.pem"
key = "certs/server.key"
client_ca = "certs/ca.pem"
"#;

#[test]
fn serving_threads_follow_the_setting_and_the_cores() {
    let with = |worker_threads| ServerSection {
        worker_threads,
        ..ServerSection::default()
    };
    assert_eq!(with(0).serving_threads(1), 1);
    assert_eq!(with(0).serving_threads(2), 1);
    assert_eq!(with(0).serving_threads(3), 3);
    assert_eq!(with(0).serving_threads(16), 16);
    assert_eq!(with(1).serving_threads(16), 1);
    assert_eq!(with(2).serving_threads(2), 2);
    assert_eq!(with(4).serving_threads(2), 4);
}

#[test]
fn upstream_connections_default_to_one_per_serving_thread() {
    let c = Config::parse(DEFAULT_CONFIG, "civgate.toml".into(), ".".into()).unwrap();
    let up = c.file.upstream.clone().unwrap();
    assert_eq!(up.connections, 0);
    assert_eq!(up.links(1), 1);
    assert_eq!(up.links(8), 8);
    let fixed = UpstreamSection {
        connections: 3,
        ..up
    };
    assert_eq!(fixed.links(1), 3);
}

#[test]
fn repository_config_parses() {
    let c = Config::parse(DEFAULT_CONFIG, "civgate.toml".into(), ".".into()).unwrap();
    assert_eq!(c.file.server.listen, "127.0.0.1:7443".parse().unwrap());
    assert_eq!(
        c.file.server.admin_listen,
        "127.0.0.1:9095".parse().unwrap()
    );
    let policy = c.policy();
    assert_eq!(
        policy.agencies[&"registry-hp".parse().unwrap()].role,
        Role::CivilRegistry
    );
    assert!(c.file.purposes.len() >= 6);
}

#[test]
fn defaults_apply_and_paths_resolve_against_the_file() {
    let c = parse(MINIMAL).unwrap();
    assert_eq!(c.file.server.handshake_timeout_ms, 5_000);
    assert_eq!(c.file.limits.max_message_bytes, 4 * 1024 * 1024);
    assert_eq!(
        c.resolve(c.file.tls.cert.get_ref()),
        PathBuf::from("/etc/civgate/certs/server.pem")
    );
}

#[test]
fn unknown_role_names_key_and_line() {
    let src = format!("{MINIMAL}\n[agencies.registry-hp]\nrole = \"mayor\"\n");
    let err = parse(&src).unwrap_err();
    let e = &err.0[0];
    assert_eq!(e.line, Some(8), "{err}");
    assert_eq!(e.key, "agencies.registry-hp.role");
    assert!(e.message.contains("mayor"), "{err}");
    assert!(
        err.to_string()
            .starts_with("t.toml:8: agencies.registry-hp.role:")
    );
}

#[test]
fn syntax_error_names_the_line() {
    let src = format!("{MINIMAL}\n[server]\nlisten = \n");
    let err = parse(&src).unwrap_err();
    assert_eq!(err.0[0].line, Some(8), "{err}");
}

#[test]
fn unknown_key_is_refused() {
    let src = format!("{MINIMAL}\n[server]\nlisen = \"127.0.0.1:1\"\n");
    let err = parse(&src).unwrap_err();
    assert_eq!(err.0[0].line, Some(8), "{err}");
    assert!(err.0[0].message.contains("lisen"), "{err}");
}

#[test]
fn invalid_agency_id_is_refused() {
    let src = format!("{MINIMAL}\n[agencies.Bad_Id]\nrole = \"auditor\"\n");
    let err = parse(&src).unwrap_err();
    assert!(err.to_string().contains("Bad_Id"), "{err}");
}

#[test]
fn provinces_only_for_civil_registries_and_only_known_ones() {
    let err = parse(&format!(
        "{MINIMAL}\n[agencies.population]\nrole = \"population_db\"\nprovinces = [\"031\"]\n"
    ))
    .unwrap_err();
    assert_eq!(err.0[0].key, "agencies.population.provinces");
    let err = parse(&format!(
        "{MINIMAL}\n[agencies.registry-x]\nrole = \"civil_registry\"\nprovinces = [\"003\"]\n"
    ))
    .unwrap_err();
    assert!(
        err.to_string().contains("not a known province code"),
        "{err}"
    );
    let err = parse(&format!(
        "{MINIMAL}\n[agencies.population]\nrole = \"population_db\"\nconsumer_groups = [\"a b\"]\n"
    ))
    .unwrap_err();
    assert_eq!(err.0[0].key, "agencies.population.consumer_groups");
}

#[test]
fn registry_offices_only_for_civil_registries() {
    let src = format!(
        "{MINIMAL}\n[agencies.population]\nrole = \"population_db\"\nregistry_offices = [\"HP-1\"]\n"
    );
    let err = parse(&src).unwrap_err();
    assert_eq!(err.0[0].line, Some(9), "{err}");
    assert_eq!(err.0[0].key, "agencies.population.registry_offices");
}

#[test]
fn unknown_purpose_field_is_refused() {
    let src = format!(
        "{MINIMAL}\n[purposes.X]\nfields = [\"full_name\", \"shoe_size\"]\nmethods = [\"GetCitizen\"]\nroles = [\"civil_registry\"]\n"
    );
    let err = parse(&src).unwrap_err();
    assert!(err.to_string().contains("shoe_size"), "{err}");
    assert_eq!(err.0[0].line, Some(8));
}

#[test]
fn a_purpose_names_its_methods_and_roles() {
    // (purpose table, the error's key or None, a word of the message)
    let rows: &[(&str, Option<&str>, &str)] = &[
        (
            "fields = [\"full_name\"]\nmethods = [\"GetCitizen\"]\nroles = [\"civil_registry\"]",
            None,
            "",
        ),
        (
            "verifies = [\"full_name\"]\nmethods = [\"VerifyCitizen\"]\nroles = [\"civil_registry\"]",
            None,
            "",
        ),
        (
            "fields = [\"full_name\"]\nroles = [\"civil_registry\"]",
            Some("purposes.X"),
            "methods",
        ),
        (
            "fields = [\"full_name\"]\nmethods = [\"GetCitizen\"]",
            Some("purposes.X"),
            "roles",
        ),
        (
            "fields = [\"full_name\"]\nmethods = []\nroles = [\"civil_registry\"]",
            Some("purposes.X.methods"),
            "Citizens methods",
        ),
        (
            "fields = [\"full_name\"]\nmethods = [\"GetCitizen\"]\nroles = []",
            Some("purposes.X.roles"),
            "roles",
        ),
        (
            "fields = [\"full_name\"]\nmethods = [\"GetCitizens\"]\nroles = [\"civil_registry\"]",
            Some("purposes.X.methods"),
            "GetCitizens",
        ),
        (
            "verifies = [\"full_name\"]\nmethods = [\"GetCitizen\"]\nroles = [\"civil_registry\"]",
            Some("purposes.X.fields"),
            "release at least one field",
        ),
        (
            "methods = [\"VerifyCitizen\"]\nroles = [\"civil_registry\"]",
            Some("purposes.X.verifies"),
            "at least one attribute",
        ),
        (
            "fields = [\"full_name\"]\nverifies = [\"sex\"]\nmethods = [\"GetCitizen\"]\nroles = [\"civil_registry\"]",
            Some("purposes.X.verifies"),
            "only VerifyCitizen",
        ),
    ];
    for (table, key, word) in rows {
        let src = format!("{MINIMAL}\n[purposes.X]\n{table}\n");
        match (parse(&src), key) {
            (Ok(_), None) => {}
            (Err(e), Some(key)) => {
                assert!(e.0[0].key.starts_with(key), "{table}: {e}");
                assert!(e.to_string().contains(word), "{table}: {e}");
            }
            (r, _) => panic!("{table}: {:?}", r.map(|_| ())),
        }
    }
}

#[test]
fn tls_min_version_parses() {
    let src = MINIMAL.replace("[tls]", "[tls]\nmin_version = \"1.3\"");
    assert_eq!(parse(&src).unwrap().file.tls.min_version, TlsVersion::Tls13);
    let src = MINIMAL.replace("[tls]", "[tls]\nmin_version = \"1.0\"");
    assert!(parse(&src).is_err());
}

/// `countries`: ISO codes of other countries, for a civil registry only.
#[test]
fn an_agency_of_missions_abroad_names_its_countries() {
    let rows: &[(&str, &str, Option<&str>)] = &[
        ("civil_registry", "[\"JP\", \"KR\"]", None),
        ("civil_registry", "[\"XX\"]", Some("agencies.consular")),
        ("civil_registry", "[\"VN\"]", Some("agencies.consular")),
        (
            "population_db",
            "[\"JP\"]",
            Some("agencies.consular.countries"),
        ),
    ];
    for (role, countries, key) in rows {
        let src = format!(
            "{MINIMAL}\n[agencies.consular]\nrole = \"{role}\"\nregistry_offices = []\ncountries = {countries}\n"
        );
        match (parse(&src), key) {
            (Ok(c), None) => {
                let policy = c.policy();
                let a = &policy.agencies[&"consular".parse().unwrap()];
                let got: Vec<&str> = a.countries.iter().map(|c| c.as_str()).collect();
                assert_eq!(got, ["JP", "KR"]);
            }
            (Err(e), Some(key)) => assert!(e.0[0].key.starts_with(key), "{countries}: {e}"),
            (r, _) => panic!("{role} {countries}: {:?}", r.map(|_| ())),
        }
    }
}

/// `url_file`: the store's and the shared limits' URLs read from a file (a secret), not both
/// ways at once, one line, an unreadable file named.
#[test]
fn urls_come_from_secret_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("pg"),
        "postgres://civgate:s3cret@db/civgate\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("redis"), "redis://:pw@cache:6379/0\n").unwrap();
    std::fs::write(
        dir.path().join("two"),
        "postgres://a@b/c\npostgres://d@e/f\n",
    )
    .unwrap();
    let load = |extra: &str| {
        Config::parse(
            &format!("{MINIMAL}\n{extra}"),
            "t.toml".into(),
            dir.path().to_owned(),
        )
    };
    let c = load("[store]\nurl_file = \"pg\"\n[shared_limits]\nurl_file = \"redis\"").unwrap();
    assert_eq!(c.file.store.url, "postgres://civgate:s3cret@db/civgate");
    assert_eq!(c.file.shared_limits.url, "redis://:pw@cache:6379/0");
    for (extra, key, word) in [
        (
            "[store]\nurl = \"postgres://x@y/z\"\nurl_file = \"pg\"",
            "store.url_file",
            "not both",
        ),
        (
            "[store]\nurl_file = \"missing\"",
            "store.url_file",
            "cannot read",
        ),
        ("[store]\nurl_file = \"two\"", "store.url_file", "one line"),
        (
            "[shared_limits]\nurl_file = \"missing\"",
            "shared_limits.url_file",
            "cannot read",
        ),
    ] {
        let e = load(extra).map(|_| ()).unwrap_err();
        assert_eq!(e.0[0].key, key, "{extra}: {e}");
        assert!(e.to_string().contains(word), "{extra}: {e}");
        assert!(!e.to_string().contains("s3cret"), "{e}");
    }
}

/// `CIVGATE_<SECTION>__<KEY>` overrides any setting, typed like the value it replaces.
#[test]
fn any_setting_can_come_from_the_environment() {
    let vars = |v: &[(&str, &str)]| -> Vec<(String, String)> {
        v.iter().map(|(k, v)| ((*k).into(), (*v).into())).collect()
    };
    assert_eq!(
        with_env_overrides(
            DEFAULT_CONFIG,
            vars(&[("CIVGATE_LISTEN", "x"), ("HOME", "/")])
        )
        .unwrap(),
        None,
        "the command line's variables and others are not config keys"
    );
    let text = with_env_overrides(
        DEFAULT_CONFIG,
        vars(&[
            ("CIVGATE_SERVER__LISTEN", "0.0.0.0:7443"),
            ("CIVGATE_AUDIT__COMMIT_TIMEOUT_MS", "2500"),
            ("CIVGATE_STORE__URL", "postgres://civgate@db/civgate"),
            ("CIVGATE_AGENCIES__POPULATION__NAME", "Bộ Công an"),
        ]),
    )
    .unwrap()
    .unwrap();
    let c = Config::parse(&text, "t".into(), ".".into()).unwrap();
    assert_eq!(c.file.server.listen, "0.0.0.0:7443".parse().unwrap());
    assert_eq!(c.file.audit.commit_timeout_ms, 2500);
    assert_eq!(c.file.store.url, "postgres://civgate@db/civgate");
    assert_eq!(
        c.file.agencies[&"population".parse().unwrap()].name,
        "Bộ Công an"
    );
    // A number where the file has one must be a number; a section must be a section.
    for (var, value, word) in [
        ("CIVGATE_AUDIT__COMMIT_TIMEOUT_MS", "soon", "integer"),
        ("CIVGATE_SERVER__LISTEN__PORT", "1", "not a section"),
        ("CIVGATE_SERVER____LISTEN", "1", "empty key"),
    ] {
        let e = with_env_overrides(DEFAULT_CONFIG, vars(&[(var, value)])).unwrap_err();
        assert!(e.contains(var) && e.contains(word), "{var}: {e}");
    }
}

#[test]
fn telemetry_settings_are_checked() {
    let ok = TelemetrySection::default();
    assert!(
        telemetry_problems(&ok).is_empty(),
        "nothing exported by default"
    );
    let with = |f: &dyn Fn(&mut TelemetrySection)| {
        let mut t = TelemetrySection::default();
        f(&mut t);
        telemetry_problems(&t)
            .into_iter()
            .map(|(k, _)| k)
            .collect::<Vec<_>>()
    };
    type Edit = Box<dyn Fn(&mut TelemetrySection)>;
    let rows: Vec<(Edit, Vec<&str>)> = vec![
        (
            Box::new(|t| t.otlp_endpoint = "http://collector:4317".into()),
            vec![],
        ),
        (
            Box::new(|t| t.otlp_endpoint = "https://collector.example.gov.vn:4317".into()),
            vec![],
        ),
        (
            Box::new(|t| t.otlp_endpoint = "collector:4317".into()),
            vec!["otlp_endpoint"],
        ),
        (
            Box::new(|t| t.otlp_endpoint = "grpc://collector:4317".into()),
            vec!["otlp_endpoint"],
        ),
        (
            Box::new(|t| t.otlp_endpoint = "http://".into()),
            vec!["otlp_endpoint"],
        ),
        (
            Box::new(|t| {
                t.otlp_endpoint = "http://collector:4317".into();
                t.otlp_ca = Some("ca.pem".into());
            }),
            vec!["otlp_ca"],
        ),
        (
            Box::new(|t| {
                t.otlp_endpoint = "https://collector:4317".into();
                t.otlp_ca = Some("ca.pem".into());
            }),
            vec![],
        ),
        (Box::new(|t| t.sample_ratio = 1.5), vec!["sample_ratio"]),
        (Box::new(|t| t.sample_ratio = -0.1), vec!["sample_ratio"]),
        (
            Box::new(|t| t.sample_ratio = f64::NAN),
            vec!["sample_ratio"],
        ),
        (Box::new(|t| t.sample_ratio = 0.0), vec![]),
        (
            Box::new(|t| t.service_name = " ".into()),
            vec!["service_name"],
        ),
        (Box::new(|t| t.otlp_timeout_ms = 0), vec!["otlp_timeout_ms"]),
    ];
    for (i, (edit, want)) in rows.iter().enumerate() {
        assert_eq!(with(edit.as_ref()), *want, "row {i}");
    }
    // Through the file: the key is named.
    let errors = parse(&format!(
        "{MINIMAL}\n[telemetry]\notlp_endpoint = \"localhost:4317\"\n"
    ))
    .unwrap_err();
    assert!(
        errors.to_string().contains("telemetry.otlp_endpoint"),
        "{errors}"
    );
}
