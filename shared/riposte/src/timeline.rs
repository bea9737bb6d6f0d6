//! A run as a readable timeline: steps, status, timings, inputs, outputs, errors, history.

use std::fmt::Write;

use serde_json::Value;

use riposte_core::model::Millis;
use riposte_core::run::{Run, Trigger};

pub fn time(ms: Millis) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%Y-%m-%d %H:%M:%S%.3fZ").to_string())
        .unwrap_or_else(|| ms.to_string())
}

fn short(v: &Value, max: usize) -> String {
    let s = v.to_string();
    if s.len() <= max {
        s
    } else {
        let mut end = max;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}… ({} bytes)", &s[..end], s.len())
    }
}

fn took(a: Option<Millis>, b: Option<Millis>) -> String {
    match (a, b) {
        (Some(a), Some(b)) => format!("{} ms", b - a),
        _ => "-".into(),
    }
}

pub fn render(run: &Run) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "run {}  playbook {} v{}  status {}",
        run.id,
        run.playbook_id,
        run.playbook_version,
        run.status.as_str()
    );
    let trig = match &run.trigger {
        Trigger::Rule {
            rule_id,
            event_id,
            alert_id,
        } => format!("rule {rule_id} (event {event_id}, alert {alert_id})"),
        Trigger::Manual { by } => format!("manual, by {by}"),
        Trigger::Child {
            parent_run, step, ..
        } => format!("step {step} of run {parent_run}"),
    };
    let _ = writeln!(o, "trigger  {trig}");
    let _ = writeln!(
        o,
        "created  {}   finished {}   took {}",
        time(run.created_at),
        run.finished_at.map(time).unwrap_or("-".into()),
        took(Some(run.created_at), run.finished_at)
    );
    if let Some(e) = &run.error {
        let _ = writeln!(o, "error    {e}");
    }
    let _ = writeln!(
        o,
        "\n{:<22} {:<10} {:>9} {:>10}",
        "STEP", "STATUS", "START", "TOOK"
    );
    for s in &run.steps {
        let start = s
            .started_at
            .map(|t| format!("+{} ms", t - run.created_at))
            .unwrap_or("-".into());
        let _ = writeln!(
            o,
            "{:<22} {:<10} {:>9} {:>10}",
            s.id,
            s.status.as_str(),
            start,
            took(s.started_at, s.finished_at)
        );
        for (i, it) in s.iterations.iter().enumerate() {
            let prefix = if s.looped {
                format!("  [{i}] ")
            } else {
                "  ".into()
            };
            if let Some(item) = &it.item {
                let _ = writeln!(o, "{prefix}item: {}", short(item, 120));
            }
            if it.attempt > 1 {
                let _ = writeln!(o, "{prefix}attempts: {}", it.attempt);
            }
            if let Some(input) = &it.input {
                let _ = writeln!(o, "{prefix}input: {}", short(input, 240));
            }
            if let Some(a) = &it.approval {
                let _ = writeln!(
                    o,
                    "{prefix}approval: {} (choices: {}; expires {})",
                    a.message,
                    a.choices.join(", "),
                    time(a.expires_at)
                );
                if let Some(d) = &a.decision {
                    let _ = writeln!(
                        o,
                        "{prefix}answered: {} by {} at {}{}",
                        d.choice,
                        d.by,
                        time(d.at),
                        if d.expired { " (expired)" } else { "" }
                    );
                }
            }
            if let Some(out) = &it.output {
                let _ = writeln!(o, "{prefix}output: {}", short(out, 240));
            }
            if let Some(e) = &it.error {
                let _ = writeln!(o, "{prefix}error: {e}");
            }
        }
        if s.iterations.is_empty()
            && let Some(e) = &s.error
        {
            let _ = writeln!(o, "  error: {e}");
        }
    }
    let _ = writeln!(o, "\nHISTORY");
    for h in &run.history {
        let step = match (&h.step, h.iteration) {
            (Some(s), Some(i)) if i > 0 => format!("{s}[{i}]"),
            (Some(s), _) => s.clone(),
            _ => String::new(),
        };
        let _ = writeln!(
            o,
            "  +{:>7} ms  {:<20} {:<18} {}",
            h.at - run.created_at,
            step,
            h.event,
            h.detail.clone().unwrap_or_default()
        );
    }
    o
}
