"""The core is framework-free: a raw torchrun or DeepSpeed loop installs, imports and runs it
without Lightning (or scikit-learn, matplotlib, jsonargparse ...); the Lightning callbacks load on
first use, and say which extra to install where Lightning is missing."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from importlib import metadata
from pathlib import Path

import pytest
import torch
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

import dist_bregman
from dist_bregman.callbacks.bregman import BregmanPruner
from dist_bregman.callbacks.pruning import SafeModelPruning
from dist_bregman.callbacks.sparse_averaging import (
    SparseStochasticWeightAveraging,
    SparseWeightAveraging,
)

# Every installed distribution outside the core's requirements (the package's metadata, so
# what `pip install dist_bregman` without extras installs) made unimportable, then what the
# raw loops use: the controller measures, updates lambda and takes its proximal step;
# LinBreg and AdaBreg step; the counting kernel counts; the sparse export writes and reads.
CORE_ONLY = textwrap.dedent(
    """
    import json, site, sys
    from importlib.machinery import PathFinder

    blocked = set(json.loads(sys.argv[1]))
    installed = set(site.getsitepackages())

    # Python's path finder, except that a blocked name is looked for everywhere but in
    # site-packages, as if its distribution were not installed (setuptools, which builds the
    # kernel, still finds the packaging it vendors).
    class NotInstalled(PathFinder):
        @classmethod
        def find_spec(cls, name, path=None, target=None):
            if path is None and name in blocked:
                path = [entry for entry in sys.path if entry not in installed]
            return super().find_spec(name, path, target)

    sys.meta_path[sys.meta_path.index(PathFinder)] = NotInstalled

    import torch
    import torch.nn.functional as F
    from torch import nn

    import dist_bregman
    from dist_bregman import BregmanConfig, SparsityController, comm, kernels, measure_sparsity
    from dist_bregman.export import export_sparse, load_sparse
    from dist_bregman.optim import AdaBreg, LinBreg

    torch.manual_seed(0)
    x, y = torch.randn(64, 64), torch.randint(0, 10, (64,))
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    config = BregmanConfig(target_sparsity=0.5, update_frequency=1, initial_lambda=1e-2)
    controller = SparsityController(model, config)
    controller.attach(optimizer)
    for step in range(1, 6):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        controller.observe_loss(loss)
        assert controller.update_if_due(step) is not None
    zeros = sum(int((m.weight == 0).sum()) for m in model if isinstance(m, nn.Linear))
    assert zeros > 0 and measure_sparsity(model).nonzero == 64 * 32 + 32 * 10 - zeros
    assert kernels.extension() is not None  # the counts above came from the kernel

    for make in (LinBreg, AdaBreg):
        bregman = make(model.parameters(), lr=0.01, lambda_=1e-2)
        F.cross_entropy(model(x), y).backward()
        bregman.step()
    export_sparse(model, sys.argv[2])
    assert torch.equal(load_sparse(sys.argv[2])["0.weight"], model[0].weight)
    assert comm.get_world_size() == 1
    top = {name.split(".")[0] for name in sys.modules}
    leaked = [  # a blocked package's own files, not a copy vendored in another package
        name for name in top & blocked
        if any(str(getattr(sys.modules[name], "__file__", "")).startswith(f"{p}/{name}")
               for p in installed)
    ]
    assert not leaked, leaked
    try:
        dist_bregman.BregmanPruner
    except ImportError as error:
        print("callback:", error)
    """
)


def _outside_the_core() -> list[str]:
    """Import names of the installed distributions that ``dist_bregman``'s requirements
    (without its extras, with the extras they name themselves), followed to the end, do not
    reach."""
    core: set[tuple[str, str]] = set()  # (distribution, extra or "")
    todo = [("dist_bregman", "")]
    while todo:
        name, extra = todo.pop()
        if (name, extra) in core:
            continue
        core.add((name, extra))
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:  # a requirement this platform did not install
            continue
        for line in requires:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": extra}):
                wanted = canonicalize_name(requirement.name)
                todo += [(wanted, "")] + [(wanted, e) for e in requirement.extras]
    reached = {name for name, _ in core}
    return sorted(
        module
        for module, distributions in _packages_distributions().items()
        if not any(canonicalize_name(d) in reached for d in distributions)
    )


def _packages_distributions() -> dict[str, list[str]]:
    """``metadata.packages_distributions()`` as Python 3.11 computes it: a distribution
    without ``top_level.txt`` (scikit-learn and matplotlib, built with meson) gives the
    top-level names of its files. Python 3.10's reads ``top_level.txt`` alone, so those
    two were not found, hence not hidden."""
    found: dict[str, list[str]] = {}
    for distribution in metadata.distributions():
        listed = (distribution.read_text("top_level.txt") or "").split()
        files = distribution.files or []
        tops = {
            f.parts[0].removesuffix(".py") for f in files if len(f.parts) > 1 or f.suffix == ".py"
        }
        inferred = {name for name in tops if name.isidentifier() and name != "__pycache__"}
        for module in listed or inferred:
            found.setdefault(module, []).append(distribution.metadata["Name"])
    return found


def test_the_core_installs_and_runs_without_the_extras(tmp_path: Path) -> None:
    blocked = _outside_the_core()
    assert {"lightning", "sklearn", "matplotlib", "jsonargparse"} <= set(blocked)
    done = subprocess.run(
        [sys.executable, "-c", CORE_ONLY, json.dumps(blocked), str(tmp_path / "m.safetensors")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "callback:" in done.stdout and "dist_bregman[lightning]" in done.stdout, done.stdout


def test_the_command_says_which_extra_it_needs() -> None:
    hide = (
        "import sys; sys.modules['sklearn'] = None; from dist_bregman.__main__ import main; main()"
    )
    done = subprocess.run(
        [sys.executable, "-c", hide, "fit"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 1
    assert "sklearn" in done.stderr and "dist_bregman[cli]" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr


def test_the_callbacks_load_on_first_use() -> None:
    assert dist_bregman.BregmanPruner is BregmanPruner
    assert dist_bregman.SafeModelPruning is SafeModelPruning
    assert dist_bregman.SparseWeightAveraging is SparseWeightAveraging
    assert dist_bregman.SparseStochasticWeightAveraging is SparseStochasticWeightAveraging
    lazy = {"BregmanPruner", "SafeModelPruning", "SparseWeightAveraging"}
    assert lazy | {"SparseStochasticWeightAveraging"} <= set(dist_bregman.__all__)
    with pytest.raises(AttributeError, match="no attribute 'Nothing'"):
        dist_bregman.Nothing  # noqa: B018


def test_importing_the_core_does_not_load_dynamo() -> None:
    """Dynamo costs a process about 0.5 s to import: the loss term's eager wrapper
    (:func:`dist_bregman.compiling.eager`) loads it at its first call, not at import.
    (The FSDP and DTensor modules the shard layouts import load it themselves on torch
    2.8, not on 2.13: the library must add no import of its own.)"""
    loaded = "print('torch._dynamo' in sys.modules)"
    found = []
    for imported in ("torch.distributed.fsdp, torch.distributed.tensor", "dist_bregman"):
        done = subprocess.run(
            [sys.executable, "-c", f"import sys, {imported}; {loaded}"],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        found.append(done.stdout.strip())
    assert found[1] == found[0]  # "False" on torch 2.13 and 2.14


def test_a_torch_without_fsdp2_where_it_is_looked_for_is_refused_at_import() -> None:
    """torch 2.4 and 2.5 kept FSDP2 outside torch.distributed.fsdp: dist_bregman would then
    have read FSDP2 and DTensor parameters as plain tensors and counted them wrong, so the
    import fails instead, naming the torch it needs (hidden here as on such a torch)."""
    hide = "import sys; sys.modules['torch.distributed.fsdp'] = None; import dist_bregman"
    done = subprocess.run([sys.executable, "-c", hide], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "ImportError: dist_bregman needs torch>=2.8" in done.stderr, done.stderr[-2000:]
    assert f"this torch ({torch.__version__})" in done.stderr


def test_looking_for_lightnings_callbacks_imports_neither_lightning_package() -> None:
    """The pruners look for finetuning and averaging callbacks among the classes of each
    Lightning package this process has imported (the Trainer's is among them): the other
    package holds no class of a callback that exists, importing it would only cost time."""
    look = (
        "import sys; from dist_bregman.callbacks.namespaces import callback_classes; "
        "found = callback_classes('BaseFinetuning'); "
        "print([c.__module__ for c in found], 'pytorch_lightning' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", look], capture_output=True, text=True, timeout=120, check=True
    )
    assert done.stdout.split() == ["['lightning.pytorch.callbacks.finetuning']", "False"]
