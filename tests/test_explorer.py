"""The explorer: widgets are built, a Run click (headless) runs an experiment and shows it; a bad choice is
reported in the widget and the explorer stays usable; the model is loaded once for several runs."""
from __future__ import annotations

import ipywidgets as W

from helpers.experiments.explorer import Explorer
from test_notebooks import model_settings


def _descriptions(widget) -> set[str]:
    out = {getattr(widget, "description", None)}
    for child in getattr(widget, "children", ()):
        out |= _descriptions(child)
    return out


def test_widgets_and_headless_runs(tmp_path):
    ex = Explorer(output_dir=tmp_path, save=True, **model_settings())
    assert isinstance(ex.widget, W.VBox)
    assert {"model", "command set", "feature", "use_novel_names", "use_synonyms_table", "use_synonyms_field",
            "batch size", "Run"} <= _descriptions(ex.widget)

    ex.run_button.click()  # the button's click handler, as a user's press
    assert ex.error is None, ex.error
    assert ex.result is not None and ex.result.feature.value == "ENGTABLENAME"
    assert "ENGTABLENAME" in ex.status.value
    assert list(tmp_path.glob("activation_patching_*ENGTABLENAME*.json"))

    ex.feature.value = "DEFFIELDNAME"
    ex.run_button.click()
    assert ex.error is None and ex.result.feature.value == "DEFFIELDNAME"
    assert len(ex._models) == 1  # same model: loaded once

    ex.cs.value = 0  # the embedded models have no base (cs0) checkpoint
    ex.run_button.click()
    assert ex.result is None and isinstance(ex.error, ValueError)
    assert "ValueError" in ex.status.value and not ex.run_button.disabled


def test_command_set_follows_the_feature_and_the_word_set_is_a_choice():
    ex = Explorer(**model_settings())
    assert "word set" in _descriptions(ex.widget)
    labels = dict((v, label) for label, v in ex.feature.options)
    assert labels["ENGAGGREGATEFIELD"].endswith("(CS3)") and labels["ENGORDERBYFIELD"].endswith("(CS2-3)")
    assert labels["ENGTABLENAME"].endswith("(every CS)")
    ex.cs.value = 1
    ex.feature.value = "ENGORDERBYDIRECTION"
    assert ex.cs.value == 2  # the first command set that has ORDER BY
    ex.feature.value = "ENGAGGREGATEFUNCTION"
    assert ex.cs.value == 3
    ex.feature.value = "ENGTABLENAME"
    assert ex.cs.value == 1  # the user's own command set again (it was left at 3)
    ex.feature.value = "ENGORDERBYFIELD"
    assert ex.cs.value == 2
    ex.cs.value = 3  # chosen by the user: theirs now
    ex.feature.value = "ENGTABLENAME"
    assert ex.cs.value == 3  # every command set can express it: left alone
    ex.vocabulary.value = "upstream"
    assert ex.settings()["vocabulary"] == "upstream" and ex.settings()["cs_num"] == 3
