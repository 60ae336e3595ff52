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
# ENGORDERBYFIELD: which heads carry the field the *Instruction* sorts by?

A command-set-2 or -3 model writes `SELECT <fields> FROM <table> ORDER BY <field> <ASC|DESC>`. Here the
**word of the field the Instruction sorts by** ("sorted by *cost* descending") is swapped for another column of the
same table that the request does not mention. The schema is untouched, so both words name real columns, and the
correct token after `ORDER BY` changes from one to the other.

The question is which heads bring the sort field to the `ORDER BY` clause: heads at the Instruction's sort word,
heads at the column names inside `CREATE TABLE` (where the spelling lives), and heads at the last position (`BY`),
which predicts the field. Unlike ENGFIELDNAME, the answer is written late in the SQL, after the SELECT list and
the table: the name has to survive a whole clause of the model's own output.

Each cell is the normalised logit difference `(patched − corrupt) / (clean − corrupt)`, with the logit difference
`logit[clean field] − logit[swapped field]` read where the model predicts the field after `ORDER BY`: 1 = that single head at that single position, patched from the clean run, gives back the clean
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

Offline on CPU with the embedded command-set-2 model by default. Needs a command set with ORDER BY: `cs_num` 2 or 3 (CS1 is refused with a message naming them). The prompts
always sort, by a column the request does not select. `use_synonyms_field` says the fields by synonyms in the
Instruction (on by default), so "cost" must be translated to `price` through the schema; `use_novel_names` swaps in
a word that is no column ("hammer"). `vocabulary` picks the
word set: "suite" (this project's words, what the embedded models know) or "upstream" (upstream TinySQL's
patching words and template, what the released hub checkpoints were trained on); `None` takes the model's own.

**What `use_novel_names` means here**: the Instruction then asks for a sort column the Context does not hold. The
embedded models, with or without the novel-names fine-tune, mostly keep writing the schema's column (flip 0.00–0.05
on llama-cs2 and gpt_neo-cs2, 200 pairs; with the novel-names stage llama-cs3 0.10, gpt_neo-cs3 0.24): they read the
answer from the schema. The logit difference then measures how much more the model prefers the clean column than the
novel word, and the heatmap shows which heads carry the Instruction's word into that preference, not which heads
carry a name into the SQL. The Def* notebooks are where novel names test copying.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips all of them. With `vocabulary = "upstream"` the same models answer
0.38–0.54 of the clean prompts (upstream's words are not names they were trained on) and flip 0.04–0.54: upstream's
corruption swaps in a field the Context does not hold. Upstream's words are meant for the released hub checkpoints,
which were trained on upstream's data and cannot be run offline here. Examples a model answers wrongly on the clean
prompt stay out of the averages unless `keep_incorrect` is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/ENGORDERBYFIELD.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 2  # 2 or 3: command sets with ORDER BY
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "ENGORDERBYFIELD"  # fixed for this notebook: each feature has its own
use_novel_names = False  # corrupt with a word that is never a table or field name
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
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "ENGORDERBYFIELD"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Average effect per head and position

Rows `L{layer}_H{head}`; columns `{token}_{index}` of the longest example. Shorter prompts are right-aligned, so
every example's last token (where the answer is predicted) is the last column; `*` marks columns where the
examples hold other tokens. Blue: the patch brings back the clean answer; red: it favours the corrupt one.
Read three places: the Instruction's sort word, the column names in the schema, and the last column
(`BY`), where the field is predicted. Columns before the swapped word are exactly zero.
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
mean at two positions found in each example itself: the swapped sort word and the final position (`BY`).
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

On the embedded models (the default sweep: batch 4, seed 0) Llama needs one cell on CS2 and two on CS3 for 80 %
sufficiency and necessity (5 random cells: 0.21 on CS2, 0.00 on CS3). On CS3 (eight heads a layer), L0H0 and L0H1
*at the swapped sort word* send it through the *values* of L1H5 and L1H4 (+0.17 to +0.20 each; each pair shares a
key/value head), which write the field into the logits at `BY` (+0.30, +0.25). On CS2 the same chain starts one step later: L0H1 at the `###` that closes the Instruction reads
the sort word, feeds L1H2's value (+0.70), and L1H2 writes the field (+0.93; L1H3 pushes against it, −0.10).
ENGAGGREGATEFIELD shows the same layer-0 → layer-1 value chain for a name in another SQL slot.
GPT-Neo needs 2–3 cells at `BY` (layer-0 L0H2 and L0H5 on CS2, L0H4 on CS3, then layer-1 heads). Its head-to-head
edges stay at or below 0.10 (L0H4 into the *queries* of L1H1 and L1H6 on CS3; 0.05 on CS2, L0H2 into L1H2's
query) and its layer-1 heads' direct paths at
0.06–0.13, so much of the effect passes through the MLPs, as in the other features.

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
