//! Names and label values for the Kubernetes objects of the backend.
//!
//! A Job's name is also the value of the `batch.kubernetes.io/job-name` label the Job controller
//! puts on its pods, so it must be a DNS-1123 label of at most 63 characters. Task ids are
//! `[A-Za-z0-9_-]{1,128}` (mixed case, underscores, too long), so a name is a readable,
//! lower-cased prefix plus 16 hex digits of the SHA-256 of the exact (pool, task id, attempt):
//! deterministic across processes and versions (a redelivered attempt finds its Job again), and
//! distinct (task, attempt) pairs never share a name in practice (2⁻⁶⁴ per pair; the backend
//! also checks the annotations of a Job it adopts).

/// Longest DNS-1123 label, label value or name part of a qualified key.
pub const MAX_LABEL: usize = 63;

/// SHA-256 of `data`, from `ring` (already linked for TLS); checked against the standard's
/// test vectors, so a name never changes with a dependency's version.
pub fn sha256(data: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(ring::digest::digest(&ring::digest::SHA256, data).as_ref());
    out
}

/// The first 16 hex digits (64 bits) of the SHA-256 of `parts`, each length-prefixed so that
/// no two different lists of parts hash the same bytes.
pub fn short_hash(parts: &[&str]) -> String {
    let mut bytes = Vec::new();
    for p in parts {
        bytes.extend_from_slice(&(p.len() as u64).to_be_bytes());
        bytes.extend_from_slice(p.as_bytes());
    }
    sha256(&bytes)[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` lower-cased with every character outside `[a-z0-9-]` turned into `-`, runs of `-`
/// collapsed, cut to `max` characters and trimmed of `-` at both ends (may be empty).
fn dns_fragment(s: &str, max: usize) -> String {
    let mut out = String::new();
    for c in s.chars() {
        let c = c.to_ascii_lowercase();
        let c = if c.is_ascii_lowercase() || c.is_ascii_digit() {
            c
        } else {
            '-'
        };
        if c == '-' && out.ends_with('-') {
            continue;
        }
        out.push(c);
    }
    out.truncate(max);
    out.trim_matches('-').to_string()
}

/// The name of the Job of one attempt: `<pool>-<task id>` made DNS-safe and cut to fit, then
/// `-<attempt>-<16 hex digits>`. Always a valid DNS-1123 label of at most 63 characters, the
/// same for the same (pool, task id, attempt) in every process and version.
pub fn job_name(pool: &str, task_id: &str, attempt: u32) -> String {
    let suffix = format!(
        "-{attempt}-{}",
        short_hash(&[pool, task_id, &attempt.to_string()])
    );
    let readable = dns_fragment(&format!("{pool}-{task_id}"), MAX_LABEL - suffix.len());
    let readable = if readable.is_empty() {
        "task".to_string()
    } else {
        readable
    };
    format!("{readable}{suffix}")
}

/// Whether `s` is a DNS-1123 label: 1–63 of `[a-z0-9-]`, alphanumeric at both ends.
pub fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= MAX_LABEL
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Whether `s` is a valid label value: empty, or 1–63 of `[A-Za-z0-9_.-]` with an
/// alphanumeric first and last character. The name part of a qualified key (`prefix/name`)
/// follows the same rule, without the empty case.
pub fn is_label_value(s: &str) -> bool {
    s.is_empty() || is_key_name(s)
}

/// Whether `s` is the name part of a qualified label or annotation key.
pub fn is_key_name(s: &str) -> bool {
    let b = s.as_bytes();
    !b.is_empty()
        && b.len() <= MAX_LABEL
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'))
        && b[0].is_ascii_alphanumeric()
        && b[b.len() - 1].is_ascii_alphanumeric()
}

/// A label key: an optional DNS-subdomain prefix (at most 253 characters) and `/`, then a name.
pub fn is_label_key(s: &str) -> bool {
    match s.split_once('/') {
        None => is_key_name(s),
        Some((prefix, name)) => {
            !prefix.is_empty()
                && prefix.len() <= 253
                && prefix.split('.').all(is_dns_label)
                && is_key_name(name)
        }
    }
}

/// A label value standing for `s`: `s` itself when it is a valid one (so
/// `kubectl get jobs -l taskbus.dev/task-id=<id>` works for ordinary ids), otherwise a valid
/// prefix of it plus `-` and 16 hex digits of its SHA-256. The full value belongs in an
/// annotation; this one is for selecting and reading.
pub fn label_value(s: &str) -> String {
    if is_label_value(s) {
        return s.to_string();
    }
    let hash = short_hash(&[s]);
    let keep: String = s
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '-'
            }
        })
        .take(MAX_LABEL - 1 - hash.len())
        .collect();
    let keep = keep.trim_matches(|c: char| !c.is_ascii_alphanumeric());
    if keep.is_empty() {
        hash
    } else {
        format!("{keep}-{hash}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(b: &[u8]) -> String {
        b.iter().map(|b| format!("{b:02x}")).collect()
    }

    #[test]
    fn sha256_matches_the_standard_vectors() {
        assert_eq!(
            hex(&sha256(b"")),
            "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert_eq!(
            hex(&sha256(b"abc")),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
        assert_eq!(
            hex(&sha256(
                b"abcdbcdecdefdefgefghfghighijhijkijkljklmklmnlmnomnopnopq"
            )),
            "248d6a61d20638b8e5c026930c3e6039a33ce45964ff2167f6ecedd419db06c1"
        );
        // Two blocks of padding (55, 56 and 64 bytes are the edge cases).
        assert_eq!(
            hex(&sha256(&[b'a'; 64])),
            "ffe054fe7ae0cb6dc65c3af9b61d5209f439851db43d0ba5997337df154668eb"
        );
    }

    #[test]
    fn job_names_are_valid_stable_and_distinct() {
        let long = "A_".repeat(64); // 128 characters, upper case and underscores
        let hostile = [
            "x",
            "Task_1",
            "___",
            "---",
            "-a-",
            "01HZX3K9M2ABCDEFGHJKMNPQRS",
            long.as_str(),
            &"z".repeat(128),
            &"9".repeat(128),
        ];
        let mut seen = std::collections::HashSet::new();
        for id in hostile {
            for attempt in [0, 1, 2, u32::MAX] {
                for pool in ["gpu", "a", &"p".repeat(63)] {
                    let n = job_name(pool, id, attempt);
                    assert!(is_dns_label(&n), "{n:?} for {pool}/{id}/{attempt}");
                    assert_eq!(n, job_name(pool, id, attempt), "deterministic");
                    assert!(seen.insert(n.clone()), "{n} twice");
                }
            }
        }
        // Ids that differ only in case or in `_` vs `-` get different names.
        assert_ne!(job_name("gpu", "Ab", 1), job_name("gpu", "ab", 1));
        assert_ne!(job_name("gpu", "a_b", 1), job_name("gpu", "a-b", 1));
        assert_ne!(job_name("gpu", "a", 1), job_name("gpu", "a", 2));
        assert_ne!(job_name("gpu", "a-b", 1), job_name("gpu-a", "b", 1));
        // Pinned (computed independently with Python's hashlib): a name never changes across
        // versions, so a redelivered attempt finds its Job after an upgrade of the dispatcher.
        assert_eq!(
            job_name("gpu", "Task_1", 3),
            "gpu-task-1-3-72f5647bb888e905"
        );
        assert!(job_name("gpu", &long, 1).starts_with("gpu-a-a-a-"));
    }

    #[test]
    fn label_values_are_valid() {
        assert_eq!(label_value("Task_1"), "Task_1");
        assert_eq!(label_value("a"), "a");
        for id in ["_x", "x_", "-", &"a".repeat(64), &"A_".repeat(64)] {
            let v = label_value(id);
            assert!(is_label_value(&v) && !v.is_empty(), "{v:?}");
            assert_eq!(v, label_value(id));
        }
        assert_ne!(label_value(&"a".repeat(64)), label_value(&"a".repeat(65)));
        assert!(is_label_key("taskbus.dev/pool"));
        assert!(is_label_key("nvidia.com/gpu.product"));
        assert!(!is_label_key("Taskbus.dev/pool"));
        assert!(!is_label_key("/x"));
        assert!(!is_label_key("x/"));
        assert!(!is_label_value("-x"));
        assert!(!is_label_value(&"x".repeat(64)));
    }
}
