//! Latency summaries.

use std::time::Duration;

use serde_json::{Value, json};

/// p50, p99 and max of `samples`, in milliseconds.
pub fn summary(samples: &mut [Duration]) -> Value {
    if samples.is_empty() {
        return json!({"p50": null, "p99": null, "max": null});
    }
    samples.sort_unstable();
    let at = |quantile: f64| {
        let index = ((samples.len() as f64 - 1.0) * quantile).round() as usize;
        samples[index].as_secs_f64() * 1000.0
    };
    json!({"p50": at(0.50), "p99": at(0.99), "max": at(1.0)})
}
