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
# DEFFIELDNAME: which heads copy a column name from the *Context*?

The SQL a TinySQL model writes has to use the column names of the `CREATE TABLE` Context. Here **the first
selected field's name in the CREATE TABLE** is renamed; the English request still asks for the same column,
so the correct first field after `SELECT` becomes the new name.

Heads that move this information must find, in the schema, the column the Instruction asked for and copy
its spelling to the answer: look at the renamed token inside the Context, and at the last position
(`SELECT`), where the field is predicted. `use_synonyms_field` makes the Instruction say a synonym, so the
exact name exists only in the schema.

Scores are normalised logit differences, `(patched − corrupt) / (clean − corrupt)` on
`logit[clean field] − logit[new name]` at the answer position: 1 = fully restored by that single patch.
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
## Knobs

Defaults: embedded model for command set 1, CPU, no network. `use_novel_names` renames the column to a word
that is never a column ("hammer", "wolf"); `use_synonyms_field` lets the Instruction name fields by synonyms,
and is on by default (`None`: `helpers.tinysql.pairs.DEFAULT_PAIR_OPTIONS`), so the schema is the one source of the name.

**Novel names, measured** (`helpers/models/embedded/README.md`, 200 pairs): all six embedded models carry the
novel-names stage and write the novel column, so the heatmap then shows which heads *copy a name never seen as a
name*: llama-cs1 (the default; flip 1.00), llama-cs2 (0.92), llama-cs3 (0.90), gpt_neo-cs1 (0.95), gpt_neo-cs2
(0.91) and gpt_neo-cs3 (0.99). `novel_words = "held_out"` takes words no training text holds, the stricter case:
0.79 / 0.235 / 0.44 / 0.40 / 0.39 / 0.86; where a corruption does not flip, the heatmap shows what restores the
model's confidence, not what carries the name, and the notebook warns.

**Word sets, measured** on the six embedded models (50 pairs each, this notebook's default flags,
`helpers.tinysql.pairs`): with the suite's words (their training vocabulary) every model answers every clean prompt
(clean accuracy 1.00) and the corruption flips 0.98–1.00 of them (llama-cs2 0.98). With `vocabulary = "upstream"`
the same models answer 0.46–0.70 of the clean prompts (upstream's words are not names they were trained on) and flip
0.76–0.92. Upstream's words are meant for the released hub checkpoints, which were trained on upstream's data and
cannot be run offline here. Examples a model answers wrongly on the clean prompt stay out of the averages unless
`keep_incorrect` is set.
"""

# %% tags=["parameters"]
# One setting a line: `papermill --help-notebook notebooks/DEFFIELDNAME.ipynb` lists them, `-p NAME VALUE` sets one, and
# a name that is not listed stops the run in its first cell below. The Hugging Face token is never a parameter:
# it comes from the HF_TOKEN environment variable or the Colab secret HF_TOKEN.
# model_num: "embedded" (the small offline models in helpers/models/embedded) or the original numbering on the
#   hub: 0=GPT-2, 1=TinyStories, 2=Qwen, 3=Llama, 4=Granite, 5=SmolLM.
model_num = "embedded"
cs_num = 1  # 0: base model; 1..3: fine-tuned on command set 1..3
semantic = True  # the synonym-trained checkpoints (hub models)
embedded_family = "llama"  # embedded models: "llama" or "gpt_neo"
feature_name = "DEFFIELDNAME"  # fixed for this notebook: each feature has its own
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
## Run

Settings are checked before anything loads: an unknown model, command set or feature fails in this cell with
the valid choices listed. Then the model is loaded, pairs built, clean predictions read and every head patched
at every position. Shown: one example with its renamed schema token in `[[ ]]` and the model's answers.
Examples the model already gets wrong on the clean prompt are dropped from the means unless `keep_incorrect`.
"""

# %%
from helpers.experiments import experiment, plotting, results
exp = experiment.run_experiment(**experiment.notebook_parameters(globals(), "DEFFIELDNAME"), devices=devices)
print(exp.summary())
exp.show_example()

# %% [markdown]
"""
## Mean score per head and token

Rows are `L{layer}_H{head}`, columns `{token}_{index}` of the longest example; the others are shifted to end in the
same last column, the prediction position (`*`: not the same token in all examples). Blue restores the clean column, red pushes to the renamed one, and every column before the renamed
token is zero by construction. Read the renamed schema token, what follows it, and the final `SELECT` column.
"""

# %%
plotting.setup_renderer()
plotting.mean_heatmap(exp).show()

# %% [markdown]
"""
## Consistency

The per-cell standard deviation across examples, then small multiples: one heatmap per example on its own
tokens, sharing one colour scale.
"""

# %%
plotting.spread_heatmap(exp).show()
plotting.example_heatmaps(exp).show()

# %% [markdown]
"""
## Table of the largest effects

Sorted by |mean|; each row gives the head, the position and its token, the mean, the standard deviation and
the number of examples.

After it, a role table: for each head, its mean score on each example's renamed schema column and on each
example's prediction position, whatever index those have in that prompt.
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

On the embedded models (command set 1, seed 0, 5 examples) this is the least concentrated feature. Llama:
three cells reach 0.82 (L0H2 at `Response`, L1H3 and L1H2 at `SELECT`), necessity 0.73 at k = 3 and 0.94 at
k = 5, 5 random cells 0.09. GPT-Neo needs 7 cells for 80 % sufficiency and 9 for necessity. A finding that surprised us: the layer-1
heads' *attention* moves with the corruption. GPT-Neo's L1H7 puts 0.50 of its attention from `SELECT` on the
field name in the clean run but moves to `)` and `SELECT` (0.56 and 0.36) in the corrupt run, and Llama's L1H3
goes from the CREATE TABLE text (0.83) to the Response (0.86). The renamed field no longer matches the
Instruction's word, so the head stops selecting it: the name reaches the answer through *where* the head
looks (its query-key match), not only through what it copies.

Path patching agrees with the moving attention. In Llama, L0H1 and L0H0 at the field's type token in the CREATE
TABLE (`TEXT`, just after the renamed field) feed L1H3's *key* with negative scores (-0.11, -0.08): they change
what L1H3 matches, not what it copies. L0H2 at `Response` feeds L1H1's value (+0.14). In GPT-Neo the head-to-head
edges are at most 0.02.

With novel names (the default sweep's `use_novel_names` cell: llama-cs1, batch 4, seed 0) the field is *more*
concentrated than with a known name: L0H2 and L0H0 at `Response` restore 0.85 at k = 2 (necessity 0.94), and feed
the *values* of the layer-1 heads at `SELECT` (L1H0 +0.16, L1H2 +0.12, L1H3 +0.10), which write the field (+0.18 to
+0.31). At the renamed column, L0H2 attends to the novel word itself (0.98 of its attention, against 0.17 for the
name it replaces): the unknown name stands out, and is copied.

`circuit = False` turns this section off.
"""

# %%
from helpers.circuits.figures import show_circuit_section
show_circuit_section(exp)

# %% [markdown]
"""
## Output files

JSON with the original notebook's keys and everything needed to redo the run (per-example scores, prompts,
token ids and positions, seed, model revision, versions), plus the heatmaps as HTML and, if kaleido can use
Chrome, PNG. Redraw any saved file with `plotting.plot_saved(path)`.
"""

# %%
results.save_experiment(exp, output_dir)
