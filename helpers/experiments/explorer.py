"""An ipywidgets front end to :func:`helpers.experiments.experiment.run_experiment`: pick a model, command set, feature,
flags and batch size, press Run, get the mean heatmap and the top heads.

    from helpers.experiments.explorer import Explorer
    ex = Explorer()
    ex.widget          # display it in a notebook

Loaded models are cached per (model, dtype, device), so changing only the feature or the flags reruns the
patching without reloading. ``ex.result`` / ``ex.error`` hold the last run's outcome (tests drive
``ex.run_button.click()`` headless and read them).
"""
from __future__ import annotations

import html
import traceback

import ipywidgets as W
from IPython.display import display

from helpers.experiments import experiment as E
from helpers.tinysql.pairs import FEATURES

MODEL_CHOICES = [("embedded (offline)", "embedded"), ("0: GPT-2", 0), ("1: TinyStories", 1), ("2: Qwen", 2),
                 ("3: Llama", 3), ("4: Granite", 4), ("5: SmolLM", 5)]
FLAG_CHOICES = [("feature default", None), ("on", True), ("off", False)]
VOCABULARY_CHOICES = [("the model's own", None), ("suite (embedded models' words)", "suite"),
                      ("upstream (TinySQL's patching words)", "upstream")]


def feature_choices() -> list[tuple[str, str]]:
    """Dropdown labels that say which command sets each feature needs."""
    def sets(f):
        cs = [c for c in f.command_sets if c]
        return "every CS" if cs == [1, 2, 3] else "CS" + "-".join(map(str, (cs[0], cs[-1]) if len(cs) > 1 else cs))
    return [(f"{f.value} ({sets(f)})", f.value) for f in FEATURES]


class Explorer:
    def __init__(self, output_dir=None, save: bool = False, **defaults):
        d = {**E.ExperimentSettings().to_dict(), **defaults}
        style = {"description_width": "130px"}
        self.model = W.Dropdown(options=MODEL_CHOICES, value=d["model_num"], description="model", style=style)
        self.family = W.Dropdown(options=["llama", "gpt_neo"], value=d["embedded_family"],
                                 description="embedded family", style=style)
        self.cs = W.Dropdown(options=[0, 1, 2, 3], value=d["cs_num"], description="command set", style=style)
        self.semantic = W.Checkbox(value=d["semantic"], description="semantic (synonym-trained)")
        self.feature = W.Dropdown(options=feature_choices(), value=E.P.parse_feature(d["feature_name"]).value,
                                  description="feature", style=style)
        self.feature.observe(self._command_set_for_feature, names="value")
        self._moved_from = None  # the command set the user had before a feature moved it (restored when it fits)
        self._moving = False  # (set while a feature moves the command set: not the user's choice)
        self.cs.observe(self._command_set_chosen, names="value")
        self.vocabulary = W.Dropdown(options=VOCABULARY_CHOICES, value=d["vocabulary"], description="word set",
                                     style=style)
        self.flags = {name: W.Dropdown(options=FLAG_CHOICES, value=d[name], description=name, style=style)
                      for name in E.FLAGS}
        self.batch_size = W.BoundedIntText(value=d["batch_size"], min=1, max=256, description="batch size",
                                           style=style)
        self.seed = W.IntText(value=d["seed"], description="seed", style=style)
        self.model_path = W.Text(value=d["model_path"] or "", description="model_path",
                                 placeholder="local folder or hub id (overrides the registry)", style=style)
        self.device = W.Dropdown(options=["cpu", "auto", "cuda"], value=d["device"], description="device", style=style)
        self.keep_incorrect = W.Checkbox(value=d["keep_incorrect"], description="keep clean-incorrect examples")
        self.circuit = W.Checkbox(value=d["circuit"], description="circuit: faithfulness, attention, path patching")
        self.run_button = W.Button(description="Run", button_style="primary", icon="play")
        self.status = W.HTML()
        self.out = W.Output()
        self.run_button.on_click(self.run)
        self.output_dir, self.save = output_dir, save
        self.result = self.error = None
        self._models: dict = {}
        self.dtype = d["dtype"]
        left = [self.model, self.family, self.cs, self.semantic, self.model_path, self.device]
        right = [self.feature, *self.flags.values(), self.vocabulary, self.batch_size, self.seed, self.keep_incorrect,
                 self.circuit]
        self.widget = W.VBox([W.HBox([W.VBox(left), W.VBox(right)]), W.HBox([self.run_button, self.status]),
                              self.out])

    def settings(self) -> dict:
        """The current widget values as ``run_experiment`` keyword arguments."""
        return dict(model_num=self.model.value, cs_num=self.cs.value, feature_name=self.feature.value,
                    **{k: w.value for k, w in self.flags.items()}, vocabulary=self.vocabulary.value,
                    batch_size=self.batch_size.value,
                    seed=self.seed.value, model_path=self.model_path.value.strip() or None, dtype=self.dtype,
                    device=self.device.value, semantic=self.semantic.value, embedded_family=self.family.value,
                    keep_incorrect=self.keep_incorrect.value, circuit=self.circuit.value)

    def _command_set_for_feature(self, change) -> None:
        """Picking an ORDER BY or aggregate feature moves the command set to the first one that has it; picking a
        feature the user's own command set can express again moves it back."""
        needed = E.P.parse_feature(change["new"]).command_sets
        if self._moved_from is not None and self._moved_from in needed:
            target, self._moved_from = self._moved_from, None
        elif self.cs.value not in needed:
            target = next(c for c in needed if c)
            self._moved_from = self._moved_from if self._moved_from is not None else self.cs.value
        else:
            return
        self._moving = True
        try:
            self.cs.value = target
        finally:
            self._moving = False

    def _command_set_chosen(self, change) -> None:
        """The user picked a command set: that is theirs now, nothing to move back to."""
        if not self._moving:
            self._moved_from = None

    def _loaded(self, settings: dict):
        """The cached model for these settings (validated first, so a bad choice fails before loading)."""
        from helpers.models.loading import load_model

        checked, _, spec = E.validate(E.ExperimentSettings(**settings))
        key = (spec.model_id, checked.dtype, checked.device)
        if key not in self._models:
            self._models.clear()  # keep one model in memory: the hub models are large
            self.status.value = f"loading {spec.display_name} ..."
            self._models[key] = load_model(spec, dtype=checked.dtype, device=checked.device)
        return self._models[key]

    def run(self, _button=None):
        """Run one experiment with the current settings and show its heatmap and top heads in ``out``."""
        from helpers.circuits.figures import show_circuit_section
        from helpers.experiments import plotting, results

        self.run_button.disabled = True
        self.result = self.error = None
        self.out.clear_output()
        with self.out:
            try:
                settings = self.settings()
                loaded = self._loaded(settings)
                self.status.value = "patching ..."
                self.result = E.run_experiment(**settings, loaded=loaded, progress=False)
                self.status.value = html.escape(self.result.summary()).replace("\n", "<br>")
                plotting.setup_renderer()
                display(plotting.mean_heatmap(self.result))
                display(self.result.top_heads(10))
                display(self.result.role_table(10).round(4))
                if self.result.circuit is not None:
                    show_circuit_section(self.result)
                if self.save:
                    display(results.save_experiment(self.result, self.output_dir))
            except Exception as err:  # shown in the widget; the explorer stays usable
                self.error = err
                self.status.value = f"<b style='color:#b00'>{html.escape(type(err).__name__)}</b>: " \
                                    f"{html.escape(str(err).splitlines()[0] if str(err) else '')}"
                print(traceback.format_exc())
            finally:
                self.run_button.disabled = False
        return self.result
