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
# DEFTABLENAME: which heads copy the table name from the *Context*?

TinySQL prompts give a `CREATE TABLE` statement as Context, and the SQL answer must spell the table exactly
as the Context defines it. This notebook renames **the table in the CREATE TABLE statement** and leaves the
English Instruction alone, so the correct word after `FROM` becomes the new name.

If the model copied the table from the Instruction, nothing would change; heads that matter here read the
name from the schema. Expect the action at the renamed token in the Context and at the last position (`FROM`),
which predicts the table. With `use_synonyms_table` the Instruction calls the table something else, so the
schema is the only place the SQL name appears.

A cell's value is `(patched − corrupt) / (clean − corrupt)` of `logit[clean table] − logit[new name]` at the
answer position: the share of the clean answer that one head at one position restores on its own.
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
## What can be varied

By default: the embedded CS1 model, on CPU, offline. `use_novel_names` renames the table to a word that is no
table in the vocabulary ("apple", "orange"); `use_synonyms_table` / `use_synonyms_field` change only how the
Instruction words things, never the schema. Table synonyms are on unless set to `False` (`None` = the
default of `helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`): a model may otherwise copy the name from the Instruction.

**Novel names, measured** (`helpers/models/embedded/README.md`, 200 pairs): all six embedded models carry the
novel-names stage and write the novel table, so the heatmap then shows which heads *copy a name never seen as a
name*: llama-cs1 (the default; flip 1.00), llama-cs2 (0.935; 0.40 with table synonyms off), llama-cs3 (1.00),
gpt_neo-cs1 (0.97), gpt_neo-cs2 (0.98) and gpt_neo-cs3 (0.91). `novel_words = "held_out"` takes words no training
text holds, the stricter case: 0.66 / 0.20 / 0.41 / 0.30 / 0.26 / 0.28; where a corruption does not flip, the
heatmap shows what restores the model's confidence, not what carries the name, and the notebook warns.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips all of them. With `vocabulary = "upstream"` the same models answer
0.58–0.68 of the clean prompts (upstream's words are not names they were trained on) and flip 0.68–1.00. Upstream's
words are meant for the released hub checkpoints, which were trained on upstream's data and cannot be run offline
here. Examples a model answers wrongly on the clean prompt stay out of the averages unless `keep_incorrect` is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/DEFTABLENAME.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 1  # 0: base model; 1..3: fine-tuned on command set 1..3
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "DEFTABLENAME"  # fixed for this notebook: each feature has its own
use_novel_names = False  # corrupt with a word that is never a table or field name
novel_words = "trained"  # with use_novel_names: "trained" (upstream's words) or "held_out" (in no training text)
use_synonyms_table = None  # None: the feature's default (helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS)
use_synonyms_field = None  # None: the feature's default
vocabulary = None  # "suite" | "upstream" (upstream TinySQL's patching words); None: "suite" for embedded, "upstream" for hub
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
## Running it

The first helper call stops at once with the valid choices if the model, command set or feature is unknown;
otherwise it loads the model, builds the pairs, scores the clean prediction and runs the head sweep. The
renamed Context token of one example is shown between `[[ ]]`, with what the model writes on each prompt.
Examples predicted wrongly on the clean prompt are excluded from the averages (see `keep_incorrect`).
"""

# %%
from helpers.experiments import experiment, plotting, results
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "DEFTABLENAME"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Heatmap of the mean

Layer-head rows, token columns (`{token}_{index}` of the longest example, every prompt aligned on its final
token; `*`: the examples differ in that column). Blue is towards the clean table name, red towards the new one. Nothing left of the renamed token
can matter (zero). The columns to read: the name in `CREATE TABLE`, the tokens after it that could carry it
forward, and the final `FROM` column where the table is predicted.
"""

# %%
plotting.setup_renderer()
plotting.mean_heatmap(exp).show()

# %% [markdown]
"""
## Variation across examples

First the standard deviation per cell, then each example separately on its own tokens: a head that copies
the table in every example stands out in the mean and stays pale in the deviation.
"""

# %%
plotting.spread_heatmap(exp).show()
plotting.example_heatmaps(exp).show()

# %% [markdown]
"""
## Ranked heads

Heads and positions ordered by the size of their mean score; `std` and `n` tell how steady each one is.

Below it, the role-aligned view: per head, the score at every example's own renamed `CREATE TABLE` token
and at its own answer position, averaged; the schema token moves between columns from prompt to prompt.
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

On the embedded models (command set 1, seed 0, 5 examples) two routes show. Llama: L0H2 and L0H0 at the
renamed CREATE TABLE token restore 0.83 at k = 2 (necessity 0.82; 5 random cells 0.00): at the name itself,
both attend to it; from `FROM`, L1H3 then attends only to that schema token (all of its attention, clean and
corrupt): a copying head. GPT-Neo instead reads the name at `FROM` in layer 0: L0H7, L0H6, L0H0 each put
0.91-0.99 of their attention from `FROM` on the renamed token; three of them reach 0.73, four 80 %, and necessity
lags (0.57 at k = 3, 0.75 at k = 5): more heads share the copying there.

Path patching: in Llama, L0H2 and L0H0 at the renamed CREATE TABLE token feed the *values* of the layer-1 heads
(L1H0 +0.14, L1H2 +0.12, L1H3 +0.12), which write the name into the logits from `FROM` (+0.17 to +0.23): the
schema's spelling is carried in values, as a copy. In GPT-Neo, L1H2 writes the name from `FROM` (+0.11), the layer-0
heads' own direct paths are small (L0H7 +0.05) and their edges into the layer-1 receivers at most +0.02 (L0H7 into
L1H2's value): the rest travels through the MLPs.

With novel names (the default sweep's `use_novel_names` cell: llama-cs1, batch 4, seed 0) the same route carries a
name the model never saw as a name: L0H2 and L0H0 at the renamed token restore 0.87 at k = 2 (necessity 0.83; 5
random cells 0.03), feed the *values* of the layer-1 heads (+0.12 to +0.18), and those write it from `FROM` (+0.20
to +0.26). The copy does not depend on knowing the name.

`circuit = False` turns this section off.
"""

# %%
from helpers.circuits.figures import show_circuit_section
show_circuit_section(exp)

# %% [markdown]
"""
## Writing results

The JSON keeps the original notebook's layout (its `load_and_plot_results` still opens it) and adds the
per-example scores, prompts, positions, seed and versions; the heatmaps are saved as HTML (and PNG where
kaleido has Chrome). Reload with `result_json.load_results` and redraw with `plotting.plot_saved`.
"""

# %%
results.save_experiment(exp, output_dir)
