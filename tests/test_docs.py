"""The documentation builds, and what it shows is true.

- `mkdocs build --strict` of `docs/` (as `make docs`): a broken link or anchor, a missing page or
  picture, or an API object that no longer exists fails.
- Every ```python block of README.md and docs/**/*.md runs as written, each in a fresh namespace (a
  snippet must define what it uses), unless the line before its fence is `<!-- not run: reason -->`.
  The working directory is laid out as after `make demo`: `outputs/demo` is the session's quick demo
  (`python -m ovseg_jax.demo --quick`, the layout `make demo` writes), and the files a user brings
  are stand-ins: `photo.jpg` (a val scene of the synthetic world) and, for the backbone snippet,
  Swin-B / R101c checkpoints in the official layouts written from randomly initialised models.
- Names and paths the text mentions exist: dotted `ovseg_jax.x.y` names resolve, repository paths
  exist, `make X` targets are in the Makefile, and the `--flags` of the commands in ```bash blocks
  are flags those commands define. Shell blocks are documentation, not run.
"""

from __future__ import annotations

import glob
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
NOT_RUN = re.compile(r"^<!--\s*not run:(.*?)-->\s*$")
_FENCE = re.compile(r"^(`{3,}|~{3,})\s*([\w-]*)")


class Block(NamedTuple):
    page: str  # path relative to the repository root
    line: int  # line of the opening fence (1-based)
    lang: str
    code: str
    not_run: str | None  # the reason given by a `<!-- not run: reason -->` line before the fence


def code_blocks(path: Path) -> list[Block]:
    """The top-level fenced blocks of a Markdown file (fences nested in a longer fence are content)."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if not opening:
            i += 1
            continue
        fence, lang, start = opening.group(1), opening.group(2), i
        i += 1
        while i < len(lines) and not (lines[i].startswith(fence[0] * len(fence))
                                      and lines[i].strip() == lines[i].strip()[0] * len(lines[i].strip())):
            i += 1
        before = next((lines[j] for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NOT_RUN.match(before.strip())
        blocks.append(Block(str(path.relative_to(ROOT)), start + 1, lang, "\n".join(lines[start + 1:i]) + "\n",
                            marker.group(1).strip() if marker else None))
        i += 1
    return blocks


BLOCKS = [block for page in PAGES for block in code_blocks(page)]
SNIPPETS = [b for b in BLOCKS if b.lang in ("python", "py") and b.not_run is None]


def test_pages_have_runnable_python_snippets_that_compile():
    assert len(SNIPPETS) >= 8
    for b in SNIPPETS:
        compile(b.code, f"{b.page}:{b.line}", "exec")  # a syntax error names its page and line


def test_every_not_run_marker_gives_a_reason():
    for b in BLOCKS:
        assert b.not_run != "", f"{b.page}:{b.line}: `<!-- not run: -->` without a reason"


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path):
    """`mkdocs build --strict` (what `make docs` runs), and the API pages hold the documented objects."""
    try:
        import mkdocs  # noqa: F401, PLC0415
    except ImportError:
        pytest.fail("the docs build needs mkdocs, mkdocs-material and mkdocstrings[python]: pip install -e '.[docs]'")
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    api = (site / "api" / "inference" / "index.html").read_text()
    assert 'id="ovseg_jax.inference.ensemble.Predictor"' in api


# --- names, paths, targets and flags the text mentions ---------------------------------------------

_DOTTED = re.compile(r"(?<![\w./<>-])ovseg_jax(?:\.[A-Za-z_]\w*)+")
# Files of this repository (the original's `configs/*.yaml` and `tools/` are mentioned too, and not ours).
_PATH = re.compile(r"(?<![\w./-])((?:configs|bench|tests|launch|docs|ovseg_jax)/[\w./*{},-]*\.(?:py|sh|md|png))\b")
_MAKE = re.compile(r"(?:^|`)make ([a-z][\w-]*)", re.M)
_COMMENT = re.compile(r"<!--.*?-->", re.S)


def _texts() -> list[tuple[str, str]]:
    """(page, text without HTML comments) of README.md and the docs pages; the generated API pages
    are checked by the strict build."""
    return [(str(p.relative_to(ROOT)), _COMMENT.sub("", p.read_text())) for p in PAGES
            if "api" not in p.relative_to(ROOT).parts]


def _resolves(name: str) -> bool:
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for part in parts[i:]:
            if not hasattr(obj, part):
                return False
            obj = getattr(obj, part)
        return True
    return False


def test_dotted_names_resolve():
    broken = sorted({f"{page}: {name}" for page, text in _texts() for name in _DOTTED.findall(text)
                     if not _resolves(name)})
    assert not broken, "names that are neither a module nor an attribute:\n" + "\n".join(broken)


def _expand_braces(path: str) -> list[str]:
    match = re.search(r"\{([^{}]*)\}", path)
    if not match:
        return [path]
    return [p for option in match.group(1).split(",")
            for p in _expand_braces(path[:match.start()] + option + path[match.end():])]


def test_repository_paths_exist():
    missing = []
    for page, text in _texts():
        for found in set(_PATH.findall(text)):
            for path in _expand_braces(found):
                if "/**" in path:
                    continue  # a folder pattern (`masks/**.png`), not a file of the repository
                if not glob.glob(str(ROOT / path)):
                    missing.append(f"{page}: {path}")
    assert not missing, "paths that do not exist:\n" + "\n".join(sorted(missing))


def test_make_targets_exist():
    targets = set(re.findall(r"^([\w-]+):", (ROOT / "Makefile").read_text(), re.M))
    used = {(page, t) for page, text in _texts() for t in _MAKE.findall(text)}
    missing = sorted(f"{page}: make {t}" for page, t in used if t not in targets)
    assert not missing, "Makefile targets that do not exist:\n" + "\n".join(missing)


def _defined_flags(source: str) -> set[str]:
    flags = set(re.findall(r"[\"'](--[a-z][\w-]*)[\"']", source))
    for name in re.findall(r"DEFINE_\w+\(\s*[\"'](\w+)[\"']", source):  # absl flags, with their --no form
        flags |= {f"--{name}", f"--no{name}"}
    return flags | {"--no-" + f[2:] for f in flags} | {"--help"}


def _command_source(line: str) -> tuple[str, str] | None:
    """(command, the source files that define its flags) of a `python -m ovseg_jax.x` or
    `python bench/x.py` line; None for other lines."""
    module = re.search(r"python -m (ovseg_jax(?:\.\w+)*)", line)
    if module:
        base = ROOT / Path(*module.group(1).split("."))
        files = [f for f in (base.with_suffix(".py"), base / "__main__.py") if f.is_file()]
        # and the modules it imports flags from (`add_sam_arguments(parser)`): those that add arguments
        imported = {ROOT / Path(*m.split(".")).with_suffix(".py")
                    for f in files for m in re.findall(r"^from (ovseg_jax[\w.]*) import", f.read_text(), re.M)}
        files += sorted(f for f in imported if f.is_file() and "add_argument(" in f.read_text())
        return module.group(1), "\n".join(f.read_text() for f in files)
    bench = re.search(r"python (bench/\w+\.py)", line)
    if bench:
        files = [ROOT / bench.group(1), ROOT / "bench" / "common.py"]
        return bench.group(1), "\n".join(f.read_text() for f in files if f.is_file())
    return None


def test_documented_command_flags_exist():
    unknown, checked = [], 0
    for b in BLOCKS:
        if b.lang not in ("bash", "sh", "shell"):
            continue
        for line in b.code.replace("\\\n", " ").splitlines():
            line = re.sub(r"\s#\s.*$", "", line)  # a trailing comment
            command = _command_source(line)
            if command is None:
                continue
            name, source = command
            assert source, f"{b.page}:{b.line}: {name} has no source file"
            flags = _defined_flags(source)
            checked += 1
            unknown += [f"{b.page}:{b.line}: {name} {flag}" for flag in re.findall(r"(?<![\w-])--[a-z][\w-]*", line)
                        if flag not in flags]
    assert checked >= 30, f"only {checked} command lines found in the bash blocks"
    assert not unknown, "flags the commands do not define:\n" + "\n".join(unknown)


def test_readme_links_to_pages_that_exist():
    readme = _COMMENT.sub("", (ROOT / "README.md").read_text())
    links = re.findall(r"\]\((docs/[^)#\s]+)", readme)
    assert len(links) >= 15
    assert not [link for link in links if not (ROOT / link).is_file()]


# --- the snippets run --------------------------------------------------------------------------------

def _write_backbone_checkpoints(directory: Path) -> None:
    """Swin-B in the official Swin `model` layout and R101c as detectron2's `R-103.pkl` (the names the
    backbone snippet loads), with small positive random values: the shapes from `nnx.eval_shape`,
    without the models' random initialisation (14 s of eager dispatch for the two at full size)."""
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from ovseg_jax.convert.params import nnx_to_torch  # noqa: PLC0415
    from ovseg_jax.models.backbone import build_backbone  # noqa: PLC0415
    from ovseg_jax.models.swin import SwinConfig  # noqa: PLC0415

    rng = np.random.default_rng(0)

    def random_state(build) -> dict[str, np.ndarray]:
        model = nnx.eval_shape(build)
        for _, variable in nnx.to_flat_state(nnx.state(model)):
            variable.set_value((0.02 * rng.random(variable.shape, np.float32)).astype(variable.dtype))
        return nnx_to_torch(model)

    swin = random_state(lambda: build_backbone("swin", SwinConfig.swin_b(), rngs=nnx.Rngs(1)))
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in swin.items()}},
               directory / "swin_base_patch4_window12_384_22k.pth")
    r101c = random_state(lambda: build_backbone("resnet", rngs=nnx.Rngs(2)))
    with open(directory / "R-103.pkl", "wb") as f:
        pickle.dump({"model": {k: np.asarray(v) for k, v in r101c.items()}, "__author__": "test"}, f)


@pytest.fixture(scope="module")
def workspace(quick_demo, tmp_path_factory):
    """A working directory laid out as a user's after `make demo`, with the files a user brings."""
    demo_dir, _ = quick_demo
    root = tmp_path_factory.mktemp("docs")
    (root / "outputs").mkdir()
    (root / "outputs" / "demo").symlink_to(demo_dir, target_is_directory=True)
    val_image = sorted((demo_dir / "world" / "images" / "val").iterdir())[0]
    Image.open(val_image).convert("RGB").resize((160, 128)).save(root / "photo.jpg", quality=95)
    if any("R-103.pkl" in b.code for b in SNIPPETS):
        _write_backbone_checkpoints(root)
    return root


# Files a snippet says it writes: `.save("x.png")`, `export(model, "x.pth", ...)`.
_WRITES = re.compile(r'(?:\.save|export)\((?:[^()"]*, )?"([^"]+\.(?:png|pth|pt|safetensors))"')


@pytest.mark.slow
@pytest.mark.parametrize("block", SNIPPETS, ids=[f"{b.page}:{b.line}" for b in SNIPPETS])
def test_snippet_runs(block, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    written = _WRITES.findall(block.code)
    for name in written:
        (workspace / name).unlink(missing_ok=True)
    namespace = {"__name__": "__docs__"}
    exec(compile(block.code, f"{block.page}:{block.line}", "exec"), namespace)  # noqa: S102
    for name in written:
        assert (workspace / name).stat().st_size > 0, f"{block.page}:{block.line} did not write {name}"


def test_snippets_that_write_files_are_checked():
    """The snippets that save a picture and export a segmenter are recognised (so the test above
    checks their files)."""
    written = {name for b in SNIPPETS for name in _WRITES.findall(b.code)}
    assert {"photo.overlay.png", "segmenter.pth"} <= written
