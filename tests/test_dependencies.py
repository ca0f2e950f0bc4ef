"""The torch floor: pyproject.toml never allows a torch that lacks an API amalab calls, and
``import amalab.training.distributed`` on an older torch fails with one line naming the version it needs.

Torch 2.8 is the floor because of the newest API amalab's FSDP2 code calls,
``FSDPModule.set_force_sum_reduction_for_comms`` (added with ``set_gradient_divide_factor`` by pytorch PR
#155915): torch 2.7.1's wheel has neither, torch 2.8.0's has both (and every other FSDP2, DTensor and
``torch.distributed.checkpoint.state_dict`` name amalab uses, which 2.7.1 already had).
"""

from __future__ import annotations

import importlib.util
import re
import sys
import tomllib
from pathlib import Path

import pytest

PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"
#: FSDPModule.set_force_sum_reduction_for_comms (amalab.training.distributed.shard_policy) first shipped in 2.8
TORCH_FLOOR = (2, 8)


def torch_requirements() -> dict[str, str]:
    """Every torch requirement of pyproject.toml: {where: requirement}."""
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    groups = {"dependencies": project.get("dependencies", []), **project.get("optional-dependencies", {})}
    return {f"{group}: {req}": req for group, reqs in groups.items() for req in reqs
            if re.match(r"torch\b(?![-_.\w])", req)}


def floor(requirement: str) -> tuple[int, ...]:
    found = re.search(r">=\s*(\d+(?:\.\d+)*)", requirement)
    assert found, f"{requirement}: no lower bound (a bare torch allows any version)"
    return tuple(int(part) for part in found.group(1).split("."))


def test_every_torch_requirement_has_the_floor():
    requirements = torch_requirements()
    assert requirements, "pyproject.toml names no torch requirement"
    for where, requirement in requirements.items():
        assert floor(requirement) >= TORCH_FLOOR, where


def test_the_import_check_asks_for_the_same_floor():
    pytest.importorskip("torch")
    from amalab.training import distributed

    assert distributed.MIN_TORCH == TORCH_FLOOR
    assert min(floor(r) for r in torch_requirements().values()) == TORCH_FLOOR


@pytest.mark.parametrize("version", ["2.6.0", "2.7.1+cu126", "1.13.1"])
def test_an_older_torch_is_refused_in_one_line(version):
    pytest.importorskip("torch")
    from amalab.training.distributed import check_torch_version

    with pytest.raises(ImportError) as refused:
        check_torch_version(version)
    message = str(refused.value)
    assert "\n" not in message and "torch>=2.8" in message and version in message


@pytest.mark.parametrize("version", ["2.8.0", "2.8.0+cpu", "2.10.1", "3.0.0a0+git1234"])
def test_a_newer_torch_passes(version):
    pytest.importorskip("torch")
    from amalab.training.distributed import check_torch_version

    check_torch_version(version)  # 2.10 > 2.8: compared as numbers, not strings


def test_importing_the_module_on_an_older_torch_fails_with_that_line(monkeypatch):
    """The module run afresh (under another name: the imported one stays as it is) with torch saying 2.7.1."""
    torch = pytest.importorskip("torch")
    from amalab.training import distributed

    monkeypatch.setattr(torch, "__version__", "2.7.1")
    spec = importlib.util.spec_from_file_location("distributed_on_old_torch", distributed.__file__)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # as an import would (its dataclasses look it up)
    with pytest.raises(ImportError, match=r"needs torch>=2\.8 .*found torch 2\.7\.1"):
        spec.loader.exec_module(module)
