"""Text side of OVSeg: CLIP's BPE tokenizer and the ViLD prompt templates.

The BPE itself is transformers' `CLIPTokenizer` (byte-level BPE, lower-casing); we add OpenAI's
`basic_clean` + `whitespace_clean` (ftfy.fix_text, double HTML unescape, whitespace collapse), a fixed context
length, and truncation that keeps the end-of-text token (OpenAI's tokenizer raises instead).
"""

from __future__ import annotations

import gzip
import html
import json
import re
import tempfile
import warnings
from pathlib import Path
from typing import Iterable, Sequence

import ftfy
import numpy as np

# Reference section 2: the 14 ViLD templates, exact spelling (some lack the final period).
VILD_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "This is a photo of a {}",
    "There is a {} in the scene",
    "There is the {} in the scene",
    "a photo of a {} in the scene",
    "a photo of a small {}.",
    "a photo of a medium {}.",
    "a photo of a large {}.",
    "This is a photo of a small {}.",
    "This is a photo of a medium {}.",
    "This is a photo of a large {}.",
    "There is a small {} in the scene.",
    "There is a medium {} in the scene.",
    "There is a large {} in the scene.",
)

# The 80 prompt templates of CLIP's ImageNet zero-shot evaluation (Radford et al. 2021), which the
# original offers as its third template set (reference 2; appendix B compares them with ViLD's).
IMAGENET80_TEMPLATES: tuple[str, ...] = (
    "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.", "a photo of the hard to see {}.",
    "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.", "a bad photo of the {}.",
    "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.", "a photo of a hard to see {}.",
    "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.", "a dark photo of the {}.",
    "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.",
    "a painting of a {}.", "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.",
    "a cropped photo of a {}.", "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.",
    "a blurry photo of the {}.", "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.",
    "a {} in a video game.", "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.",
    "a photo of a {}.", "the origami {}.", "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.",
    "a origami {}.", "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.",
    "a photo of the clean {}.", "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.",
    "a photo of a weird {}.", "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.",
    "a embroidered {}.", "a pixelated photo of a {}.", "itap of the {}.", "a jpeg corrupted photo of the {}.",
    "a good photo of a {}.", "a plushie {}.", "a photo of the nice {}.", "a photo of the small {}.",
    "a photo of the weird {}.", "the cartoon {}.", "art of the {}.", "a drawing of the {}.",
    "a photo of the large {}.", "a black and white photo of a {}.", "the plushie {}.", "a dark photo of a {}.",
    "itap of a {}.", "graffiti of the {}.", "a toy {}.", "itap of my {}.", "a photo of a cool {}.",
    "a photo of a small {}.", "a tattoo of the {}.",
)

TEMPLATE_SETS = {"vild": VILD_TEMPLATES, "single": ("a photo of a {}.",), "imagenet80": IMAGENET80_TEMPLATES}

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
OPENAI_NUM_MERGES = 49152 - 256 - 2  # merges used by OpenAI's tokenizer (48,894)


def templates(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Resolve a template set name ("vild", "single", "imagenet80"), one template ("a {}") or a
    sequence of `{}` strings -> the templates."""
    if isinstance(spec, str) and "{}" in spec:
        spec = (spec,)
    if isinstance(spec, str):
        try:
            return TEMPLATE_SETS[spec]
        except KeyError:
            raise ValueError(f"unknown template set {spec!r}; expected one of {sorted(TEMPLATE_SETS)} "
                             "or a list of strings with one '{}'") from None
    spec = tuple(spec)
    bad = [t for t in spec if t.count("{}") != 1]
    if not spec or bad:
        raise ValueError(f"templates must each contain exactly one '{{}}'; got {bad or spec!r}")
    return spec


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP byte -> printable unicode symbol table (the first 256 vocabulary entries)."""
    bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("\xa1"), ord("\xac") + 1))
          + list(range(ord("\xae"), ord("\xff") + 1)))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _write_vocab(directory: Path, merges: list[tuple[str, str]]) -> Path:
    base = list(bytes_to_unicode().values())
    vocab = base + [b + "</w>" for b in base] + ["".join(m) for m in merges] + [SOT, EOT]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (directory / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return directory


def convert_openai_bpe(bpe_path: str | Path, directory: str | Path) -> Path:
    """Turn OpenAI's `bpe_simple_vocab_16e6.txt.gz` into `vocab.json` + `merges.txt` (49,408
    tokens, ids identical to OpenAI's tokenizer)."""
    bpe_path = Path(bpe_path)
    try:
        lines = gzip.open(bpe_path).read().decode("utf-8").split("\n")
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise ValueError(f"{bpe_path}: not a readable gzip BPE merges file: {e}") from None
    merges = [tuple(line.split()) for line in lines[1:1 + OPENAI_NUM_MERGES]]
    if len(merges) != OPENAI_NUM_MERGES or any(len(m) != 2 for m in merges):
        raise ValueError(f"{bpe_path}: expected {OPENAI_NUM_MERGES} merge lines of two symbols "
                         f"after the header, found {len(merges)}")
    return _write_vocab(Path(directory), merges)


def write_word_vocab(words: Iterable[str], directory: str | Path) -> Path:
    """Write a small CLIP-format vocabulary (`vocab.json`, `merges.txt`) for a closed word list.

    Every byte stays encodable; merges are added so that each given (lower-case) word is built
    from its characters, which makes most words a single token. Meant for the synthetic world
    and tests, where the 49k OpenAI vocabulary would only inflate the embedding table.
    """
    merges: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    for word in sorted({w.lower() for text in words for w in re.findall(r"[a-z]+", text.lower())}):
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        left = pieces[0]
        for right in pieces[1:]:
            if (left, right) not in seen:
                seen.add((left, right))
                merges.append((left, right))
            left = left + right
    return _write_vocab(Path(directory), merges)


def _clean(text: str) -> str:
    """OpenAI's `whitespace_clean(basic_clean(text))` (ftfy is a dependency: without it, e.g.
    full-width letters would not be folded to ASCII as OpenAI's tokenizer does)."""
    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text))
    return re.sub(r"\s+", " ", text).strip()


class Tokenizer:
    """CLIP tokenizer: `tok(texts) -> int32 [N, context_length]`, `[SOT] + bpe + [EOT]`, zero-padded.

    Text longer than the context is truncated to `context_length - 1` tokens plus EOT, with
    one warning per tokenizer.
    """

    def __init__(self, hf_tokenizer, context_length: int = 77):
        self.hf = hf_tokenizer
        self.context_length = context_length
        self.sot_token_id = hf_tokenizer.convert_tokens_to_ids(SOT)
        self.eot_token_id = hf_tokenizer.convert_tokens_to_ids(EOT)
        self.vocab_size = len(hf_tokenizer)
        self._warned = False

    @classmethod
    def from_dir(cls, directory: str | Path, context_length: int = 77) -> "Tokenizer":
        """From a directory with `vocab.json` + `merges.txt` (or a transformers `tokenizer.json`)."""
        from transformers import CLIPTokenizer  # noqa: PLC0415

        directory = Path(directory)
        has_bpe = (directory / "vocab.json").is_file() and (directory / "merges.txt").is_file()
        if has_bpe or (directory / "tokenizer.json").is_file():
            hf = CLIPTokenizer.from_pretrained(str(directory))
        else:
            raise FileNotFoundError(
                f"{directory}: no tokenizer files; expected vocab.json + merges.txt or tokenizer.json "
                "(or pass an OpenAI bpe_simple_vocab_16e6.txt.gz to Tokenizer.from_openai_bpe)")
        return cls(hf, context_length)

    @classmethod
    def from_openai_bpe(cls, bpe_path: str | Path, context_length: int = 77) -> "Tokenizer":
        """From OpenAI's `bpe_simple_vocab_16e6.txt.gz` (shipped with the CLIP/open_clip packages)."""
        with tempfile.TemporaryDirectory() as tmp:
            return cls.from_dir(convert_openai_bpe(bpe_path, tmp), context_length)

    @classmethod
    def load(cls, spec: "str | Path | Tokenizer", context_length: int = 77) -> "Tokenizer":
        """A Tokenizer from an instance, a tokenizer directory or an OpenAI `.txt.gz` BPE file."""
        if isinstance(spec, Tokenizer):
            return spec
        path = Path(spec)
        if path.is_file() and path.name.endswith(".gz"):
            return cls.from_openai_bpe(path, context_length)
        if path.is_dir():
            return cls.from_dir(path, context_length)
        raise FileNotFoundError(f"{path}: not a tokenizer directory or a .txt.gz BPE file")

    def save(self, directory: str | Path) -> None:
        self.hf.save_pretrained(str(directory))

    def __call__(self, texts: str | Sequence[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        ids = self.hf([_clean(t) for t in texts], add_special_tokens=False)["input_ids"]
        out = np.zeros((len(texts), self.context_length), np.int32)
        room = self.context_length - 2
        for row, toks in enumerate(ids):
            if len(toks) > room:
                if not self._warned:
                    warnings.warn(f"text longer than the context length {self.context_length} was "
                                  f"truncated (keeping the end-of-text token): {texts[row][:60]!r}...",
                                  stacklevel=2)
                    self._warned = True
                toks = toks[:room]
            seq = [self.sot_token_id, *toks, self.eot_token_id]
            out[row, :len(seq)] = seq
        return out


def _has_tokenizer_files(path: str) -> bool:
    return bool(path) and Path(path).is_dir() and any((Path(path) / f).is_file() for f in ("vocab.json", "tokenizer.json"))


def tokenizer_path(config) -> str:
    """A CLIP stage's tokenizer: `config.data.tokenizer`, or when it is "" a transformers CLIP `init_from` with its own
    tokenizer files ("" if neither)."""
    tokenizer = config.data.get("tokenizer") or ""
    init = config.get("init_from") or ""
    return tokenizer or (init if _has_tokenizer_files(init) else "")
