//! The results of a simulation as one compact table, or as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use super::engine::Outcome;

/// What was simulated, to print above the results.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Setting {
    pub trace: String,
    pub format: String,
    pub requests: usize,
    /// Arrival of the last request after compression, seconds.
    pub span_seconds: f64,
    pub compress: f64,
    pub service: String,
    pub capacity_per_instance: u32,
    pub target_per_instance: f64,
    pub startup_seconds: f64,
    pub report_interval_seconds: f64,
    pub initial_instances: u32,
    pub min_instances: u32,
    pub max_instances: u32,
}

/// A whole run: the setting and one outcome per policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Results {
    pub setting: Setting,
    pub results: Vec<Outcome>,
}

impl Results {
    /// The table, with a line describing the setting above it.
    pub fn table(&self) -> String {
        let s = &self.setting;
        let mut out = String::new();
        let _ = writeln!(
            out,
            "trace {} ({}): {} requests over {:.1} s (compressed {}x); service {}; capacity {} and target {} per \
             instance; start-up {} s; reports every {} s; instances {} at first, {}..={}",
            s.trace,
            s.format,
            s.requests,
            s.span_seconds,
            s.compress,
            s.service,
            s.capacity_per_instance,
            trim(s.target_per_instance),
            trim(s.startup_seconds),
            trim(s.report_interval_seconds),
            s.initial_instances,
            s.min_instances,
            s.max_instances,
        );
        let header = [
            "policy",
            "instance-s",
            "overload-s",
            "queue p50",
            "queue p99",
            "queue max",
            "served",
            "unserved",
            "scale events",
            "max instances",
        ];
        let rows: Vec<[String; 10]> = self
            .results
            .iter()
            .map(|o| {
                [
                    o.policy.clone(),
                    format!("{:.1}", o.instance_seconds),
                    format!("{:.1}", o.overload_seconds),
                    format!("{:.3} s", o.queue_p50_seconds),
                    format!("{:.3} s", o.queue_p99_seconds),
                    format!("{:.3} s", o.queue_max_seconds),
                    o.served.to_string(),
                    o.unserved.to_string(),
                    o.scale_events.to_string(),
                    o.max_instances.to_string(),
                ]
            })
            .collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
        for row in &rows {
            for (w, cell) in widths.iter_mut().zip(row) {
                *w = (*w).max(cell.len());
            }
        }
        let line = |cells: &mut dyn Iterator<Item = &str>, out: &mut String| {
            let mut text = String::new();
            for (i, cell) in cells.enumerate() {
                if i == 0 {
                    let _ = write!(text, "{cell:<w$}", w = widths[0]);
                } else {
                    let _ = write!(text, "  {cell:>w$}", w = widths[i]);
                }
            }
            out.push_str(text.trim_end());
            out.push('\n');
        };
        line(&mut header.iter().copied(), &mut out);
        for row in &rows {
            line(&mut row.iter().map(String::as_str), &mut out);
        }
        out
    }

    /// The same as one JSON object.
    pub fn json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

/// A number without trailing zeros: `11.2`, `10`.
fn trim(v: f64) -> String {
    let text = format!("{v:.3}");
    text.trim_end_matches('0').trim_end_matches('.').to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_has_a_row_per_policy_and_aligned_columns() {
        let outcome = |policy: &str, instance_seconds: f64| Outcome {
            policy: policy.into(),
            instance_seconds,
            overload_seconds: 1.5,
            queue_p50_seconds: 0.0,
            queue_p99_seconds: 0.25,
            queue_max_seconds: 2.0,
            served: 10,
            unserved: 0,
            scale_events: 3,
            max_instances: 4,
            end_seconds: 20.0,
            timeline: Vec::new(),
        };
        let results = Results {
            setting: Setting {
                trace: "t.csv".into(),
                format: "csv".into(),
                requests: 10,
                span_seconds: 9.0,
                compress: 1.0,
                service: "api".into(),
                capacity_per_instance: 10,
                target_per_instance: 7.0,
                startup_seconds: 10.0,
                report_interval_seconds: 0.25,
                initial_instances: 1,
                min_instances: 1,
                max_instances: 100,
            },
            results: vec![outcome("tidemark", 12.0), outcome("knative-kpa", 1234.5)],
        };
        let table = results.table();
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        assert!(lines[0].contains("target 7 per instance"), "{table}");
        assert!(lines[2].starts_with("tidemark "), "{table}");
        assert!(lines[3].starts_with("knative-kpa "), "{table}");
        assert_eq!(lines[1].len(), lines[2].len(), "{table}");
        assert!(lines[3].contains("1234.5"), "{table}");
        let json: serde_json::Value = serde_json::from_str(&results.json()).expect("valid JSON");
        assert_eq!(json["results"][1]["instance_seconds"], 1234.5);
        assert_eq!(json["setting"]["target_per_instance"], 7.0);
    }
}
