"""The Ray executor on a local Ray (2 CPUs, 2 GPUs as a logical resource: scheduling is tested without a GPU)."""
from __future__ import annotations

import json
import subprocess
import sys
import time

import psutil
import pytest

ray = pytest.importorskip("ray")

from helpers.experiments import ray_executor as R  # noqa: E402
from helpers.experiments import sweep as S  # noqa: E402
from helpers.experiments import sweep_cells as C  # noqa: E402
from test_notebooks import REPO  # noqa: E402
from test_sweep_signals import _grid, _slow_notebooks, _wait, kill_leftovers, sigterm_and_check  # noqa: E402


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO)}})
    yield ray
    ray.shutdown()


def _cmdline_has(process: psutil.Process, *words: str) -> bool:
    try:
        cmdline = " ".join(process.cmdline())
    except psutil.Error:  # (gone, or a zombie)
        return False
    return all(w in cmdline for w in words)


def test_cells_run_as_ray_tasks_and_their_files_come_back(local_ray, tmp_path):
    path = _grid(tmp_path, ("DEFTABLENAME", "ENGTABLENAME"))
    config = C.load_config(path)
    config.cells = [{"feature_name": "DEFFIELDNAME", "model_path": str(tmp_path / "no-such-model")}]
    outcomes = S.run_sweep(config, progress=False, executor="ray")
    assert [o.status for o in outcomes] == ["ok", "ok", "failed"]
    for o in outcomes[:2]:
        done = json.loads((o.dir / C.DONE).read_text())
        assert done["executor"] == "ray" and done["node"] and done["host"] and done["gpus"] == []
        assert C.is_finished(o.dir, o.cell) and list(o.dir.glob(f"*{C.EXECUTED_SUFFIX}"))
        assert (o.dir / "papermill.log").is_file() and list(o.dir.glob("*.heatmap.html"))
        # the figures link the sweep's one copy of plotly.js, not one the worker wrote
        assert not (o.dir / "plotly.min.js").exists()
        assert 'src="../../../plotly.min.js"' in next(o.dir.glob("*.heatmap.html")).read_text()
    assert "no-such-model" in outcomes[2].error and (outcomes[2].dir / C.FAILED).is_file()  # the notebook's error
    summary = json.loads((config.root / "summary.json").read_text())
    assert all("Ray node" in c["ran_on"] for c in summary["cells"][:2])
    assert [o.status for o in S.run_sweep(config, progress=False, executor="ray")] == ["skipped", "skipped", "failed"]


def test_a_lost_task_is_a_failed_cell_with_rays_reason(tmp_path):
    config = C.load_config(_grid(tmp_path, ("DEFTABLENAME",)))
    cell = C.expand(config)[0]
    cell_dir = C.folder_for(config, cell)
    cell_dir.mkdir(parents=True)

    class Lost:
        @staticmethod
        def get(ref):
            raise ray.exceptions.WorkerCrashedError()

    out = R._collect(Lost, None, config, cell, cell_dir, {}, time.perf_counter(), "DEFTABLENAME")
    assert out.status == "failed" and out.error.startswith("Ray: WorkerCrashedError")
    assert json.loads((cell_dir / C.FAILED).read_text())["executor"] == "ray"


def test_a_gpu_cell_on_a_cluster_without_gpus_fails_at_once(tmp_path):
    config = C.load_config(_grid(tmp_path, ("DEFTABLENAME",)))
    cell = C.expand(config)[0]
    cuda = C.Cell({**cell.params, "device": "cuda"}, cell.defaults, {})
    folder = C.folder_for(config, cuda)
    seen = {}
    assert R._submit(config, cuda, folder, None, {"CPU": 2.0}, lambda i, o: seen.update({i: o}), 0) is None
    assert seen[0].status == "failed" and "asks for 1 GPU" in seen[0].error and not (folder / C.RUNNING).exists()


def test_cells_ask_for_gpus_where_their_device_is_cuda(local_ray, tmp_path):
    config = C.load_config(_grid(tmp_path, ("DEFTABLENAME",)))
    cell = C.expand(config)[0]
    cuda = C.Cell({**cell.params, "device": "cuda"}, cell.defaults, {})
    auto = C.Cell({**cell.params, "device": "auto"}, cell.defaults, {})
    assert R.cell_resources(cell, {}, 2) == {"num_gpus": 0, "num_cpus": 1.0}  # device: cpu
    assert R.cell_resources(cuda, {"gpus_per_cell": 0.5}, 0)["num_gpus"] == 0.5
    assert R.cell_resources(auto, {}, 2)["num_gpus"] == 1 and R.cell_resources(auto, {}, 0)["num_gpus"] == 0

    @ray.remote(num_gpus=0.5)
    def seen():
        import os
        return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    ids, visible = ray.get(seen.remote())
    assert len(ids) == 1 and visible == str(ids[0])  # Ray hands the task its GPU


def test_sigterm_cancels_the_ray_tasks(local_ray, tmp_path):
    """A sweep on its own local Ray, SIGTERMed while a (10-minute) cell runs: the task and its papermill stop, the
    cell is interrupted, Ray shuts down, the script exits 143 within seconds; a rerun on Ray resumes it, once."""
    features = ("DEFTABLENAME",)
    path = _grid(tmp_path, features, notebooks=_slow_notebooks(tmp_path / "slow", features))
    cmd = [sys.executable, str(REPO / "scripts" / "sweep.py"), "--params", str(path), "--no-progress",
           "--executor", "ray"]
    sweep = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    papermills: list = []
    try:
        def papermill_running():
            assert sweep.poll() is None, sweep.communicate()[0].decode(errors="replace")
            # the sweep's own papermill only: a descendant of the sweep (its local Ray's worker runs it, in a
            # temporary folder). Searching every process, as before, found another test run's papermill on the
            # same machine, and the cleanup below SIGKILLed it (two CI runs at once each failed a Ray test).
            found = [p for p in psutil.Process(sweep.pid).children(recursive=True)
                     if _cmdline_has(p, "papermill", "tinysql-cell-")]
            return found if found and found[0].children(recursive=True) else None

        papermills = _wait(papermill_running, 180, "papermill and its kernel on the Ray worker")
        papermills += papermills[0].children(recursive=True)
        sigterm_and_check(sweep, papermills, exit_within=40, gone_within=20)
    finally:
        kill_leftovers(sweep, papermills)
    config = C.load_config(path)
    folder = C.folder_for(config, C.expand(config)[0])
    assert (folder / C.INTERRUPTED).is_file() and not (folder / C.DONE).exists() and not (folder / C.RUNNING).exists()
    config = C.load_config(_grid(tmp_path, features, name="resume.yaml"))  # the same cell, the real notebook
    assert [o.status for o in S.run_sweep(config, progress=False, executor="ray")] == ["ok"]
    assert C.is_finished(folder, C.expand(config)[0]) and not (folder / C.INTERRUPTED).exists()
    assert [o.status for o in S.run_sweep(config, progress=False, executor="ray")] == ["skipped"]
