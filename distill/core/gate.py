"""A gate: thresholds on the figures a report measured, checked before its model may be pushed. A rule is a mapping,
`{figure: test_perplexity, max: 1.5, relative_to: teacher}`, or the same in one string,
`"test_perplexity <= 1.5 * teacher"` (`"kld_mean <= 0.05"`, `"gguf/q4_k_m: test_loop_share <= 0.2"`). A rule on a
figure the report does not measure is refused before any work; after the report, the pipeline stops before the next
stage (`push`) when a rule fails (`GateFailed`, exit status 3)."""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from distill.core.errors import ConfigError

RULE = re.compile(r"^\s*(?:(?P<row>[^:\s]+)\s*:\s*)?(?P<figure>\w+)\s*(?P<op><=|>=)\s*(?P<bound>[-+0-9.eE]+)"
                  r"(?:\s*\*\s*(?P<relative_to>\S+))?\s*$")
STRING_FORM = "'FIGURE <= BOUND', 'FIGURE >= BOUND * ROW' or 'ROW: FIGURE <= BOUND'"


class GateFailed(Exception):
    """A measured figure past its gate's threshold: the model must not be served."""


@dataclass
class GateRule:
    """One threshold on a figure of the report: a mapping, or one string such as `"test_perplexity <= 1.5 * teacher"`
    (`ROW: FIGURE <= BOUND * ROW`, each ROW optional)."""
    figure: str = ""
    """A figure of the report's rows, e.g. `test_perplexity`, `kld_mean`, `test_loop_share`, `accuracy`."""
    max: Optional[float] = None
    """The figure must be at most this (times the `relative_to` row's figure)."""
    min: Optional[float] = None
    """The figure must be at least this (times the `relative_to` row's figure)."""
    relative_to: Optional[str] = None
    """A report row (by its model label, e.g. `teacher`) whose figure multiplies the bound; None: the bound is the
    threshold itself."""
    row: Optional[str] = None
    """The report row checked (its model label); None: the served model's."""

    @classmethod
    def from_text(cls, text: str, where: str) -> GateRule:
        match = RULE.match(text)
        try:
            bound = float(match["bound"]) if match else None
        except ValueError:
            bound = None
        if bound is None:
            raise ConfigError(f"{where}: '{text}' is not a gate rule; write {STRING_FORM}")
        return cls(match["figure"], max=bound if match["op"] == "<=" else None,
                   min=bound if match["op"] == ">=" else None, relative_to=match["relative_to"], row=match["row"])

    def __str__(self) -> str:
        op, bound = ("<=", self.max) if self.max is not None else (">=", self.min)
        return (f"{self.row + ': ' if self.row else ''}{self.figure} {op} {bound:g}"
                f"{' * ' + self.relative_to if self.relative_to else ''}")


def check_gate(rules: list[GateRule], figures: list[str]) -> None:
    """Config-only: each rule names a measured figure and exactly one bound."""
    for i, rule in enumerate(rules):
        if rule.figure not in figures:
            raise ConfigError(f"gate[{i}]: the report measures no figure '{rule.figure}'; it measures "
                              f"{', '.join(figures)}")
        if (rule.max is None) == (rule.min is None):
            raise ConfigError(f"gate[{i}]: give '{rule.figure}' one bound, max or min")


def gate_outcomes(rules: list[GateRule], rows: list[dict], served: str) -> list[dict]:
    """Each rule checked on the measured rows (each with its `model` label): the rule, its figure and row, the value,
    the threshold and whether it passed; a figure a row lacks (not measured there) fails."""
    by_label = {row["model"]: row for row in rows}
    outcomes = []
    for rule in rules:
        label = rule.row or served
        value = row_of(by_label, label, rule)[rule.figure]
        bound = rule.max if rule.max is not None else rule.min
        scale = row_of(by_label, rule.relative_to, rule)[rule.figure] if rule.relative_to else 1.0
        threshold = None if scale is None else bound * scale
        passed = (value is not None and threshold is not None
                  and (value <= threshold if rule.max is not None else value >= threshold))
        outcomes.append({"rule": str(rule), "figure": rule.figure, "row": label, "value": value,
                         "threshold": threshold, "passed": passed})
    return outcomes


def row_of(by_label: dict[str, dict], label: str, rule: GateRule) -> dict:
    if label not in by_label:
        raise ConfigError(f"gate '{rule}': the report has no row '{label}'; its rows: {', '.join(by_label)}")
    return by_label[label]


def outcome_text(outcome: dict) -> str:
    """One line: the figure, its value, the threshold, and whether it passed."""
    value = "not measured" if outcome["value"] is None else f"{outcome['value']:.4g}"
    threshold = "not measured" if outcome["threshold"] is None else f"{outcome['threshold']:.4g}"
    verdict = "passed" if outcome["passed"] else "FAILED"
    return f"{outcome['figure']} of {outcome['row']} is {value}, threshold {threshold} ({outcome['rule']}): {verdict}"


def require_passed(outcomes: list[dict], where: str) -> None:
    """Raise `GateFailed` naming every failed rule (its figure, value and threshold)."""
    failed = [outcome_text(outcome) for outcome in outcomes if not outcome["passed"]]
    if failed:
        raise GateFailed(f"{where}: " + "; ".join(failed))
