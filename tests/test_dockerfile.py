"""The node's GPU image, checked statically (design.md §10): no registry here serves a CUDA base image to build it.

The Dockerfile is parsed into instructions (continuations joined, comments dropped) so each rule is checked on the
instruction that carries it, not on a comment that merely mentions it.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, arguments) per instruction, with backslash continuations joined and comment lines dropped."""
    result: list[tuple[str, str]] = []
    pending = ""
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        result.append((keyword.upper(), arguments.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"
    return result


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((REPO_ROOT / "Dockerfile").read_text(encoding="utf-8"))


def arguments(dockerfile: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for key, args in dockerfile if key == keyword]


def test_cuda_runtime_base_image(dockerfile: list[tuple[str, str]]) -> None:
    (base,) = arguments(dockerfile, "FROM")
    assert re.fullmatch(r"nvidia/cuda:12\.\d+\.\d+-cudnn-runtime-ubuntu\d\d\.04", base), base


def test_installs_the_gpu_extra_with_a_pinned_onnxruntime_gpu_and_no_torch(dockerfile: list[tuple[str, str]]) -> None:
    runs = " ".join(arguments(dockerfile, "RUN"))
    build_args = dict(arg.split("=", 1) for arg in arguments(dockerfile, "ARG") if "=" in arg)
    expanded = re.sub(r"\$\{(\w+)\}", lambda m: build_args.get(m[1], m[0]), runs)
    tokens = shlex.split(expanded)
    assert ".[gpu]" in tokens and ".[cpu]" not in tokens
    runtime_specs = [t for t in tokens if t.startswith("onnxruntime") and not t.startswith("onnxruntime.")]
    assert runtime_specs and all(re.fullmatch(r"onnxruntime-gpu==\d+\.\d+\.\d+", t) for t in runtime_specs), (
        f"only a pinned onnxruntime-gpu may be installed, got {runtime_specs}"
    )
    assert not [t for t in tokens if re.match(r"(torch|monai)\b", t)], "no torch or MONAI in the image"
    assert "find_spec('torch') is None" in expanded  # the build itself fails if a dependency pulled torch in


def test_pinned_version_is_the_tested_cpu_one(dockerfile: list[tuple[str, str]]) -> None:
    """The GPU wheel is pinned to the version of the CPU wheel the suite runs against, so both builds agree."""
    from importlib.metadata import version

    build_args = dict(arg.split("=", 1) for arg in arguments(dockerfile, "ARG") if "=" in arg)
    assert build_args["ONNXRUNTIME_GPU_VERSION"] == version("onnxruntime")


def test_runs_as_a_non_root_user(dockerfile: list[tuple[str, str]]) -> None:
    users = arguments(dockerfile, "USER")
    assert users and users[-1] not in ("root", "0", "0:0")
    last_user = max(i for i, (key, _) in enumerate(dockerfile) if key == "USER")
    cmd_index = max(i for i, (key, _) in enumerate(dockerfile) if key == "CMD")
    assert last_user < cmd_index
    assert all(key != "RUN" for key, _ in dockerfile[last_user:]), "nothing runs as root after USER"


def test_data_volume_matches_the_data_dir(dockerfile: list[tuple[str, str]]) -> None:
    (volume,) = arguments(dockerfile, "VOLUME")
    env = " ".join(arguments(dockerfile, "ENV"))
    data_dir = re.search(r"FEDLESION_STORAGE__DATA_DIR=(\S+)", env)
    assert data_dir and f'"{data_dir[1]}"' in volume


def test_exposes_dicom_and_web_ports_and_checks_health(dockerfile: list[tuple[str, str]]) -> None:
    env = " ".join(arguments(dockerfile, "ENV"))
    dicom_port = re.search(r"FEDLESION_NODE__DICOM_PORT=(\d+)", env)[1]
    web_port = re.search(r"FEDLESION_NODE__WEB_PORT=(\d+)", env)[1]
    assert set(" ".join(arguments(dockerfile, "EXPOSE")).split()) == {dicom_port, web_port}
    (healthcheck,) = arguments(dockerfile, "HEALTHCHECK")
    assert "CMD" in healthcheck and "/healthz" in healthcheck and "${FEDLESION_NODE__WEB_PORT}" in healthcheck
    assert "FEDLESION_NODE__WEB_HOST=0.0.0.0" in env  # reachable through the published port


def test_command_is_the_node(dockerfile: list[tuple[str, str]]) -> None:
    (cmd,) = arguments(dockerfile, "CMD")
    assert shlex.split(cmd.strip("[]").replace(",", " ")) == ["fedlesion", "node"]


def test_build_context_leaves_out_venvs_data_and_git() -> None:
    ignored = set((REPO_ROOT / ".dockerignore").read_text(encoding="utf-8").split())
    assert {".git", ".venv", "fedlesion-data", "build", "tests"} <= ignored


def test_the_parser_sees_through_comments() -> None:
    """Negative control: a rule named only in a comment does not count as an instruction."""
    parsed = instructions("FROM x\n# USER nobody\nRUN a \\\n  b\n")
    assert parsed == [("FROM", "x"), ("RUN", "a b")]
