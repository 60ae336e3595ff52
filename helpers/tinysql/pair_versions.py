"""The pair generator's versions: which settings' pairs each change altered, so that a sweep does not count a cell
finished with the pairs of an older generator (helpers.experiments.sweep_cells: it runs again, in a folder of its
own, beside the older result).

Version 1: everything before 2026-12-06. Version 2 (commit 46d2b28): ENGTABLENAME's distractor table holds the
fields the request sorts by (CS2 and CS3 pairs); with upstream's words and field synonyms an Eng* field feature's
corrupt word is never another field's own name; which novel words, without novel names, no longer seeds the pairs.
"""
from __future__ import annotations

PAIRS_VERSION = 2

_FIELD_FEATURES = ("ENGFIELDNAME", "ENGORDERBYFIELD", "ENGAGGREGATEFIELD")  # (their default: field synonyms on)


def pairs_changed_since(version, settings: dict) -> bool:
    """Would pairs with these ``settings`` (an experiment's, by name: feature_name, cs_num, model_num, vocabulary,
    use_novel_names, use_synonyms_field, novel_words; a flag left None is the feature's default) differ from those
    the generator of ``version`` (None: 1) drew? Unreadable settings: False (their validation fails the run)."""
    from helpers.tinysql.word_sets import resolve_vocabulary

    try:
        if int(version or 1) >= PAIRS_VERSION:
            return False
        feature, cs_num = str(settings.get("feature_name")), int(settings.get("cs_num"))
        word_set = resolve_vocabulary(settings.get("vocabulary"), settings.get("model_num"))
    except (TypeError, ValueError):
        return False
    novel = settings.get("use_novel_names") is True
    if settings.get("novel_words", "trained") == "held_out" and not novel:
        return True
    if feature == "ENGTABLENAME":
        return word_set == "suite" and cs_num >= 2
    if feature in _FIELD_FEATURES:
        return word_set == "upstream" and settings.get("use_synonyms_field") in (None, True) and not novel
    return False
