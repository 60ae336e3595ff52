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
# TinySQL activation patching: interactive explorer

Choose a model, a command set, one of the eight features (the table or a field name, corrupted in the English
Instruction or in the `CREATE TABLE` Context; on command sets 2-3 the sort field or direction; on command set 3
the aggregate's function or field: the dropdown says which command sets each needs, and picking one moves the
command set there), the prompt flags, the word set (this suite's or upstream TinySQL's) and a batch size, then
press **Run**: the explorer builds clean/corrupt pairs, patches every attention head at every position and shows
the mean normalised score (rows `L{layer}_H{head}`, columns `{token}_{index}`; blue restores the clean answer,
1 = fully), the heads with the largest effect and the role table (each top head's score at two positions found
in each example: the swapped word and the last token). With **circuit** ticked, the circuit section follows, with its
own reading guide: faithfulness curves (are the top cells the mechanism?), where the top heads attend, and exact
path patching with its edge-attribution estimate (how they connect; the slowest part, untick it for quick looks).
When an ORDER BY or aggregate feature moves the command set, picking a feature your own command set can express
moves it back.

`embedded` runs offline on the small models shipped with the suite; the numbered models come from the Hugging
Face hub (the token is read from `HF_TOKEN` or the Colab secret, never typed here). Models stay loaded between
runs, so switching the feature or a flag is quick. For the full write-up of one feature, with the spread
across examples and the saved files, open its notebook (`ENGTABLENAME.ipynb`, ...).
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
## The explorer

Errors (an unknown model for a command set, a hub model without network) appear next to the Run button; the
full traceback is printed below it.
"""

# %%
from helpers.experiments.explorer import Explorer

explorer = Explorer()
explorer.widget
