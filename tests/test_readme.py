"""Every Python snippet in README.md runs as written, on the demo's outputs.

Each ```python block is executed on its own (a fresh namespace: a snippet must define what it uses)
in a working directory where `outputs/demo` is the session's quick demo (`python -m ovseg_jax.demo
--quick`, the same layout `make demo` writes) and the files a user brings are stand-ins: `photo.jpg`
(a val scene of the synthetic world) and, for the backbone snippet, Swin-B / R101c checkpoints in
the official layouts written from randomly initialised models.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

README = Path(__file__).resolve().parents[1] / "README.md"
_BLOCK = re.compile(r"^```python\n(.*?)^```", re.S | re.M)


def python_snippets(text: str) -> list[tuple[int, str]]:
    """README text -> [(line of the opening fence, code)] of its ```python blocks."""
    return [(text.count("\n", 0, m.start()) + 1, m.group(1)) for m in _BLOCK.finditer(text)]


SNIPPETS = python_snippets(README.read_text())


def test_the_readme_has_python_snippets():
    assert len(SNIPPETS) >= 5
    for line, code in SNIPPETS:
        compile(code, f"README.md:{line}", "exec")  # a syntax error names its line


def _write_backbone_checkpoints(directory: Path) -> None:
    """Swin-B in the official Swin `model` layout and R101c as detectron2's `R-103.pkl`, written from
    random models (the names the README's backbone snippet loads)."""
    import pickle  # noqa: PLC0415

    import torch  # noqa: PLC0415
    from flax import nnx  # noqa: PLC0415

    from ovseg_jax.convert.params import nnx_to_torch  # noqa: PLC0415
    from ovseg_jax.models.backbone import build_backbone  # noqa: PLC0415
    from ovseg_jax.models.swin import SwinConfig  # noqa: PLC0415

    swin = nnx_to_torch(build_backbone("swin", SwinConfig.swin_b(), rngs=nnx.Rngs(1)))
    torch.save({"model": {k: torch.from_numpy(np.asarray(v)) for k, v in swin.items()}},
               directory / "swin_base_patch4_window12_384_22k.pth")
    r101c = nnx_to_torch(build_backbone("resnet", rngs=nnx.Rngs(2)))
    with open(directory / "R-103.pkl", "wb") as f:
        pickle.dump({"model": {k: np.asarray(v) for k, v in r101c.items()}, "__author__": "test"}, f)


@pytest.fixture(scope="module")
def workspace(quick_demo, tmp_path_factory):
    """A working directory laid out as a user's after `make demo`, with the files a user brings."""
    demo_dir, _ = quick_demo
    root = tmp_path_factory.mktemp("readme")
    (root / "outputs").mkdir()
    (root / "outputs" / "demo").symlink_to(demo_dir, target_is_directory=True)
    val_image = sorted((demo_dir / "world" / "images" / "val").iterdir())[0]
    Image.open(val_image).convert("RGB").resize((160, 128)).save(root / "photo.jpg", quality=95)
    if any("R-103.pkl" in code for _, code in SNIPPETS):
        _write_backbone_checkpoints(root)
    return root


# Files a snippet says it writes: `.save("x.png")`, `export(model, "x.pth", ...)`.
_WRITES = re.compile(r'(?:\.save|export)\((?:[^()"]*, )?"([^"]+\.(?:png|pth|pt|safetensors))"')


@pytest.mark.parametrize("line,code", SNIPPETS, ids=[f"line{line}" for line, _ in SNIPPETS])
def test_readme_snippet_runs(line, code, workspace, monkeypatch):
    monkeypatch.chdir(workspace)
    written = _WRITES.findall(code)
    for name in written:
        (workspace / name).unlink(missing_ok=True)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, f"README.md:{line}", "exec"), namespace)  # noqa: S102
    for name in written:
        assert (workspace / name).stat().st_size > 0, f"README.md:{line} did not write {name}"


def test_snippets_that_write_files_are_checked():
    """The snippets that save a picture and export a segmenter are recognised (so the test above
    checks their files)."""
    written = {name for _, code in SNIPPETS for name in _WRITES.findall(code)}
    assert {"photo.overlay.png", "segmenter.pth"} <= written
