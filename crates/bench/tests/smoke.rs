//! Smoke test: every figure of `p2pchat-bench`, run tiny, produces its rows with finite
//! values. Benchmarks are never timed tests: nothing here asserts a speed.

use bench::{Bench, Group, Mode, Row};

fn smoke_bench() -> Bench {
    Bench {
        mode: Mode::Smoke,
        exe: env!("CARGO_BIN_EXE_p2pchat-bench").into(),
        clients: None,
    }
}

fn check(group: Group, rows: &[Row]) {
    assert!(!rows.is_empty(), "{} produced no row", group.name());
    for row in rows {
        // The client rows need the separately built `p2pchat` binary; without it they say so.
        if group == Group::Client && row.value.is_none() {
            let note = row.note.as_deref().unwrap_or_default();
            assert!(note.contains("not built"), "{}: {note}", row.name);
            continue;
        }
        let value = row.value.unwrap_or(f64::NAN);
        assert!(
            value.is_finite() && value >= 0.0,
            "{} ({}): value {value:?}, note {:?}",
            row.name,
            group.name(),
            row.note
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_group_produces_finite_rows_in_smoke_mode() {
    let bench = smoke_bench();
    let mut all = Vec::new();
    for group in Group::ALL {
        let rows = bench::run_group(group, &bench)
            .await
            .unwrap_or_else(|error| panic!("{} failed: {error}", group.name()));
        check(group, &rows);
        all.extend(rows);
    }
    let table = bench::report::render_markdown(&all);
    assert!(table.starts_with("| figure | value | target |"));
    let json: serde_json::Value =
        serde_json::from_str(&bench::report::render_json(&all)).expect("valid JSON");
    assert_eq!(json.as_array().map(Vec::len), Some(all.len()));
}

#[test]
fn the_binary_prints_json_in_smoke_mode() {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_p2pchat-bench"))
        .args(["direct-latency", "--smoke", "--json"])
        .output()
        .expect("p2pchat-bench runs");
    assert!(output.status.success(), "{output:?}");
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).expect("valid JSON");
    let rows = json.as_array().expect("an array");
    assert!(!rows.is_empty());
    for row in rows {
        for field in [
            "name",
            "value",
            "unit",
            "target",
            "reference",
            "ratio",
            "meets",
        ] {
            assert!(row.get(field).is_some(), "missing {field} in {row}");
        }
        assert!(row["meets"].is_boolean());
    }
}
