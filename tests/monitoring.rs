//! deploy/monitoring/, checked against the code. Every query of the Grafana dashboard and
//! of the alert rules names metrics in `runnel::metrics::CATALOGUE` and uses each as its
//! kind allows (`_bucket`, `_sum`, `_count` only on histograms; `rate()` and `increase()`
//! on counters and histogram series, never on gauges); it filters and groups only by
//! labels those metrics have (or the scrape adds), and filters on values runnel emits. The
//! dashboard charts every catalogue metric and the views operators look for; every alert
//! has a severity, a summary, a description and a runbook; the README there names every
//! panel and alert. With promtool (Debian: prometheus) the queries also parse as PromQL
//! and each alert fires on the synthetic series of runnel-alerts.test.yaml it is meant for
//! and stays quiet on the others.

mod support;

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use runnel::{
    error::Outcome,
    metrics::{
        BYTES, CATALOGUE, CLIENT_CERT_NOT_AFTER, CONNECTIONS_ACCEPTED, CONNECTIONS_ACTIVE,
        CONNECTIONS_CLOSED, HANDSHAKE_DURATION, HANDSHAKES, POOL_CHECKOUTS, RESUMPTION_RATIO,
        TLS_RELOADS, UPSTREAM_ERRORS,
    },
};
use serde_json::{Value, json};
use support::process::{TempDir, peer};

/// Labels the Cloud Run sidecar (run-gmp-sidecar, confgenerator/config.go) puts on every
/// series: `job` (the RunMonitoring's name), `instance`, `cluster` (`__run__`) and
/// `namespace` always, `project_id` and `location` from Managed Service for Prometheus;
/// `service_name`, `revision_name` and `instanceId` because
/// deploy/cloudrun/runmonitoring.yaml's targetLabels ask for them (checked below).
/// Never `service` or `revision`: the sidecar emits no such label.
const TARGET_LABELS: [&str; 9] = [
    "job",
    "instance",
    "cluster",
    "namespace",
    "project_id",
    "location",
    "service_name",
    "revision_name",
    "instanceId",
];
/// targetLabels.metadata keywords and the label each makes the sidecar emit
/// (confgenerator/config.go: cloudRunServiceLabel, cloudRunRevisionLabel,
/// cloudRunConfigurationLabel, cloudRunInstanceLabel).
const SIDECAR_METADATA_LABELS: [(&str, &str); 4] = [
    ("service", "service_name"),
    ("revision", "revision_name"),
    ("configuration", "configuration_name"),
    ("instance", "instanceId"),
];
/// The functions that make sense of a counter (a histogram series is a counter too).
const RATE_FUNCTIONS: [&str; 3] = ["rate", "irate", "increase"];

#[test]
fn every_dashboard_query_names_catalogue_metrics_as_their_kind_allows() {
    let failures: Vec<String> = dashboard_queries()
        .iter()
        .flat_map(|(place, expr)| {
            problems(expr)
                .into_iter()
                .map(move |p| format!("{place}: {p}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn every_alert_rule_names_catalogue_metrics_as_their_kind_allows() {
    let failures: Vec<String> = alert_rules()
        .iter()
        .flat_map(|rule| {
            let name = rule["alert"].as_str().unwrap_or("?").to_owned();
            problems(rule["expr"].as_str().unwrap_or_default())
                .into_iter()
                .map(move |p| format!("alert {name}: {p}"))
        })
        .collect();
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The checker itself: each of these broken queries must be caught, with the culprit named.
#[test]
fn the_query_checker_catches_misspelt_misused_and_mislabelled_metrics() {
    for (expr, expected) in [
        ("rate(runnel_bytes_totl[5m])", "runnel_bytes_totl is not in"),
        ("rate(runnel_bytes_total_bucket[5m])", "is a counter"),
        ("runnel_upstream_wait_seconds", "no series of its own"),
        ("runnel_bytes_total", "wrap it in rate()"),
        ("rate(runnel_draining[5m])", "is a gauge"),
        (
            "rate(runnel_bytes_total{directon=\"x\"}[5m])",
            "has no label directon",
        ),
        (
            "rate(runnel_bytes_total{direction=\"up\"}[5m])",
            "never emits direction=\"up\"",
        ),
        (
            "rate(runnel_downstream_connections_closed_total{outcome=~\"clean|drained\"}[5m])",
            "never emits outcome=\"drained\"",
        ),
        (
            "sum by (outcom) (rate(runnel_bytes_total[5m]))",
            "groups by outcom",
        ),
        (
            "sum by (le) (rate(runnel_upstream_wait_seconds_sum[5m]))",
            "groups by le",
        ),
        ("vector(1)", "names no runnel metric"),
        (
            "rate(runnel_bytes_total{direction=\"x}[5m])",
            "unterminated",
        ),
    ] {
        let found = problems(expr);
        assert!(
            found.iter().any(|p| p.contains(expected)),
            "{expr}: expected a problem containing {expected:?}, got {found:?}"
        );
    }
    let good = "histogram_quantile(0.9, sum by (le, pool) (rate(runnel_upstream_wait_seconds_bucket{job=~\"$job\", pool=\"hit\"}[$__rate_interval])))";
    assert_eq!(problems(good), Vec::<String>::new());
}

#[test]
fn the_dashboard_charts_every_catalogue_metric_and_the_key_views() {
    let queries: Vec<(String, Parsed)> = dashboard_queries()
        .into_iter()
        .map(|(_, expr)| {
            let parsed = parse(&expr).unwrap_or_default();
            (expr, parsed)
        })
        .collect();
    let charted: BTreeSet<&str> = queries
        .iter()
        .flat_map(|(_, p)| &p.references)
        .filter_map(|r| resolve(&r.name).ok().map(|s| s.name))
        .collect();
    let missing: Vec<&str> = CATALOGUE
        .iter()
        .map(|m| m.0)
        .filter(|name| !charted.contains(name))
        .collect();
    assert!(missing.is_empty(), "not on the dashboard: {missing:?}");

    let any = |what: &str, test: &dyn Fn(&str, &Parsed) -> bool| {
        assert!(
            queries.iter().any(|(expr, parsed)| test(expr, parsed)),
            "the dashboard has no {what}"
        );
    };
    any("accepted connection rate", &|_, p| {
        p.uses(CONNECTIONS_ACCEPTED, "rate")
    });
    any("active connections", &|_, p| p.uses(CONNECTIONS_ACTIVE, ""));
    any("closed connections by outcome", &|_, p| {
        p.uses(CONNECTIONS_CLOSED, "rate") && p.groups_by("outcome")
    });
    for q in ["0.5", "0.9", "0.99"] {
        any(&format!("p{q} handshake latency by kind"), &|e, p| {
            e.starts_with(&format!("histogram_quantile({q},"))
                && p.uses(&format!("{HANDSHAKE_DURATION}_bucket"), "rate")
                && p.groups_by("kind")
        });
    }
    any("pool hit rate", &|e, p| {
        e.contains(" / ") && p.filters(POOL_CHECKOUTS, "result", "hit")
    });
    any("resumption rate", &|e, p| {
        p.uses(RESUMPTION_RATIO, "")
            || (e.contains(" / ") && p.filters(HANDSHAKES, "kind", "resumed"))
    });
    any("bytes per second by direction", &|_, p| {
        p.uses(BYTES, "rate") && p.groups_by("direction")
    });
    any("client certificate days left", &|e, p| {
        p.uses(CLIENT_CERT_NOT_AFTER, "") && e.contains("time()") && e.contains("86400")
    });
}

#[test]
fn every_panel_reads_the_datasource_variable_and_has_its_own_id() {
    let dashboard = dashboard();
    assert_eq!(dashboard["templating"]["list"][0]["type"], "datasource");
    let mut ids = BTreeSet::new();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    while let Some(panel) = panels.pop() {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "a panel without a title: {panel}");
        assert!(
            ids.insert(panel["id"].as_u64().unwrap()),
            "id repeated: {title}"
        );
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        if panel["type"] == "row" {
            continue;
        }
        let sources = std::iter::once(&panel["datasource"]).chain(
            panel["targets"]
                .as_array()
                .unwrap()
                .iter()
                .map(|t| &t["datasource"]),
        );
        for source in sources {
            assert_eq!(
                source["uid"], "${datasource}",
                "{title}: a fixed data source"
            );
        }
    }
}

#[test]
fn every_alert_has_a_severity_a_summary_a_description_and_a_runbook() {
    let rules = alert_rules();
    let mut names = BTreeSet::new();
    for rule in &rules {
        let name = rule["alert"].as_str().expect("only alerting rules here");
        assert!(names.insert(name), "{name} twice");
        assert!(
            name.starts_with("Runnel"),
            "{name}: alerts are named Runnel…"
        );
        let severity = &rule["labels"]["severity"];
        assert!(
            severity == "warning" || severity == "critical",
            "{name}: severity {severity}"
        );
        for key in ["summary", "description", "runbook"] {
            let text = rule["annotations"][key].as_str().unwrap_or_default();
            assert!(
                text.len() > 20,
                "{name}: annotation {key} missing or too short"
            );
        }
    }
    let any = |what: &str, test: &dyn Fn(&Value, &Parsed) -> bool| {
        let found = rules
            .iter()
            .any(|r| test(r, &parse(r["expr"].as_str().unwrap()).unwrap_or_default()));
        assert!(found, "no alert on {what}");
    };
    for severity in ["warning", "critical"] {
        any(
            &format!("client certificate expiry ({severity})"),
            &|r, p| p.uses(CLIENT_CERT_NOT_AFTER, "") && r["labels"]["severity"] == severity,
        );
    }
    any("handshake errors", &|_, p| {
        p.filters(HANDSHAKES, "result", "error") || p.uses(UPSTREAM_ERRORS, "rate")
    });
    any("pool misses", &|_, p| {
        p.filters(POOL_CHECKOUTS, "result", "miss")
    });
    any("drain aborts", &|_, p| {
        p.filters(CONNECTIONS_CLOSED, "outcome", "drain_aborted")
    });
    any("TLS reload failures", &|_, p| {
        p.filters(TLS_RELOADS, "result", "error")
    });
    any("upstream truncations", &|_, p| {
        p.filters(CONNECTIONS_CLOSED, "outcome", "upstream_truncated")
    });
}

#[test]
fn the_cloud_run_labels_used_are_the_ones_runmonitoring_makes_the_sidecar_emit() {
    let path = monitoring_dir().join("../cloudrun/runmonitoring.yaml");
    let config: Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let asked: Vec<&str> = config["spec"]["targetLabels"]["metadata"]
        .as_array()
        .expect("runmonitoring.yaml lists its targetLabels")
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for (keyword, label) in SIDECAR_METADATA_LABELS {
        if TARGET_LABELS.contains(&label) {
            assert!(
                asked.contains(&keyword),
                "{label} is used but runmonitoring.yaml's targetLabels lack {keyword:?}"
            );
        }
    }
    // The job label is the RunMonitoring's name; the rules and the dashboard rely on it.
    assert_eq!(config["metadata"]["name"], "runnel");
}

#[test]
fn alert_annotations_and_rule_tests_use_only_labels_the_series_have() {
    let mut known: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for (_, _, labels, _) in CATALOGUE {
        known.extend(labels.split(',').map(str::trim).filter(|l| !l.is_empty()));
    }
    known.insert("severity");
    let mut unknown = BTreeSet::new();
    for rule in alert_rules() {
        for text in rule["annotations"].as_object().unwrap().values() {
            let text = text.as_str().unwrap_or_default();
            for (_, rest) in text
                .match_indices("$labels.")
                .map(|(i, _)| text.split_at(i + 8))
            {
                let label: String = rest
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                if !known.contains(label.as_str()) {
                    unknown.insert(format!("alert {}: $labels.{label}", rule["alert"]));
                }
            }
        }
    }
    let tests = std::fs::read_to_string(monitoring_dir().join("runnel-alerts.test.yaml")).unwrap();
    let tests: Value = serde_yaml_ng::from_str(&tests).unwrap();
    for test in tests["tests"].as_array().unwrap() {
        for series in test["input_series"].as_array().into_iter().flatten() {
            let text = series["series"].as_str().unwrap();
            let parsed = parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            for reference in &parsed.references {
                for (label, _, _) in &reference.matchers {
                    if !known.contains(label.as_str()) {
                        unknown.insert(format!("test series {text}: {label}"));
                    }
                }
            }
        }
        for case in test["alert_rule_test"].as_array().into_iter().flatten() {
            for alert in case["exp_alerts"].as_array().into_iter().flatten() {
                for label in alert["exp_labels"]
                    .as_object()
                    .into_iter()
                    .flatten()
                    .map(|l| l.0)
                {
                    if !known.contains(label.as_str()) {
                        unknown.insert(format!("expected alert: {label}"));
                    }
                }
            }
        }
    }
    assert!(unknown.is_empty(), "labels no series has: {unknown:#?}");
}

#[test]
fn the_monitoring_readme_names_every_panel_and_alert() {
    let readme = std::fs::read_to_string(monitoring_dir().join("README.md")).unwrap();
    let dashboard = dashboard();
    let mut panels: Vec<&Value> = dashboard["panels"].as_array().unwrap().iter().collect();
    let mut missing = Vec::new();
    while let Some(panel) = panels.pop() {
        panels.extend(panel["panels"].as_array().into_iter().flatten());
        let title = panel["title"].as_str().unwrap();
        if panel["type"] != "row" && !readme.contains(title) {
            missing.push(format!("panel {title:?}"));
        }
    }
    for rule in alert_rules() {
        let name = rule["alert"].as_str().unwrap();
        if !readme.contains(name) {
            missing.push(format!("alert {name}"));
        }
    }
    assert!(
        missing.is_empty(),
        "deploy/monitoring/README.md lacks: {missing:?}"
    );
}

#[test]
fn every_query_parses_as_promql() {
    let Some(promtool) = peer("TEST_PROMTOOL_BIN", "promtool") else {
        return;
    };
    let dir = TempDir::new("promql");
    // Grafana's variables become what they stand for: a rate window, or "any value".
    let rules: Vec<Value> = dashboard_queries()
        .iter()
        .filter(|(place, _)| !place.starts_with("variable"))
        .enumerate()
        .map(|(n, (_, expr))| json!({"record": format!("dashboard:query_{n}"), "expr": grafana_to_promql(expr)}))
        .collect();
    let file = dir.path().join("dashboard-rules.json");
    let groups = json!({"groups": [{"name": "dashboard", "rules": rules}]});
    std::fs::write(&file, groups.to_string()).unwrap();
    promtool_succeeds(&promtool, &["check", "rules"], &file);
    promtool_succeeds(
        &promtool,
        &["check", "rules"],
        &monitoring_dir().join("runnel-alerts.yaml"),
    );
}

#[test]
fn each_alert_fires_on_the_series_it_watches_and_only_there() {
    let Some(promtool) = peer("TEST_PROMTOOL_BIN", "promtool") else {
        return;
    };
    let dir = TempDir::new("alerts");
    // The cases are deploy/monitoring/runnel-alerts.test.yaml. promtool compares
    // annotations too; theirs are prose checked elsewhere, so the rules under test go
    // without them (JSON is YAML: promtool reads rules.json as is).
    let rules: Vec<Value> = alert_rules()
        .into_iter()
        .map(|mut rule| {
            rule.as_object_mut().unwrap().remove("annotations");
            rule
        })
        .collect();
    let groups = json!({"groups": [{"name": "runnel", "rules": rules}]});
    std::fs::write(dir.path().join("rules.json"), groups.to_string()).unwrap();
    let spec = dir.path().join("runnel-alerts.test.yaml");
    std::fs::copy(monitoring_dir().join("runnel-alerts.test.yaml"), &spec).unwrap();
    promtool_succeeds(&promtool, &["test", "rules"], &spec);
}

/// One metric reference in a query: the name as written, the innermost function around
/// it ("" for none), and its label matchers (label, operator, value).
#[derive(Debug)]
struct Reference {
    name: String,
    function: String,
    matchers: Vec<(String, String, String)>,
}

/// What the checks need from a query: its metric references and the labels it groups by
/// (`by`, `without`, `on`, `ignoring`, `group_left/right`, Grafana's `label_values`).
#[derive(Debug, Default)]
struct Parsed {
    references: Vec<Reference>,
    grouping: Vec<String>,
}

impl Parsed {
    /// A reference to `name` directly inside `function` ("" = any function or none).
    fn uses(&self, name: &str, function: &str) -> bool {
        self.references
            .iter()
            .any(|r| r.name == name && (function.is_empty() || r.function == function))
    }

    fn filters(&self, name: &str, label: &str, value: &str) -> bool {
        self.references.iter().any(|r| {
            r.name == name
                && r.matchers.iter().any(|(l, op, v)| {
                    l == label && !op.starts_with('!') && v.split('|').any(|v| v == value)
                })
        })
    }

    fn groups_by(&self, label: &str) -> bool {
        self.grouping.iter().any(|l| l == label)
    }
}

/// A catalogue metric as a query names it: `runnel_x_seconds_bucket` is the `_bucket`
/// series of the histogram `runnel_x_seconds`.
struct Series {
    name: &'static str,
    kind: &'static str,
    labels: Vec<&'static str>,
    help: &'static str,
    suffix: &'static str,
}

/// Every problem with one query, each naming the culprit; empty when it is sound.
fn problems(expr: &str) -> Vec<String> {
    let parsed = match parse(expr) {
        Ok(parsed) => parsed,
        Err(e) => return vec![e],
    };
    if parsed.references.is_empty() {
        return vec![format!("{expr:?} names no runnel metric")];
    }
    let mut problems = Vec::new();
    let mut labels: BTreeSet<&str> = TARGET_LABELS.into_iter().collect();
    for reference in &parsed.references {
        let series = match resolve(&reference.name) {
            Ok(series) => series,
            Err(e) => {
                problems.push(e);
                continue;
            }
        };
        problems.extend(misuse(reference, &series));
        labels.extend(&series.labels);
        if series.suffix == "_bucket" {
            labels.insert("le");
        }
    }
    for label in &parsed.grouping {
        if !labels.contains(label.as_str()) {
            problems.push(format!("groups by {label}, which no metric it names has"));
        }
    }
    problems
}

/// The catalogue entry a name refers to, with its Prometheus suffix if any.
fn resolve(name: &str) -> Result<Series, String> {
    let series = |entry: &(&'static str, &'static str, &'static str, &'static str), suffix| {
        let (name, kind, labels, help) = *entry;
        let labels = labels.split(", ").filter(|l| !l.is_empty()).collect();
        Series {
            name,
            kind,
            labels,
            help,
            suffix,
        }
    };
    if let Some(entry) = CATALOGUE.iter().find(|m| m.0 == name) {
        if entry.1 == "histogram" {
            return Err(format!(
                "{name} is a histogram, which has no series of its own: use {name}_bucket, _sum or _count"
            ));
        }
        return Ok(series(entry, ""));
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        let Some(base) = name.strip_suffix(suffix) else {
            continue;
        };
        if let Some(entry) = CATALOGUE.iter().find(|m| m.0 == base) {
            if entry.1 != "histogram" {
                return Err(format!(
                    "{name}: {base} is a {}; only histograms have {suffix}",
                    entry.1
                ));
            }
            return Ok(series(entry, suffix));
        }
    }
    Err(format!("{name} is not in runnel::metrics::CATALOGUE"))
}

/// A reference that uses its metric against its kind, labels or values.
fn misuse(reference: &Reference, series: &Series) -> Vec<String> {
    let name = &reference.name;
    let mut problems = Vec::new();
    let counts = series.kind == "counter" || !series.suffix.is_empty();
    let rated = RATE_FUNCTIONS.contains(&reference.function.as_str());
    if counts && !rated {
        problems.push(format!(
            "{name} only ever grows: wrap it in rate() or increase(), not {:?}",
            reference.function
        ));
    }
    if !counts && rated {
        problems.push(format!(
            "{name} is a gauge: {}() of a gauge means nothing",
            reference.function
        ));
    }
    for (label, op, value) in &reference.matchers {
        let target = TARGET_LABELS.contains(&label.as_str());
        let bucket_le = label == "le" && series.suffix == "_bucket";
        if !(target || bucket_le || series.labels.contains(&label.as_str())) {
            problems.push(format!(
                "{name} has no label {label} (it has {:?})",
                series.labels
            ));
            continue;
        }
        // Values are checked where runnel fixes them: literal words on runnel's own labels.
        let literal = |v: &str| {
            v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_/.".contains(c))
        };
        let values: Vec<&str> = match op.ends_with('~') {
            true => value.split('|').collect(),
            false => vec![value.as_str()],
        };
        if target || bucket_le || !values.iter().all(|v| literal(v)) {
            continue;
        }
        for value in values {
            let known = match label.as_str() {
                "outcome" => Outcome::ALL.iter().any(|o| o.label() == value),
                _ => names_word(series.help, value),
            };
            if !known {
                problems.push(format!(
                    "{name}: runnel never emits {label}=\"{value}\" (its description: {:?})",
                    series.help
                ));
            }
        }
    }
    problems
}

/// Whether `text` contains `word` with no letter, digit or `_` on either side: label
/// values are listed in each metric's description ("kind full/resumed/none").
fn names_word(text: &str, word: &str) -> bool {
    let inner = |c: Option<char>| c.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
    text.match_indices(word).any(|(at, _)| {
        !inner(text[..at].chars().next_back()) && !inner(text[at + word.len()..].chars().next())
    })
}

/// Reads the parts of a PromQL (or Grafana) query the checks need. Not a full parser:
/// strings are skipped, `$variables` too, and a parenthesis belongs to the word before it.
fn parse(expr: &str) -> Result<Parsed, String> {
    let chars: Vec<char> = expr.chars().collect();
    let word_char = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == ':';
    let mut parsed = Parsed::default();
    let mut calls: Vec<String> = Vec::new();
    let mut last_word: Option<String> = None;
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if word_char(c) || c == '$' {
            let start = i;
            i += 1;
            while i < chars.len() && word_char(chars[i]) {
                i += 1;
            }
            let word: String = chars[start..i].iter().collect();
            if word.starts_with("runnel_") {
                let function = calls.last().cloned().unwrap_or_default();
                let matchers = match chars[i..].iter().position(|c| !c.is_whitespace()) {
                    Some(skip) if chars[i + skip] == '{' => {
                        let (matchers, end) = matchers(&chars, i + skip + 1)?;
                        i = end;
                        matchers
                    }
                    _ => Vec::new(),
                };
                parsed.references.push(Reference {
                    name: word,
                    function,
                    matchers,
                });
                last_word = None;
            } else {
                let grouping = [
                    "by",
                    "without",
                    "on",
                    "ignoring",
                    "group_left",
                    "group_right",
                    "label_values",
                ];
                let in_grouping = calls.last().is_some_and(|f| grouping.contains(&f.as_str()));
                if in_grouping && !c.is_ascii_digit() && c != '$' {
                    parsed.grouping.push(word.clone());
                }
                last_word = (!c.is_ascii_digit() && c != '$').then_some(word);
            }
            continue;
        }
        match c {
            '(' => calls.push(last_word.take().unwrap_or_default()),
            ')' => {
                calls.pop();
                last_word = None;
            }
            '"' | '\'' | '`' => {
                i = string(&chars, i)?.1 - 1;
                last_word = None;
            }
            '{' => {
                i = matchers(&chars, i + 1)?.1 - 1;
                last_word = None;
            }
            c if c.is_whitespace() => {}
            _ => last_word = None,
        }
        i += 1;
    }
    Ok(parsed)
}

/// Label matchers from just after `{` to just past `}`: (label, operator, value) each.
type Matchers = Vec<(String, String, String)>;
fn matchers(chars: &[char], mut i: usize) -> Result<(Matchers, usize), String> {
    let text: String = chars.iter().collect();
    let mut found = Vec::new();
    let skip_space = |i: &mut usize| {
        while *i < chars.len() && chars[*i].is_whitespace() {
            *i += 1;
        }
    };
    loop {
        skip_space(&mut i);
        match chars.get(i) {
            Some('}') => return Ok((found, i + 1)),
            Some(',') => {
                i += 1;
                continue;
            }
            None => return Err(format!("{text:?}: unterminated {{")),
            Some(_) => {}
        }
        let start = i;
        while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
            i += 1;
        }
        let label: String = chars[start..i].iter().collect();
        skip_space(&mut i);
        let op: String = chars[i..]
            .iter()
            .take_while(|c| "=!~".contains(**c))
            .collect();
        if label.is_empty() || !["=", "!=", "=~", "!~"].contains(&op.as_str()) {
            return Err(format!("{text:?}: cannot read the matcher at {}", start));
        }
        i += op.len();
        skip_space(&mut i);
        let (value, end) = string(chars, i)?;
        found.push((label, op, value));
        i = end;
    }
}

/// A quoted string starting at `i`: its content and the index just past its closing quote.
fn string(chars: &[char], i: usize) -> Result<(String, usize), String> {
    let text: String = chars.iter().collect();
    let quote = *chars
        .get(i)
        .filter(|c| "\"'`".contains(**c))
        .ok_or_else(|| format!("{text:?}: a quoted value expected at {i}"))?;
    let mut value = String::new();
    let mut j = i + 1;
    while let Some(&c) = chars.get(j) {
        match c {
            '\\' if quote != '`' => {
                value.extend(chars.get(j + 1));
                j += 2;
            }
            c if c == quote => return Ok((value, j + 1)),
            c => {
                value.push(c);
                j += 1;
            }
        }
    }
    Err(format!("{text:?}: unterminated string from {i}"))
}

fn grafana_to_promql(expr: &str) -> String {
    let mut out = String::new();
    let mut rest = expr;
    while let Some(at) = rest.find('$') {
        out.push_str(&rest[..at]);
        let name_len = rest[at + 1..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(rest.len() - at - 1);
        let name = &rest[at + 1..at + 1 + name_len];
        out.push_str(if name.starts_with("__") { "5m" } else { ".*" });
        rest = &rest[at + 1 + name_len..];
    }
    out + rest
}

fn promtool_succeeds(promtool: &Path, args: &[&str], file: &Path) {
    let output = Command::new(promtool)
        .args(args)
        .arg(file.file_name().unwrap())
        .current_dir(file.parent().unwrap())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "promtool {args:?} {}:\n{}{}",
        file.display(),
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn monitoring_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("deploy/monitoring")
}

fn dashboard() -> Value {
    let text = std::fs::read_to_string(monitoring_dir().join("runnel-dashboard.json")).unwrap();
    serde_json::from_str(&text).unwrap()
}

/// Every query on the dashboard, with where it is: each `expr` anywhere (panels, rows,
/// nested panels) and each query variable's query.
fn dashboard_queries() -> Vec<(String, String)> {
    fn walk(value: &Value, title: &str, out: &mut Vec<(String, String)>) {
        match value {
            Value::Object(map) => {
                let title = map.get("title").and_then(Value::as_str).unwrap_or(title);
                for (key, value) in map {
                    match (key.as_str(), value) {
                        ("expr", Value::String(expr)) => {
                            out.push((format!("panel {title:?}"), expr.clone()))
                        }
                        ("expr", other) => panic!("panel {title:?}: expr {other}"),
                        ("templating", _) => {}
                        _ => walk(value, title, out),
                    }
                }
            }
            Value::Array(values) => values.iter().for_each(|v| walk(v, title, out)),
            _ => {}
        }
    }
    let dashboard = dashboard();
    let mut out = Vec::new();
    walk(&dashboard, "", &mut out);
    for variable in dashboard["templating"]["list"].as_array().unwrap() {
        if variable["type"] == "query" {
            let query = &variable["query"];
            let query = query["query"].as_str().or(query.as_str()).unwrap();
            out.push((
                format!("variable ${}", variable["name"].as_str().unwrap()),
                query.into(),
            ));
        }
    }
    assert!(out.len() > 20, "too few queries found: {out:?}");
    out
}

/// Every rule of deploy/monitoring/runnel-alerts.yaml.
fn alert_rules() -> Vec<Value> {
    let text = std::fs::read_to_string(monitoring_dir().join("runnel-alerts.yaml")).unwrap();
    let file: Value = serde_yaml_ng::from_str(&text).unwrap();
    let rules: Vec<Value> = file["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|group| group["rules"].as_array().unwrap().clone())
        .collect();
    assert!(rules.len() >= 6, "too few rules: {rules:?}");
    rules
}
