"""The diagnostic suite's trainings as jobs of the runner (amalab/runner.py, config [run]): the same
summary.json bytes with 1 and with 2 workers (and on a local Dask cluster), a job that fails stops the run
naming it, and a bad [run] value is one line naming the key."""

import pytest

pytest.importorskip("gymnasium")
pytest.importorskip("mujoco")

from amalab.cli import main  # noqa: E402
from amalab.control import comparison  # noqa: E402
from amalab.control.config import load_diagnose_config  # noqa: E402
from amalab.control.diagnose import diagnose  # noqa: E402
from amalab.runner import JobError  # noqa: E402


def _main_only(run_table: str):
    """The tiny config without sweeps (its six seeds: per seed two data jobs, a reference job, a job for the
    reference's record and the specialists, and one for the methods), with ``run_table`` as its [run] table."""
    def edit(text: str) -> str:
        text = text[:text.index("[sweeps]")]
        return text + "\n[run]\n" + run_table + "\n"
    return edit


def _summary_bytes(make_tiny_config, tmp_path, name: str, run_table: str) -> bytes:
    path = make_tiny_config(_main_only(run_table))
    text = path.read_text().replace(str(tmp_path / "out"), str(tmp_path / name)).replace(
        str(tmp_path / "figures"), str(tmp_path / f"{name}-figures"))
    path.write_text(text)
    diagnose(load_diagnose_config(path), show_progress=False)
    return (tmp_path / name / "summary.json").read_bytes()


def test_one_or_two_workers_write_the_same_summary(make_tiny_config, tmp_path):
    one = _summary_bytes(make_tiny_config, tmp_path, "one", "workers = 1")
    two = _summary_bytes(make_tiny_config, tmp_path, "two", "workers = 2")
    assert one == two
    assert b'"seeds": 6' in one


def test_a_local_dask_cluster_writes_the_same_summary(make_tiny_config, tmp_path):
    distributed = pytest.importorskip("distributed")
    one = _summary_bytes(make_tiny_config, tmp_path, "one", "workers = 1")
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
                                  worker_dashboard_address=None) as cluster:
        on_dask = _summary_bytes(make_tiny_config, tmp_path, "dask",
                                 f'backend = "dask"\nscheduler = "{cluster.scheduler_address}"')
    assert on_dask == one


def test_a_failing_job_stops_the_run_naming_it(make_tiny_config, monkeypatch):
    def broken(run, point, seed):
        if seed == 1:
            raise RuntimeError("no simulator")
        return real(run, point, seed)

    real = comparison.method_records
    monkeypatch.setattr(comparison, "method_records", broken)
    config = load_diagnose_config(make_tiny_config(_main_only("workers = 1")))
    with pytest.raises(JobError, match=r"^job imbalance1-.*-apo_zero0.1/seed-1 failed: RuntimeError: no simulator$"):
        diagnose(config, show_progress=False)


@pytest.mark.parametrize("table, message", [
    ('backend = "spark"', "[run]: backend must be one of loky, dask, ray, got 'spark'"),
    ('backend = "dask"', '[run]: backend "dask" needs scheduler'),
    ("workers = -1", "[run]: workers must be >= 0"),
])
def test_a_bad_run_table_is_one_line_naming_the_key(make_tiny_config, capsys, table, message):
    path = make_tiny_config(_main_only(table))
    assert main(["diagnose", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err
