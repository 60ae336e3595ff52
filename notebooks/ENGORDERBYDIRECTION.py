# ---
# jupyter:
#   jupytext:
#     cell_markers: '"""'
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
"""
# ENGORDERBYDIRECTION: which heads turn *ascending* into `ASC`?

A command-set-2 or -3 model ends its SQL with `ORDER BY <field> ASC` or `DESC`. Here the **direction word of
the Instruction's sort phrase** is swapped: "sorted by cost *ascending*" becomes "sorted by cost *descending*",
"with the *smallest* cost first" becomes "with the *largest* cost first". Only phrases whose two directions differ
in exactly one word are used ("from lowest to highest" is not), so one token changes and the answer flips
between `ASC` and `DESC`.

This is not a name to copy but a word to translate: a head (or an MLP) has to map "descending"/"largest" to the
keyword `DESC`. Look at the direction word itself, at the field name just before it, and at the last position
(the sort field, after which the direction is predicted).

Each cell is the normalised logit difference `(patched − corrupt) / (clean − corrupt)`, with the logit difference
`logit[clean direction] − logit[other direction]` (`ASC` vs `DESC`) where the direction is predicted: 1 = that single head at that single position, patched from the clean run, gives back the clean
answer; 0 = no effect.
"""

# %%
import importlib.util
import subprocess
import sys
REPO_URL = "https://github.com/REPLACE-WITH-YOUR-ORG/tinysql-patching.git"  # set this: the suite's git repository
# Colab only, and only where the suite is not importable yet (a clone opened as the working folder needs nothing)
if "google.colab" in sys.modules and importlib.util.find_spec("helpers") is None:
    if "REPLACE-WITH-YOUR-ORG" in REPO_URL:
        raise RuntimeError("Set REPO_URL in this cell to the git URL of this suite's repository, then run it again.")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"git+{REPO_URL}"], check=True)

# %% [markdown]
"""
## Settings for this feature

Offline on CPU with the embedded command-set-2 model by default. Needs ORDER BY: `cs_num` 2 or 3. `use_novel_names` does not apply (the corrupted word is a direction, not a
name) and is refused. The synonym flags change only how the rest of the request names tables and fields. `vocabulary` picks the
word set: "suite" (this project's words, what the embedded models know) or "upstream" (upstream TinySQL's
patching words and template, what the released hub checkpoints were trained on); `None` takes the model's own.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips all of them. With `vocabulary = "upstream"` the same models answer
0.86–1.00 of the clean prompts (upstream's words are not names they were trained on) and flip 0.94–1.00. Upstream's
words are meant for the released hub checkpoints, which were trained on upstream's data and cannot be run offline
here. Examples a model answers wrongly on the clean prompt stay out of the averages unless `keep_incorrect` is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/ENGORDERBYDIRECTION.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 2  # 2 or 3: command sets with ORDER BY
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "ENGORDERBYDIRECTION"  # fixed for this notebook: each feature has its own
use_novel_names = False  # does not apply here (refused if True)
novel_words = "trained"  # with use_novel_names: "trained" (upstream's words) or "held_out" (in no training text)
use_synonyms_table = None  # None: the feature's default (helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS)
use_synonyms_field = None  # None: the feature's default
vocabulary = None  # "suite" | "upstream"; None: "suite" for the embedded models, "upstream" for the hub models
batch_size = 5  # examples averaged
seed = 0  # picks the examples
keep_incorrect = False  # keep examples the model gets wrong on the clean prompt
circuit = True  # the "From heads to a circuit" section (faithfulness, attention, path patching, EAP)
model_path = None  # a local folder or hub id that overrides the registry's model
dtype = "auto"  # "auto": float32 on CPU, bfloat16 on CUDA
device = "cpu"  # "auto": CUDA when available
output_dir = None  # None: outputs/notebooks/ in this checkout
devices = None  # e.g. "cuda:0,cuda:1": the head sweep's examples split across these (a process each)

# %% [markdown]
"""
## One call does the work

`run_experiment` validates the settings first (a typo, or a command set that cannot express this feature, ends the
notebook here, naming what is valid), then loads the model, draws the pairs, records what the model predicts on
each clean prompt and patches each head at each position. The example below marks the swapped word `[[ ]]`;
clean-wrong examples do not enter the averages unless `keep_incorrect` is set.
"""

# %%
from helpers.experiments import experiment, plotting, results
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "ENGORDERBYDIRECTION"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Average effect per head and position

Rows `L{layer}_H{head}`; columns `{token}_{index}` of the longest example. Shorter prompts are right-aligned, so
every example's last token (where the answer is predicted) is the last column; `*` marks columns where the
examples hold other tokens. Blue: the patch brings back the clean answer; red: it favours the corrupt one.
Read the direction word's column, the sort field's column in the Instruction just before it, and the last
column, where `ASC`/`DESC` is predicted. Columns before the swapped word are exactly zero.
"""

# %%
plotting.setup_renderer()
plotting.mean_heatmap(exp).show()

# %% [markdown]
"""
## How much do examples agree?

Standard deviation across examples, and below it every included example on its own tokens, so a column can
be read against the words each prompt really had there.
"""

# %%
plotting.spread_heatmap(exp).show()
plotting.example_heatmaps(exp).show()

# %% [markdown]
"""
## Strongest cells

Largest mean |score| first, with the spread and how many examples contribute to each cell. Then per head, the
mean at two positions found in each example itself: the swapped direction word and the final position (the sort field, before the direction).
Only those two positions enter this table: a cell elsewhere (the heatmap's strongest can sit at another
token, e.g. `Response`) is in the first table, not here.
"""

# %%
from IPython.display import display
display(exp.top_heads(10))
exp.role_table(10).round(4)  # (rounded for reading: no 1e-08 noise)

# %% [markdown]
"""
## From heads to a circuit

Are the strongest cells *the* mechanism, and how do they connect? The section below says how to read its figures
(faithfulness curves, attention of the top heads, path patching) as it draws them
(`helpers.circuits.figures.show_circuit_section`).

On the embedded models (the default sweep: batch 4, seed 0) one cell is sufficient and necessary (k = 1) in both
families and command sets, Llama CS3 aside (k = 2), against 0.00–0.10 for 5 random cells. Llama CS2: L1H3 *at the
sort field*, the position that predicts `ASC`/`DESC`, reads the direction word through its value from the layer-0
heads sitting on it (L0H2 +0.02, L0H1 +0.01). Its direct path to the logits is +0.06. The edges are small for an
effect that is complete, so most of the translation from "descending" to `DESC` runs through the MLPs. Llama CS3
(eight heads a layer): L1H7 at the sort field (+0.14 to the logits; 0.72 sufficiency and 0.84 necessity alone), with
L0H2 at the Instruction's direction word, which feeds its value (+0.03). GPT-Neo: L0H0 at the SQL's `ORDER` restores
the answer on its own, and layer-1 heads at the sort field write it (L1H6 +0.17 on CS2, L1H0 +0.13 on CS3).

`circuit = False` turns this section off.
"""

# %%
from helpers.circuits.figures import show_circuit_section
show_circuit_section(exp)

# %% [markdown]
"""
## Files

Writes the result JSON (the original notebook's keys, plus every example's scores, prompts and token indices,
the seed, word set and package versions) and both heatmaps as offline HTML, PNG when kaleido can run Chrome.
`plotting.plot_saved(path)` draws a saved file again.
"""

# %%
results.save_experiment(exp, output_dir)
