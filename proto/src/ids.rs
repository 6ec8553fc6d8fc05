//! Identifier rules shared by every service.

/// Longest task id accepted.
pub const MAX_TASK_ID_LEN: usize = 128;

/// `[A-Za-z0-9_-]{1,128}`: safe as a NATS subject token and as a Kubernetes label value prefix.
pub fn is_valid_task_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_TASK_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

/// A pool name is a DNS label: `[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?`, so it can name a Deployment.
pub fn is_valid_pool(pool: &str) -> bool {
    let b = pool.as_bytes();
    if b.is_empty() || b.len() > 63 {
        return false;
    }
    let ok = |c: u8| c.is_ascii_lowercase() || c.is_ascii_digit();
    ok(b[0]) && ok(b[b.len() - 1]) && b.iter().all(|&c| ok(c) || c == b'-')
}

/// Agent ids follow the task id rule (they appear in subjects and account names).
pub fn is_valid_agent_id(id: &str) -> bool {
    is_valid_task_id(id)
}

/// A fresh, sortable task id (ULID).
pub fn new_task_id() -> String {
    ulid::Ulid::new().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_ids() {
        assert!(is_valid_task_id("a"));
        assert!(is_valid_task_id("01HZX-abc_DEF"));
        assert!(is_valid_task_id(&"x".repeat(128)));
        for bad in ["", "a.b", "a b", "a*", "a>", "é", "a/b", &"x".repeat(129)] {
            assert!(!is_valid_task_id(bad), "{bad:?} accepted");
        }
    }

    #[test]
    fn pools() {
        for good in ["a", "default", "gpu-a100", "a1", &"a".repeat(63)] {
            assert!(is_valid_pool(good), "{good:?} refused");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a.b", "a*", &"a".repeat(64)] {
            assert!(!is_valid_pool(bad), "{bad:?} accepted");
        }
    }
}
