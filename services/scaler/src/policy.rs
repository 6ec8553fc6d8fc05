//! The direct-mode scaling decision: from the current and desired replica counts to a new
//! replica count, with step limits and a scale-down cool-down, never inside a freeze window.
//! Pure (time is passed in as seconds), so the simulator replays the very same policy.

use std::time::Duration;

/// Knobs of direct mode.
#[derive(Debug, Clone, PartialEq)]
pub struct DirectPolicy {
    /// Most replicas added in one step (0 = no limit).
    pub max_step_up: u32,
    /// Most replicas removed in one step (0 = no limit).
    pub max_step_down: u32,
    /// Scale down only after demand stayed below the current count this long, and this long
    /// after the last change.
    pub scale_down_cooldown: Duration,
}

impl Default for DirectPolicy {
    fn default() -> Self {
        Self {
            max_step_up: 0,
            max_step_down: 0,
            scale_down_cooldown: Duration::from_secs(60),
        }
    }
}

/// What the policy remembers about a pool between decisions.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PoolState {
    /// When the replica count was last changed.
    pub last_change_s: Option<f64>,
    /// When demand was last at or above the current count.
    pub last_needed_s: Option<f64>,
}

/// Why nothing changes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Hold {
    AtTarget,
    Frozen,
    /// Seconds left of the scale-down cool-down.
    CoolDown(f64),
}

/// The outcome of one decision.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Decision {
    Scale { from: u32, to: u32 },
    Hold(Hold),
}

impl DirectPolicy {
    /// Decide for one pool at time `now_s`; `state` is updated when the decision is applied
    /// (call [`PoolState::applied`] after a successful patch).
    pub fn decide(
        &self,
        state: &mut PoolState,
        current: u32,
        desired: u32,
        (min, max): (u32, u32),
        frozen: bool,
        now_s: f64,
    ) -> Decision {
        if frozen {
            return Decision::Hold(Hold::Frozen);
        }
        let max = max.max(min);
        let target = desired.clamp(min, max);
        if target >= current {
            state.last_needed_s = Some(now_s);
        }
        // Bounds come first: a count outside min/max is corrected at once.
        if current > max {
            return Decision::Scale {
                from: current,
                to: max,
            };
        }
        if current < min {
            return Decision::Scale {
                from: current,
                to: min,
            };
        }
        if target > current {
            let to = match self.max_step_up {
                0 => target,
                s => target.min(current.saturating_add(s)),
            };
            return Decision::Scale { from: current, to };
        }
        if target < current {
            let cool = self.scale_down_cooldown.as_secs_f64();
            let since = |t: Option<f64>| t.map_or(f64::INFINITY, |t| now_s - t);
            let waited = since(state.last_change_s).min(since(state.last_needed_s));
            if waited < cool {
                return Decision::Hold(Hold::CoolDown(cool - waited));
            }
            let to = match self.max_step_down {
                0 => target,
                s => target.max(current.saturating_sub(s)),
            };
            return Decision::Scale { from: current, to };
        }
        Decision::Hold(Hold::AtTarget)
    }
}

impl PoolState {
    /// Record that a scale change was applied at `now_s`.
    pub fn applied(&mut self, now_s: f64) {
        self.last_change_s = Some(now_s);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(up: u32, down: u32, cool: u64) -> DirectPolicy {
        DirectPolicy {
            max_step_up: up,
            max_step_down: down,
            scale_down_cooldown: Duration::from_secs(cool),
        }
    }

    #[test]
    fn scale_up_with_step_limit() {
        let mut st = PoolState::default();
        let p = policy(3, 0, 60);
        assert_eq!(
            p.decide(&mut st, 0, 10, (0, 20), false, 0.0),
            Decision::Scale { from: 0, to: 3 }
        );
        assert_eq!(
            policy(0, 0, 60).decide(&mut st, 0, 10, (0, 20), false, 0.0),
            Decision::Scale { from: 0, to: 10 }
        );
        // Desired above max: capped.
        assert_eq!(
            p.decide(&mut st, 19, 50, (0, 20), false, 0.0),
            Decision::Scale { from: 19, to: 20 }
        );
        assert_eq!(
            p.decide(&mut st, 20, 50, (0, 20), false, 0.0),
            Decision::Hold(Hold::AtTarget)
        );
    }

    #[test]
    fn scale_down_waits_for_cool_down_and_steps() {
        let p = policy(0, 2, 60);
        let mut st = PoolState::default();
        assert_eq!(
            p.decide(&mut st, 5, 5, (0, 10), false, 0.0),
            Decision::Hold(Hold::AtTarget)
        );
        st.applied(0.0);
        // Demand drops at t = 10: the cool-down counts from the last time it was needed.
        assert_eq!(
            p.decide(&mut st, 5, 1, (0, 10), false, 10.0),
            Decision::Hold(Hold::CoolDown(50.0))
        );
        assert_eq!(
            p.decide(&mut st, 5, 1, (0, 10), false, 59.0),
            Decision::Hold(Hold::CoolDown(1.0))
        );
        assert_eq!(
            p.decide(&mut st, 5, 1, (0, 10), false, 60.0),
            Decision::Scale { from: 5, to: 3 }
        );
        st.applied(60.0);
        // After a change the cool-down starts again.
        assert_eq!(
            p.decide(&mut st, 3, 0, (0, 10), false, 61.0),
            Decision::Hold(Hold::CoolDown(59.0))
        );
        assert_eq!(
            p.decide(&mut st, 3, 0, (0, 10), false, 120.0),
            Decision::Scale { from: 3, to: 1 }
        );
        // A burst of demand in between resets the cool-down.
        let mut st = PoolState::default();
        assert_eq!(
            p.decide(&mut st, 4, 4, (0, 10), false, 0.0),
            Decision::Hold(Hold::AtTarget)
        );
        assert_eq!(
            p.decide(&mut st, 4, 0, (0, 10), false, 30.0),
            Decision::Hold(Hold::CoolDown(30.0))
        );
        assert_eq!(
            p.decide(&mut st, 4, 6, (0, 10), false, 40.0),
            Decision::Scale { from: 4, to: 6 }
        );
        assert_eq!(
            p.decide(&mut st, 4, 0, (0, 10), false, 70.0),
            Decision::Hold(Hold::CoolDown(30.0))
        );
    }

    #[test]
    fn bounds_and_freeze() {
        let p = policy(1, 1, 600);
        let mut st = PoolState {
            last_change_s: Some(0.0),
            last_needed_s: Some(0.0),
        };
        // Outside min/max is corrected at once, ignoring steps and cool-down.
        assert_eq!(
            p.decide(&mut st, 9, 9, (0, 4), false, 1.0),
            Decision::Scale { from: 9, to: 4 }
        );
        assert_eq!(
            p.decide(&mut st, 0, 0, (3, 4), false, 1.0),
            Decision::Scale { from: 0, to: 3 }
        );
        // Frozen: nothing, not even bounds.
        assert_eq!(
            p.decide(&mut st, 9, 0, (0, 4), true, 1.0),
            Decision::Hold(Hold::Frozen)
        );
        assert_eq!(
            p.decide(&mut st, 0, 50, (0, 4), true, 1.0),
            Decision::Hold(Hold::Frozen)
        );
        // min may be 0 and max below min is read as max = min.
        assert_eq!(
            p.decide(&mut st, 2, 9, (3, 1), false, 1.0),
            Decision::Scale { from: 2, to: 3 }
        );
    }
}
