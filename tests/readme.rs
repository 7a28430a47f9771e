//! The README's variable and metric tables match the code.

use runnel::{config::VARS, metrics::CATALOGUE};

/// The rows of the table between `<!-- NAME:begin -->` and `<!-- NAME:end -->`, as cells
/// with backticks removed, header and separator skipped.
fn table(name: &str) -> Vec<Vec<String>> {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    let start = readme
        .find(&format!("<!-- {name}:begin -->"))
        .unwrap_or_else(|| panic!("no {name} table"));
    let end = readme.find(&format!("<!-- {name}:end -->")).unwrap();
    readme[start..end]
        .lines()
        .filter(|l| l.starts_with('|'))
        .skip(2)
        .map(|l| {
            l.trim_matches('|')
                .split(" | ")
                .map(|c| c.trim().replace('`', ""))
                .collect()
        })
        .collect()
}

#[test]
fn readme_variable_table_matches_the_code() {
    let rows = table("vars");
    let documented: Vec<(String, String)> =
        rows.iter().map(|r| (r[0].clone(), r[1].clone())).collect();
    let code: Vec<(String, String)> = VARS
        .iter()
        .map(|v| (v.name.to_owned(), v.default.to_owned()))
        .collect();
    assert_eq!(
        documented, code,
        "README variable table (name, default) differs from config::VARS"
    );
}

#[test]
fn readme_metric_table_matches_the_code() {
    let rows = table("metrics");
    let documented: Vec<(String, String, String)> = rows
        .iter()
        .map(|r| (r[0].clone(), r[1].clone(), r[2].clone()))
        .collect();
    let code: Vec<(String, String, String)> = CATALOGUE
        .iter()
        .map(|(n, k, l, _)| (n.to_string(), k.to_string(), l.to_string()))
        .collect();
    assert_eq!(
        documented, code,
        "README metric table (name, type, labels) differs from metrics::CATALOGUE"
    );
}

/// Every value a bounded label can take is named in the README: the outcomes in the
/// paragraph after the metric table, the upstream error kinds and discard reasons in
/// their metrics' rows.
#[test]
fn readme_names_every_label_value_the_code_can_emit() {
    let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md"))
        .expect("README.md");
    let row = |metric: &str| -> String {
        readme
            .lines()
            .find(|l| l.starts_with(&format!("| `{metric}`")))
            .unwrap_or_else(|| panic!("no README row for {metric}"))
            .to_owned()
    };
    let outcomes = readme
        .split("Outcomes (`outcome` label):")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("an outcomes paragraph");
    for outcome in runnel::error::Outcome::ALL {
        assert!(
            outcomes.contains(&format!("`{}`", outcome.label())),
            "outcome {} is not in the README",
            outcome.label()
        );
    }
    let kinds = row("runnel_upstream_errors_total");
    for kind in runnel::error::UPSTREAM_ERROR_KINDS {
        assert!(
            kinds.contains(kind),
            "upstream error kind {kind} is not in the README"
        );
    }
    let reasons = row("runnel_pool_discards_total");
    for reason in runnel::pool::Discard::ALL {
        assert!(
            reasons.contains(reason.label()),
            "discard reason {} is not in the README",
            reason.label()
        );
    }
}
