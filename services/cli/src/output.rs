//! Human and JSON output.

use taskbus_proto::api::TaskRecord;

pub fn json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

fn short(v: &Option<serde_json::Value>, n: usize) -> String {
    let s = v.as_ref().map(|v| v.to_string()).unwrap_or_default();
    if s.chars().count() > n {
        format!("{}…", s.chars().take(n).collect::<String>())
    } else {
        s
    }
}

pub fn task_table(ts: &[TaskRecord]) {
    if ts.is_empty() {
        println!("no tasks");
        return;
    }
    println!(
        "{:<28} {:<12} {:<10} {:<12} {:>7}  {:<20} DETAIL",
        "ID", "POOL", "KIND", "STATUS", "ATTEMPT", "UPDATED"
    );
    for t in ts {
        let detail = match t.status.as_str() {
            "rejected" => format!(
                "{}: {}",
                t.reason.clone().unwrap_or_default(),
                t.error.clone().unwrap_or_default()
            ),
            "succeeded" => short(&t.result, 40),
            _ => t.error.clone().unwrap_or_default(),
        };
        println!(
            "{:<28} {:<12} {:<10} {:<12} {:>3}/{:<3}  {:<20} {}",
            t.id,
            t.pool,
            t.kind.clone().unwrap_or_else(|| "-".into()),
            t.status,
            t.attempt,
            t.max_attempts,
            t.updated_at.format("%Y-%m-%d %H:%M:%S"),
            detail
        );
    }
}

pub fn task_detail(t: &TaskRecord) {
    println!("id:         {}", t.id);
    println!("pool:       {}", t.pool);
    println!("kind:       {}", t.kind.as_deref().unwrap_or("-"));
    println!("status:     {}", t.status);
    println!("attempt:    {}/{}", t.attempt, t.max_attempts);
    if let Some(p) = &t.priority {
        println!("priority:   {p}");
    }
    if let Some(a) = &t.agent_id {
        println!("agent:      {a}");
    }
    if let Some(r) = &t.reason {
        println!("reason:     {r}");
    }
    if let Some(e) = &t.error {
        println!("error:      {e}");
    }
    if let Some(r) = &t.result {
        println!("result:     {r}");
    }
    println!("created:    {}", t.created_at.to_rfc3339());
    if let Some(s) = t.started_at {
        println!("started:    {}", s.to_rfc3339());
    }
    if let Some(f) = t.finished_at {
        println!("finished:   {}", f.to_rfc3339());
    }
    if let Some(tp) = &t.traceparent {
        println!("trace:      {tp}");
    }
}
