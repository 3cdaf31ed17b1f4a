//! The plans shipped in `billing/plans/`: every file loads, and each prices
//! a worked example to the cent.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rust_decimal::Decimal;

use super::{Model, Plan, Pricing, Rated, load_dir, rate};

fn plans_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("plans")
}

fn shipped(name: &str) -> Plan {
    Plan::load(&plans_dir().join(format!("{name}.toml"))).unwrap()
}

fn d(text: &str) -> Decimal {
    Decimal::from_str_exact(text).unwrap()
}

fn usage(items: &[(&str, &str)]) -> BTreeMap<String, Decimal> {
    items.iter().map(|(meter, q)| (meter.to_string(), d(q))).collect()
}

/// The rounded amount of a charge, as written (`"0.40"`).
fn amount(rated: &Rated, charge: &str) -> String {
    rated
        .lines
        .iter()
        .find(|l| l.charge == charge)
        .unwrap_or_else(|| panic!("no line {charge}"))
        .amount
        .to_string()
}

#[test]
fn every_shipped_plan_loads_and_is_named_after_its_file() {
    let plans = load_dir(&plans_dir()).unwrap();
    let mut files: Vec<String> = std::fs::read_dir(plans_dir())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "toml"))
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    files.sort();
    let names: Vec<String> = plans.iter().map(|p| p.name.clone()).collect();
    assert_eq!(names, files);
    for expected in ["aws-lambda-x86", "azure-functions-consumption", "cloud-run-request"] {
        assert!(names.iter().any(|n| n == expected), "{expected} missing from {names:?}");
    }
    for plan in &plans {
        assert_eq!(plan.currency, "USD", "{}", plan.name);
        // Nothing used, nothing owed.
        let rated = rate(plan, &BTreeMap::new()).unwrap();
        assert_eq!(rated.total, Decimal::ZERO, "{}", plan.name);
    }
}

/// AWS's usage for its example: 3 million invocations of 1 s each at 512 MB.
fn aws_example_usage() -> BTreeMap<String, Decimal> {
    usage(&[
        ("requests", "3000000"),
        // 3,000,000 × 1 s = 3,000,000,000,000 µs.
        ("billed_duration_us", "3000000000000"),
    ])
}

/// AWS's published example (Lambda pricing page, example 1): 512 MB,
/// 3 million invocations a month, 1 s each.
///
///   compute: 3M × 1 s × 512/1024 GB = 1,500,000 GB-s; − 400,000 free
///            = 1,100,000 GB-s × $0.00001667 = $18.34
///   requests: 3M − 1M free = 2M × $0.2/M = $0.40
///   total: $18.34 + $0.40 = $18.74
///
/// The page multiplies by $0.00001667, the list price $0.0000166667 cut to
/// eight places: 1,100,000 × 0.00001667 = 18.337, which is $18.34 to the
/// nearest cent. With the list price, 1,100,000 × 0.0000166667 = 18.33337,
/// which is $18.33 (see the next test): the page's cent comes from the
/// shortened price, not from any rounding rule. (Rounding 18.33337 *up*
/// would also give $18.34, by coincidence; AWS's own arithmetic is the
/// shortened price, so that is what this test reproduces.) So this test
/// prices the page's example with the page's price, and asserts the page's
/// numbers to the cent.
#[test]
fn aws_lambda_published_example_to_the_cent() {
    let mut plan = shipped("aws-lambda-x86");
    let gb_seconds = plan.charges.iter_mut().find(|c| c.name == "gb_seconds").unwrap();
    let Pricing::Metered(metered) = &mut gb_seconds.pricing else {
        panic!("gb_seconds is metered")
    };
    let Model::Graduated { tiers, .. } = &mut metered.model else {
        panic!("gb_seconds is graduated")
    };
    tiers[0].price = d("0.00001667");

    let rated = rate(&plan, &aws_example_usage()).unwrap();
    let compute = rated.lines.iter().find(|l| l.charge == "gb_seconds").unwrap();
    assert_eq!(compute.quantity, d("1500000"));
    assert_eq!(compute.allowance, d("400000"));
    assert_eq!(compute.billable, d("1100000"));
    assert_eq!(compute.amount_exact, d("18.337"));
    assert_eq!(amount(&rated, "gb_seconds"), "18.34");
    let requests = rated.lines.iter().find(|l| l.charge == "requests").unwrap();
    assert_eq!(requests.billable, d("2000000"));
    assert_eq!(amount(&rated, "requests"), "0.40");
    assert_eq!(rated.total.to_string(), "18.74");
}

/// The same workload at the list price the shipped plan carries,
/// $0.0000166667 per GB-s: $18.33 + $0.40 = $18.73 (see above for why
/// AWS's page shows a cent more).
#[test]
fn aws_lambda_example_at_the_list_price() {
    let rated = rate(&shipped("aws-lambda-x86"), &aws_example_usage()).unwrap();
    let compute = rated.lines.iter().find(|l| l.charge == "gb_seconds").unwrap();
    assert_eq!(compute.amount_exact, d("18.33337"));
    assert_eq!(compute.tiers.len(), 1, "all of it in the first tier");
    assert_eq!(amount(&rated, "gb_seconds"), "18.33");
    assert_eq!(amount(&rated, "requests"), "0.40");
    assert_eq!(rated.subtotal.to_string(), "18.73");
    assert_eq!(rated.total.to_string(), "18.73");
    assert!(rated.unpriced_meters.is_empty());
}

/// Hand-computed (not checked against a published page): the same workload
/// on Azure Functions, 3 million executions of 1 s at 512 MB.
///
///   execution time: 3M × 1 s × 0.5 GB = 1,500,000 GB-s; − 400,000 free
///                   = 1,100,000 GB-s × $0.000016 = $17.60
///   executions: 3M − 1M free = 2M × $0.20/M = $0.40
///   total: $18.00
#[test]
fn azure_functions_hand_computed_example() {
    let rated = rate(&shipped("azure-functions-consumption"), &aws_example_usage()).unwrap();
    assert_eq!(amount(&rated, "gb_seconds"), "17.60");
    assert_eq!(amount(&rated, "executions"), "0.40");
    assert_eq!(rated.total.to_string(), "18.00");
}

/// Hand-computed: 10 million requests a month on Cloud Run, each billed
/// 200 ms (already rounded up to 100 ms by the sidecar), 1 vCPU, 512 MiB.
///
///   CPU: 10M × 0.2 s × 1 = 2,000,000 vCPU-s; − 180,000 free
///        = 1,820,000 × $0.000024 = $43.68
///   memory: 10M × 0.2 s × 0.5 GiB = 1,000,000 GiB-s; − 360,000 free
///        = 640,000 × $0.0000025 = $1.60
///   requests: 10M − 2M free = 8M × $0.40/M = $3.20
///   total: $48.48
#[test]
fn cloud_run_hand_computed_example() {
    let usage = usage(&[("requests", "10000000"), ("billed_duration_us", "2000000000000")]);
    let rated = rate(&shipped("cloud-run-request"), &usage).unwrap();
    assert_eq!(amount(&rated, "vcpu_seconds"), "43.68");
    assert_eq!(amount(&rated, "gib_seconds"), "1.60");
    assert_eq!(amount(&rated, "requests"), "3.20");
    assert_eq!(rated.total.to_string(), "48.48");
}

/// Usage inside every free tier costs nothing.
#[test]
fn free_tiers_of_the_shipped_plans() {
    // 1M requests of 800 ms at 512 MB: exactly 400,000 GB-s.
    let at_the_edge = usage(&[("requests", "1000000"), ("billed_duration_us", "800000000000")]);
    let rated = rate(&shipped("aws-lambda-x86"), &at_the_edge).unwrap();
    assert_eq!(rated.total, Decimal::ZERO);
    let rated = rate(&shipped("azure-functions-consumption"), &at_the_edge).unwrap();
    assert_eq!(rated.total, Decimal::ZERO);
    // 2M requests of 90 ms: 180,000 vCPU-s and 90,000 GiB-s.
    let cloud_run = usage(&[("requests", "2000000"), ("billed_duration_us", "180000000000")]);
    let rated = rate(&shipped("cloud-run-request"), &cloud_run).unwrap();
    assert_eq!(rated.total, Decimal::ZERO);
}
