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
# ENGFIELDNAME: which heads carry the field the *Instruction* asks for?

The model reads an English request and a `CREATE TABLE` schema and writes `SELECT <fields> FROM <table>`. Here
the **first selected field's word in the English Instruction** is swapped for another column of the same
table that the request did not mention. The schema is untouched, so both words name real columns and the
correct first field after `SELECT` changes from one to the other.

The question is which heads, at which positions, bring the requested field into the answer: heads at the
Instruction word that read it, heads at the field names inside `CREATE TABLE` that match the request to the
schema, and heads at the final position (`SELECT`) that put the chosen column into the output.

Each cell is the normalised logit difference `(patched − corrupt) / (clean − corrupt)`, with the logit
difference `logit[clean field] − logit[corrupt field]` read where the model predicts the first field: 1 = that
single head at that single position, patched from the clean run, gives back the clean field; 0 = no effect.
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

Offline on CPU with the embedded command-set-1 model by default. `use_synonyms_field` says the fields by
synonyms in the Instruction (the model must then translate "cost" to `price` through the schema);
`use_novel_names` swaps in a word that is no column at all, such as "hammer". Left as `None`, the field
synonyms are on: this feature's default in `helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`.

**What `use_novel_names` means here**: the Instruction then asks for a column the Context does not hold. The
embedded models, with or without the novel-names fine-tune, keep writing the schema's column (flip 0.00–0.05 over
five models and 0.17–0.205 on llama-cs2, 200 pairs): they read the answer from the schema and seldom write a word
it lacks. The logit difference then measures how much more the model prefers the clean column than the novel word,
and the heatmap shows which heads carry the Instruction's word into that preference, not which heads carry a name
into the SQL. The Def* notebooks are where novel names test copying.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips all of them. With `vocabulary = "upstream"` the same models answer
0.56–0.72 of the clean prompts (upstream's words are not names they were trained on) and flip 0.04–0.20: upstream's
corruption swaps in a field the Context does not hold, and these models never write a column the schema lacks.
Upstream's words are meant for the released hub checkpoints, which were trained on upstream's data and cannot be run
offline here. Examples a model answers wrongly on the clean prompt stay out of the averages unless `keep_incorrect`
is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/ENGFIELDNAME.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 1  # 0: base model; 1..3: fine-tuned on command set 1..3
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "ENGFIELDNAME"  # fixed for this notebook: each feature has its own
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
## One call does the work

`run_experiment` validates the settings first (a typo in the model, command set or feature ends the notebook
here, naming what is valid), then loads the model, draws the pairs, records what the model predicts on each
clean prompt and patches each head at each position. The example below marks the swapped field word `[[ ]]`;
clean-wrong examples do not enter the averages unless `keep_incorrect` is set.
"""

# %%
from helpers.experiments import experiment, plotting, results
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "ENGFIELDNAME"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Average effect per head and position

Rows `L{layer}_H{head}`; columns `{token}_{index}` of the longest example. Shorter prompts are right-aligned, so
every example's last token (where the field is predicted) is the last column; `*` marks columns where the
examples hold other tokens. Blue: the patch brings back the clean field; red:
it favours the swapped-in one. Columns before the swapped word are exactly zero. Read three places: the
Instruction field word, the column names in the schema, and the last column (`SELECT`), where the first
field is predicted.
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

Largest mean |score| first, with the spread and how many examples contribute to each cell.

Then per head, the mean at two positions found in each example itself: the swapped field word and the
final position that predicts the field (the swapped word lands in different columns above).
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

On the embedded models (command set 1, seed 0, 5 examples) the field travels through the `SELECT` column,
where the first field is predicted. Llama: one cell, L0H0 at `SELECT`, is sufficient (1.00) and necessary
(1.00) on its own, against 0.02 for 5 random cells; it puts 0.99 of its attention on the Instruction's field
word. GPT-Neo needs two, L0H0 and L0H5 at `SELECT`, both attending only to that word (sufficiency 1.00 at
k = 2). The layer-1 heads that follow (Llama L1H3, L1H1; GPT-Neo L1H2) attend to the CREATE TABLE text, where
the schema's spelling of the field lives.

Path patching shows the cleanest chain of the four features. In Llama, L0H0 at `SELECT` sets the *query* of
L1H3 (+0.66), L1H1 (+0.24) and L1H0 (+0.20), and its direct path to the logits is nothing (-0.03). L1H3 then writes the field
into the logits (+0.67). The layer-0 head decides *which* field by shaping where layer 1 looks, and layer 1 copies
it. Edge attribution ranks this edge among the top two too but puts it at +0.28, less than half of the exact +0.66: a
query edge acts through the softmax, where the linear estimate falls short (correlation with the exact edges 0.91
here, against 0.97-1.00 for most of the other cells). In GPT-Neo the head-to-head edges are at most 0.04 (L0H0 into L1H4's query): as for ENGTABLENAME, most of the effect must travel through
the MLPs, which these edges do not count.

`circuit = False` turns this section off.
"""

# %%
from helpers.circuits.figures import show_circuit_section
show_circuit_section(exp)

# %% [markdown]
"""
## Files

Writes the result JSON (the original notebook's keys, plus every example's scores, prompts and token indices,
the seed and package versions) and both heatmaps as offline HTML, PNG when kaleido can run Chrome.
`plotting.plot_saved(path)` draws a saved file again.
"""

# %%
results.save_experiment(exp, output_dir)
