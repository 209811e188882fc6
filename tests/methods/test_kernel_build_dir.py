"""The kernels' build folder is keyed by the sources' folder and contents: two checkouts or
versions never build into one."""

from __future__ import annotations

import shutil
from pathlib import Path

from server import kernels


def test_the_build_folder_follows_the_sources_contents(tmp_path: Path):
    copy = tmp_path / "src"
    shutil.copytree(kernels.SOURCE.parent, copy, ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    root = tmp_path / "cache"
    same = kernels.build_dir(root, copy)
    assert same == kernels.build_dir(root, copy)
    assert same != kernels.build_dir(root, kernels.SOURCE.parent), "another checkout, another folder"
    included = copy / "spectral_cpu.cpp"  # an included file counts as much as the main one
    included.write_text(included.read_text() + "\n// edited\n")
    assert kernels.build_dir(root, copy) != same
    assert kernels.build_dir(root, copy).parent == root
