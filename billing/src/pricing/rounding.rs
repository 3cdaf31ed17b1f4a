//! Rounding a line's exact amount to the plan's step, once.

use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};

use super::exact;

/// A plan's rounding: every line amount becomes a whole number of `step`s
/// (0.01 for cents), chosen by `rule`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rounding {
    /// A decimal > 0 whose reciprocal is a finite decimal (0.01, 0.05, 1).
    pub step: Decimal,
    pub rule: RoundingRule,
}

/// Which whole number of steps an amount between two becomes. Amounts are
/// never negative, so "up" is away from zero.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoundingRule {
    /// To the nearer step; exactly halfway goes up (0.125 → 0.13).
    HalfUp,
    /// To the nearer step; exactly halfway goes to the even step (0.125 →
    /// 0.12, 0.135 → 0.14): banker's rounding.
    HalfEven,
    /// To the step above unless already on a step (0.121 → 0.13).
    Up,
    /// To the step below (0.129 → 0.12).
    Down,
}

impl RoundingRule {
    pub const ALL: [RoundingRule; 4] = [
        RoundingRule::HalfUp,
        RoundingRule::HalfEven,
        RoundingRule::Up,
        RoundingRule::Down,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RoundingRule::HalfUp => "half_up",
            RoundingRule::HalfEven => "half_even",
            RoundingRule::Up => "up",
            RoundingRule::Down => "down",
        }
    }

    pub fn parse(name: &str) -> Option<RoundingRule> {
        RoundingRule::ALL.into_iter().find(|r| r.as_str() == name)
    }

    fn strategy(self) -> RoundingStrategy {
        match self {
            RoundingRule::HalfUp => RoundingStrategy::MidpointAwayFromZero,
            RoundingRule::HalfEven => RoundingStrategy::MidpointNearestEven,
            RoundingRule::Up => RoundingStrategy::AwayFromZero,
            RoundingRule::Down => RoundingStrategy::ToZero,
        }
    }
}

impl Rounding {
    /// `amount` rounded to a whole number of steps, written with the step's
    /// decimal places (`0.4` at step `0.01` is `0.40`). `None` only if the
    /// result cannot be represented exactly, which validated plans and sane
    /// amounts never meet.
    pub fn apply(&self, amount: Decimal) -> Option<Decimal> {
        let steps = exact::div(amount, self.step)?;
        let whole = steps.round_dp_with_strategy(0, self.rule.strategy());
        exact::with_min_scale(exact::mul(whole, self.step)?, self.step.scale())
    }

    /// Whether `amount` is already a whole number of steps.
    pub fn is_on_step(&self, amount: Decimal) -> bool {
        exact::div(amount, self.step).is_some_and(|steps| steps.fract().is_zero())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(text: &str) -> Decimal {
        Decimal::from_str_exact(text).unwrap()
    }

    fn round(step: &str, rule: RoundingRule, amount: &str) -> String {
        Rounding { step: d(step), rule }.apply(d(amount)).unwrap().to_string()
    }

    #[test]
    fn each_rule_at_a_tie_between_two_cents() {
        use RoundingRule::*;
        // 0.125 lies exactly between 0.12 (even) and 0.13.
        assert_eq!(round("0.01", HalfUp, "0.125"), "0.13");
        assert_eq!(round("0.01", HalfEven, "0.125"), "0.12");
        assert_eq!(round("0.01", Up, "0.125"), "0.13");
        assert_eq!(round("0.01", Down, "0.125"), "0.12");
        // 0.135 lies between 0.13 and 0.14 (even).
        assert_eq!(round("0.01", HalfUp, "0.135"), "0.14");
        assert_eq!(round("0.01", HalfEven, "0.135"), "0.14");
    }

    #[test]
    fn each_rule_off_a_tie() {
        use RoundingRule::*;
        // AWS Lambda's 1,100,000 GB-s × $0.0000166667.
        assert_eq!(round("0.01", HalfUp, "18.33337"), "18.33");
        assert_eq!(round("0.01", HalfEven, "18.33337"), "18.33");
        assert_eq!(round("0.01", Up, "18.33337"), "18.34");
        assert_eq!(round("0.01", Down, "18.33337"), "18.33");
        assert_eq!(round("0.01", HalfUp, "0.1251"), "0.13");
        assert_eq!(round("0.01", HalfEven, "0.1251"), "0.13");
        assert_eq!(round("0.01", Up, "0.1201"), "0.13");
        assert_eq!(round("0.01", Down, "0.1299"), "0.12");
    }

    #[test]
    fn amounts_on_a_step_stay_and_show_the_steps_places() {
        for rule in RoundingRule::ALL {
            assert_eq!(round("0.01", rule, "0.4"), "0.40");
            assert_eq!(round("0.01", rule, "18"), "18.00");
            assert_eq!(round("0.01", rule, "0"), "0.00");
        }
    }

    #[test]
    fn steps_other_than_a_power_of_ten() {
        use RoundingRule::*;
        // 1.025 = 20.5 steps of 0.05: halfway between 1.00 (20, even) and 1.05.
        assert_eq!(round("0.05", HalfUp, "1.025"), "1.05");
        assert_eq!(round("0.05", HalfEven, "1.025"), "1.00");
        assert_eq!(round("0.05", Up, "1.001"), "1.05");
        assert_eq!(round("0.05", Down, "1.049"), "1.00");
        assert_eq!(round("1", HalfUp, "2.5"), "3");
        assert_eq!(round("1", HalfEven, "2.5"), "2");
    }

    #[test]
    fn rule_names_round_trip() {
        for rule in RoundingRule::ALL {
            assert_eq!(RoundingRule::parse(rule.as_str()), Some(rule));
        }
        assert_eq!(RoundingRule::parse("nearest"), None);
    }
}
