//! Amounts, currencies, the payout formula and escrow sharding. Pure functions, no I/O.

use std::collections::BTreeMap;
use std::str::FromStr;

use rust_decimal::{Decimal, RoundingStrategy};

/// Largest amount one operation may move (keeps every sum far inside `Decimal`'s range).
pub const MAX_AMOUNT: Decimal = Decimal::from_parts(0xA764_0000, 0x0DE0_B6B3, 0, false, 0); // 10^18

/// A currency and the number of decimals its amounts may have.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CurrencySpec {
    pub code: String,
    pub scale: u32,
}

impl FromStr for CurrencySpec {
    type Err = String;
    /// `CODE:SCALE`, e.g. `USD:2` or `SAT:0`.
    fn from_str(s: &str) -> Result<Self, String> {
        let (code, scale) = s
            .split_once(':')
            .ok_or_else(|| format!("currency {s:?} must look like CODE:SCALE, e.g. USD:2"))?;
        if !is_currency_code(code) {
            return Err(format!(
                "currency code {code:?} must be 1 to 12 upper-case letters or digits"
            ));
        }
        let scale: u32 = scale
            .parse()
            .ok()
            .filter(|s| *s <= 18)
            .ok_or_else(|| format!("scale of {code} must be a whole number from 0 to 18"))?;
        Ok(Self {
            code: code.into(),
            scale,
        })
    }
}

/// An hourly spend above which the `TaskbusSpendOverBudget` alert fires: `CODE=AMOUNT`, e.g.
/// `USD=250`. The ledger only exports it (`taskbus_ledger_spend_budget_per_hour`); nothing is
/// refused when it is exceeded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpendBudget {
    pub currency: String,
    pub per_hour: Decimal,
}

impl FromStr for SpendBudget {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let (code, amount) = s.split_once('=').ok_or_else(|| {
            format!("spend budget {s:?} must look like CURRENCY=AMOUNT, e.g. USD=250")
        })?;
        if !is_currency_code(code) {
            return Err(format!(
                "currency code {code:?} must be 1 to 12 upper-case letters or digits"
            ));
        }
        let per_hour = Decimal::from_str_exact(amount.trim())
            .ok()
            .filter(|a| *a > Decimal::ZERO && *a <= MAX_AMOUNT)
            .ok_or_else(|| {
                format!(
                    "spend budget of {code} must be a positive amount up to 10^18, not {amount:?}"
                )
            })?;
        Ok(Self {
            currency: code.into(),
            per_hour,
        })
    }
}

/// Refuse budgets for currencies the ledger does not know, and a currency given twice.
pub fn check_budgets(budgets: &[SpendBudget], currencies: &[CurrencySpec]) -> Result<(), String> {
    let mut seen = std::collections::BTreeSet::new();
    for b in budgets {
        if !currencies.iter().any(|c| c.code == b.currency) {
            return Err(format!(
                "spend budget for {}: not a configured currency (add it to --currencies)",
                b.currency
            ));
        }
        if !seen.insert(&b.currency) {
            return Err(format!("spend budget for {} is given twice", b.currency));
        }
    }
    Ok(())
}

/// `[A-Z0-9]{1,12}` (the coordinator's rule for an envelope's `currency`).
pub fn is_currency_code(c: &str) -> bool {
    (1..=12).contains(&c.len())
        && c.bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit())
}

/// The currencies a ledger knows.
#[derive(Debug, Clone)]
pub struct Currencies {
    scales: BTreeMap<String, u32>,
    default: String,
}

impl Currencies {
    /// `default` must be one of `specs`.
    pub fn new(specs: &[CurrencySpec], default: &str) -> Result<Self, String> {
        let mut scales = BTreeMap::new();
        for s in specs {
            if scales.insert(s.code.clone(), s.scale).is_some() {
                return Err(format!("currency {} is configured twice", s.code));
            }
        }
        if !scales.contains_key(default) {
            return Err(format!(
                "default currency {default} is not among the configured currencies"
            ));
        }
        Ok(Self {
            scales,
            default: default.into(),
        })
    }
    pub fn default_code(&self) -> &str {
        &self.default
    }
    pub fn scale(&self, code: &str) -> Option<u32> {
        self.scales.get(code).copied()
    }
    pub fn iter(&self) -> impl Iterator<Item = (&str, u32)> {
        self.scales.iter().map(|(c, s)| (c.as_str(), *s))
    }
    /// Resolve an optional currency to a known one.
    pub fn resolve(&self, c: Option<&str>) -> Result<(String, u32), String> {
        let code = c.unwrap_or(&self.default);
        match self.scale(code) {
            Some(s) => Ok((code.to_string(), s)),
            None => Err(format!(
                "unknown currency {:?}; this ledger knows {}",
                truncate(code, 16),
                self.scales.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }
}

/// Parse a positive amount: digits with an optional fraction (no sign, no exponent), at most
/// `scale` significant decimals (trailing zeros do not count: `12.50` is fine for USD, `12.505`
/// is refused, never rounded), at most [`MAX_AMOUNT`].
pub fn parse_amount(s: &str, currency: &str, scale: u32) -> Result<Decimal, String> {
    let d = parse_plain_decimal(s).ok_or_else(|| {
        format!(
            "amount {:?} must be a positive decimal string such as \"12.50\"",
            truncate(s, 40)
        )
    })?;
    let d = d.normalize();
    if d.is_zero() {
        return Err("amount must be greater than zero".into());
    }
    if d.scale() > scale {
        return Err(format!(
            "amount {s} has {} decimals but {currency} allows {scale}; amounts are never rounded",
            d.scale()
        ));
    }
    if d > MAX_AMOUNT {
        return Err(format!(
            "amount {s} is larger than the limit of {MAX_AMOUNT} per operation"
        ));
    }
    Ok(d)
}

/// `[0-9]+(\.[0-9]+)?`, at most 40 characters, parsed exactly.
pub fn parse_plain_decimal(s: &str) -> Option<Decimal> {
    if s.is_empty() || s.len() > 40 {
        return None;
    }
    let (int, frac) = match s.split_once('.') {
        Some((i, f)) => (i, Some(f)),
        None => (s, None),
    };
    let ok = !int.is_empty()
        && int.bytes().all(|b| b.is_ascii_digit())
        && frac.is_none_or(|f| !f.is_empty() && f.bytes().all(|b| b.is_ascii_digit()));
    if !ok {
        return None;
    }
    Decimal::from_str_exact(s).ok()
}

/// A reputation multiplier from a `succeeded` event: absent means 1; otherwise a non-negative
/// plain decimal string.
pub fn parse_multiplier(m: Option<&str>) -> Result<Decimal, String> {
    match m {
        None => Ok(Decimal::ONE),
        Some(s) => parse_plain_decimal(s)
            .map(|d| d.normalize())
            .ok_or_else(|| {
                format!(
                    "reputation {:?} must be a non-negative decimal string such as \"0.9\"",
                    truncate(s, 40)
                )
            }),
    }
}

/// How a posted hold splits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Split {
    /// Paid by the payer: `agent + platform`.
    pub payout: Decimal,
    pub agent: Decimal,
    pub platform: Decimal,
    /// Released back to the payer: `price - payout`.
    pub refund: Decimal,
}

/// The settlement formula:
/// `payout = min(price × multiplier, price)` rounded toward zero to the currency's scale,
/// `platform = payout × fee_share` rounded toward zero, `agent = payout − platform`,
/// `refund = price − payout`. The parts always add up to `price` exactly.
pub fn split(price: Decimal, multiplier: Decimal, fee_share: Decimal, scale: u32) -> Split {
    let payout = if multiplier >= Decimal::ONE {
        price
    } else {
        price
            .checked_mul(multiplier)
            .unwrap_or(Decimal::ZERO)
            .round_dp_with_strategy(scale, RoundingStrategy::ToZero)
            .min(price)
    };
    let platform = payout
        .checked_mul(fee_share)
        .unwrap_or(Decimal::ZERO)
        .round_dp_with_strategy(scale, RoundingStrategy::ToZero)
        .min(payout);
    Split {
        payout,
        agent: payout - platform,
        platform,
        refund: price - payout,
    }
}

/// Shard of a task's escrow and platform accounts: FNV-1a of the task id, so live and replayed
/// ledgers put a task on the same shard.
pub fn shard_of(task_id: &str, shards: u32) -> u32 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in task_id.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % u64::from(shards.max(1))) as u32
}

/// Decimal as a string without trailing zeros beyond the currency scale (`1.50` stays `1.50`
/// for USD; `1` becomes `1.00`).
pub fn fmt_amount(d: Decimal, scale: u32) -> String {
    let mut d = d.normalize();
    if d.scale() < scale {
        d.rescale(scale);
    }
    d.to_string()
}

pub(crate) fn truncate(s: &str, n: usize) -> &str {
    match s.char_indices().nth(n) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn spend_budgets_are_parsed_and_hostile_ones_refused() {
        let b: SpendBudget = "USD=250.50".parse().unwrap();
        assert_eq!(b.currency, "USD");
        assert_eq!(b.per_hour, Decimal::new(25050, 2));
        for (bad, says) in [
            ("USD", "CURRENCY=AMOUNT"),
            ("usd=1", "upper-case"),
            ("=1", "upper-case"),
            ("USD=", "positive amount"),
            ("USD=0", "positive amount"),
            ("USD=-5", "positive amount"),
            ("USD=1e3", "positive amount"),
            ("USD=NaN", "positive amount"),
            ("USD=1000000000000000001", "positive amount"),
            ("USD=99999999999999999999999999999999", "positive amount"),
            ("USD=1=2", "positive amount"),
            ("US D=1", "upper-case"),
        ] {
            let e = bad.parse::<SpendBudget>().unwrap_err();
            assert!(e.contains(says), "{bad:?}: {e}");
        }
        let usd = CurrencySpec {
            code: "USD".into(),
            scale: 2,
        };
        let ok = |s: &str| s.parse::<SpendBudget>().unwrap();
        check_budgets(&[ok("USD=1")], std::slice::from_ref(&usd)).unwrap();
        let e = check_budgets(&[ok("EUR=1")], std::slice::from_ref(&usd)).unwrap_err();
        assert!(e.contains("--currencies"), "{e}");
        let e = check_budgets(&[ok("USD=1"), ok("USD=2")], &[usd]).unwrap_err();
        assert!(e.contains("twice"), "{e}");
    }

    use super::*;

    fn d(s: &str) -> Decimal {
        s.parse().unwrap()
    }

    #[test]
    fn max_amount_is_ten_to_the_eighteenth() {
        assert_eq!(MAX_AMOUNT, d("1000000000000000000"));
    }

    #[test]
    fn amounts_respect_scale_and_are_never_rounded() {
        assert_eq!(parse_amount("12.50", "USD", 2), Ok(d("12.5")));
        assert_eq!(parse_amount("12.0", "SAT", 0), Ok(d("12")));
        assert!(parse_amount("12.505", "USD", 2)
            .unwrap_err()
            .contains("never rounded"));
        assert!(parse_amount("1.5", "SAT", 0).is_err());
        for bad in [
            "", "-1", "+1", "1e3", " 1", "1.", ".5", "0", "0.00", "NaN", "1,5", "１",
        ] {
            assert!(parse_amount(bad, "USD", 2).is_err(), "{bad:?} accepted");
        }
        assert!(parse_amount("1000000000000000001", "SAT", 0).is_err());
        assert!(parse_amount(&"9".repeat(41), "SAT", 0).is_err());
    }

    #[test]
    fn split_adds_up_and_caps_at_price() {
        let s = split(d("1.00"), d("0.9"), d("0.1"), 2);
        assert_eq!(
            (s.payout, s.agent, s.platform, s.refund),
            (d("0.90"), d("0.81"), d("0.09"), d("0.10"))
        );
        let s = split(d("1.00"), d("1.7"), d("0.1"), 2);
        assert_eq!((s.payout, s.refund), (d("1.00"), d("0")));
        let s = split(d("1"), d("0.5"), d("0.1"), 0);
        assert_eq!(
            (s.payout, s.agent, s.platform, s.refund),
            (d("0"), d("0"), d("0"), d("1"))
        );
        let s = split(d("0.07"), d("0.333"), d("0.25"), 2);
        assert_eq!(s.payout + s.refund, d("0.07"));
        assert_eq!(s.agent + s.platform, s.payout);
        let s = split(d("5"), Decimal::ZERO, d("0.1"), 0);
        assert_eq!(s.refund, d("5"));
    }

    #[test]
    fn multipliers() {
        assert_eq!(parse_multiplier(None), Ok(Decimal::ONE));
        assert_eq!(parse_multiplier(Some("0.75")), Ok(d("0.75")));
        assert!(parse_multiplier(Some("-0.5")).is_err());
        assert!(parse_multiplier(Some("abc")).is_err());
    }

    #[test]
    fn shards_are_stable() {
        assert_eq!(shard_of("task-1", 1), 0);
        let a = shard_of("task-1", 8);
        assert_eq!(a, shard_of("task-1", 8));
        assert!(a < 8);
        let spread: std::collections::HashSet<u32> =
            (0..200).map(|i| shard_of(&format!("t{i}"), 8)).collect();
        assert_eq!(spread.len(), 8);
    }

    #[test]
    fn currency_specs() {
        assert_eq!(
            "USD:2".parse::<CurrencySpec>(),
            Ok(CurrencySpec {
                code: "USD".into(),
                scale: 2
            })
        );
        assert!("usd:2".parse::<CurrencySpec>().is_err());
        assert!("USD".parse::<CurrencySpec>().is_err());
        assert!("USD:19".parse::<CurrencySpec>().is_err());
        let c =
            Currencies::new(&["USD:2".parse().unwrap(), "SAT:0".parse().unwrap()], "USD").unwrap();
        assert_eq!(c.resolve(None), Ok(("USD".into(), 2)));
        assert!(c.resolve(Some("EUR")).unwrap_err().contains("SAT, USD"));
        assert_eq!(fmt_amount(d("1"), 2), "1.00");
        assert_eq!(fmt_amount(d("1.500"), 2), "1.50");
    }
}
