"""The patching features: what each corrupts, the command sets that can express it, and their names.

Eight features: the table or a field name in the Instruction (ENG*) or the CREATE TABLE (DEF*), on every command
set; the sort field and direction (CS2-3); the aggregate's function and field (CS3). ``helpers.tinysql.pairs``
builds their clean/corrupt pairs.
"""
from __future__ import annotations

from enum import Enum


class Feature(str, Enum):
    ENGTABLENAME = "ENGTABLENAME"
    ENGFIELDNAME = "ENGFIELDNAME"
    DEFTABLENAME = "DEFTABLENAME"
    DEFFIELDNAME = "DEFFIELDNAME"
    ENGORDERBYFIELD = "ENGORDERBYFIELD"
    ENGORDERBYDIRECTION = "ENGORDERBYDIRECTION"
    ENGAGGREGATEFUNCTION = "ENGAGGREGATEFUNCTION"
    ENGAGGREGATEFIELD = "ENGAGGREGATEFIELD"

    @property
    def is_table(self) -> bool:
        return self in (Feature.ENGTABLENAME, Feature.DEFTABLENAME)

    @property
    def in_instruction(self) -> bool:
        return self not in (Feature.DEFTABLENAME, Feature.DEFFIELDNAME)

    @property
    def corrupts_a_name(self) -> bool:
        """A table or field name (novel names and synonyms apply); False for a direction or a function word."""
        return self not in (Feature.ENGORDERBYDIRECTION, Feature.ENGAGGREGATEFUNCTION)

    @property
    def sorts(self) -> bool:
        """About the ORDER BY clause (CS2-3)."""
        return self in (Feature.ENGORDERBYFIELD, Feature.ENGORDERBYDIRECTION)

    @property
    def aggregates(self) -> bool:
        """About an aggregate of the SELECT list (CS3)."""
        return self in (Feature.ENGAGGREGATEFUNCTION, Feature.ENGAGGREGATEFIELD)

    @property
    def command_sets(self) -> tuple[int, ...]:
        """The ``cs_num`` values whose prompts can express this feature (0: base models, CS1 prompts)."""
        return (2, 3) if self.sorts else (3,) if self.aggregates else (0, 1, 2, 3)

    @property
    def answer_after_space(self) -> bool:
        """Whether the answer token carries a leading space (not so the field right after ``SUM(``)."""
        return self is not Feature.ENGAGGREGATEFIELD


FEATURES: tuple[Feature, ...] = tuple(Feature)
NAME_FEATURES: tuple[Feature, ...] = FEATURES[:4]  # the four of every command set

DESCRIPTIONS = {
    Feature.ENGTABLENAME: "the table's word in the English Instruction",
    Feature.ENGFIELDNAME: "a selected field's word in the English Instruction",
    Feature.DEFTABLENAME: "the table's name in the CREATE TABLE Context",
    Feature.DEFFIELDNAME: "a selected field's name in the CREATE TABLE Context",
    Feature.ENGORDERBYFIELD: "the word of the field the Instruction sorts by",
    Feature.ENGORDERBYDIRECTION: "the sort direction word in the Instruction (ascending / descending)",
    Feature.ENGAGGREGATEFUNCTION: "the aggregate's word in the Instruction (total / average / ...)",
    Feature.ENGAGGREGATEFIELD: "the word of the aggregated field in the Instruction",
}


def parse_feature(name: str | Feature) -> Feature:
    """``"DefFieldName"``, ``"DEFFIELDNAME"`` or a Feature; a clear error for anything else."""
    if isinstance(name, Feature):
        return name
    key = str(name).replace("_", "").upper()
    if key not in Feature.__members__:
        raise ValueError(f"Unknown feature {name!r}: choose one of {[f.value for f in FEATURES]}")
    return Feature[key]


def check_command_set(feature: Feature | str, cs_num) -> None:
    """A clear error when command set ``cs_num`` cannot express ``feature`` (ORDER BY on CS1, say)."""
    feature = parse_feature(feature)
    if cs_num not in feature.command_sets:
        sets = ", ".join(f"CS{c}" for c in feature.command_sets if c)
        raise ValueError(f"{feature.value} needs a command set with {_needs(feature)}: cs_num={cs_num!r} cannot "
                         f"express it; use {sets} (cs_num in {[c for c in feature.command_sets if c]})")


def _needs(feature: Feature) -> str:
    return "ORDER BY" if feature.sorts else "aggregates" if feature.aggregates else "SELECT ... FROM"
