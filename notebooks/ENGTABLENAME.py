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
# ENGTABLENAME: which heads carry the table the *Instruction* asks for?

A TinySQL model reads `### Instruction: <English request> ### Context: CREATE TABLE ... ### Response: ` and
writes `SELECT <fields> FROM <table>`. This notebook corrupts **the table's word in the English Instruction**
and asks which attention heads, at which token positions, carry that word into the table name the model writes
after `FROM`.

The clean prompt's Context holds two tables: the one the Instruction asks for and a distractor. The corrupt
prompt swaps the Instruction's table word for the distractor's, so the Context is unchanged and the correct
answer flips to the distractor table. A model that decides *which* table from the Instruction and copies its
*spelling* from the Context must route information from the Instruction word through the Context mention to
the answer position: those are the heads this notebook looks for. (With `use_novel_names` the corrupt word is
a word that never names a table, e.g. "apple"; with `use_synonyms_table` the Instruction names the table by a
synonym, so the clean word itself differs from the SQL name.)

The score of a head at a position is `(patched − corrupt) / (clean − corrupt)` of the logit difference
`logit[clean table] − logit[corrupt table]` at the position that predicts the table name: 1 means patching
that one head's clean output at that one position restores the clean answer fully, 0 means no effect.
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
## Parameters

The defaults run offline on CPU with the embedded model for command set 1. `use_synonyms_table` matters most
here: with it, the clean Instruction never spells the SQL table name, so the model has to map a synonym to a
Context table. It is on by default (`None` takes the feature's default from
`helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`). `use_novel_names` corrupts with a word that was never a table name.

**What `use_novel_names` means here**: the Instruction then asks for a table the Context does not hold. The
embedded models, with or without the novel-names fine-tune, keep writing the schema's table (flip 0.00–0.05 over the
six models, 200 pairs): they read the answer from the schema and almost never write a word it lacks. The logit
difference then measures how much more the model prefers the clean table than the novel word, and the heatmap shows
which heads carry the Instruction's word into that preference, not which heads carry a name into the SQL. The Def*
notebooks are where novel names test copying.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips all of them. With `vocabulary = "upstream"` the same models answer
0.66–0.76 of the clean prompts (upstream's words are not names they were trained on) and flip 0.00–0.34: upstream's
corruption swaps in another of its tables, which the one-table Context does not hold. Upstream's words are meant for
the released hub checkpoints, which were trained on upstream's data and cannot be run offline here. Examples a model
answers wrongly on the clean prompt stay out of the averages unless `keep_incorrect` is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/ENGTABLENAME.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 1  # 0: base model; 1..3: fine-tuned on command set 1..3
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "ENGTABLENAME"  # fixed for this notebook: each feature has its own
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
## Run the experiment

One helper call checks the parameters (an unknown feature, model or command set stops here with the list of
valid choices), loads the model, builds `batch_size` clean/corrupt pairs, reads the model's clean prediction
and patches every head at every position. Below, one example: the corrupted Instruction word is marked
`[[ ]]`. Examples the model gets wrong on the clean prompt are left out of the averages (`keep_incorrect`).
"""

# %%
from helpers.experiments import experiment, plotting, results
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "ENGTABLENAME"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Mean over examples

Rows are heads `L{layer}_H{head}`, columns the longest example's tokens `{token}_{index}`. Examples differ in
length, so they are lined up at their last token, the one that predicts the table; a `*` marks a column where
they hold different tokens. Blue cells restore the clean table, red cells push towards the distractor. Everything left of the
marked Instruction word is exactly 0: nothing differs there yet. Look for the table word itself (heads that
read it), the table names inside `CREATE TABLE` (heads that match the request to the Context), and the last
column, `FROM`, which predicts the answer (heads that move the chosen name into the output).
"""

# %%
plotting.setup_renderer()
plotting.mean_heatmap(exp).show()

# %% [markdown]
"""
## Spread

A mean can hide disagreement: the standard deviation over examples, then each example on its own tokens.
A head that matters in every example is dark in the mean and pale here.
"""

# %%
plotting.spread_heatmap(exp).show()
plotting.example_heatmaps(exp).show()

# %% [markdown]
"""
## Top heads

The cells with the largest mean |score|, with their spread and the number of examples behind them.

Second table: the same heads read at two roles found in each example itself: its own Instruction table
word (which sits at a different column in each prompt), and its last position, the one after `FROM`.
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

On the embedded models (command set 1, seed 0, 5 examples) the circuit is small and sits at the final `FROM`
column. Llama: the top two cells, L0H0 and L0H1 at `FROM`, restore all of the gap on their own (sufficiency 1.00
at k = 2; L0H0 alone 0.47) and removing them destroys all of it (necessity 1.01), while 5 random cells restore
0.02. Both heads attend from `FROM` straight to the Instruction's table word (L0H0: all of its attention,
clean and corrupt alike): they move the English word to the answer position, and layer 1 (L1H3 reads the
CREATE TABLE) turns it into the schema's name. GPT-Neo is the same picture with its own heads: L0H3 (all of
its attention on the Instruction's word) and L0H1 at `FROM`, 0.87 at k = 2 and 0.99 at k = 5.

Path patching: in Llama the layer-1 heads write the table into the logits directly (L1H3 +0.31, L1H1
+0.20, L1H0 +0.17), and L0H0 and L0H1 at `FROM` feed the *queries* of L1H3 (+0.10, +0.07) and L1H1 (+0.08, +0.07).
Those edges are far smaller than L0H0's own 0.47: most of what the layer-0 heads carry reaches the answer through
the MLPs, which path patching between heads does not count. In GPT-Neo every head-to-head
edge stays at or below 0.02 (L0H3 into L1H2's value) and the direct logit edges at or below 0.11, although L0H3
alone restores 0.65: most of it must travel through the MLPs, which these edges do not count.

`circuit = False` turns this section off.
"""

# %%
from helpers.circuits.figures import show_circuit_section
show_circuit_section(exp)

# %% [markdown]
"""
## Save

JSON (readable by the original notebook's `load_and_plot_results`, plus per-example scores, prompts, token
indices and versions) and the heatmaps as HTML (PNG too when kaleido finds Chrome); re-draw a file later with
`plotting.plot_saved(path)`.
"""

# %%
results.save_experiment(exp, output_dir)
