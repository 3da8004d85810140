"""Nouns from captions, for mining mask-category pairs (reference 4.1; `ovseg_jax.mine_pairs`).

An extractor is any callable `caption -> [Noun, ...]` (each noun once, in caption order):

- `VocabularyNouns(vocabulary)` (the offline default) matches caption words and multi-word phrases
  against a noun vocabulary, longest phrase first, plurals folded ("two zebras" -> "zebra", "wine
  glasses" -> "wine glass", "men" -> "man"). A vocabulary maps each term to its class; a term is
  what the pair's noun is (the caption's word in the vocabulary's spelling), the class is for
  statistics. Vocabulary files hold one class per line, `class` or `class: synonym, synonym`.
  Defaults: `coco_vocabulary()` (COCO-Stuff's 171 classes in caption wording, e.g. "brick wall" for
  `wall-brick`, plus `COCO_SYNONYMS`), `synthetic` (the generated world's 20 class names).
- `NltkNouns()`: NLTK's part-of-speech tagger (nouns NN/NNS, consecutive ones joined into a
  compound such as "fire hydrant"), lemmatised with WordNet when its data is present, else by the
  plural rules below. Needs `pip install nltk` and its data; raises ImportError / LookupError
  saying how to get them.
- `"module:function"`: any importable callable with the same signature (returning strings or Nouns).
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple, Sequence


class Noun(NamedTuple):
    text: str  # the pair's noun: the vocabulary term that matched (or NLTK's lemma)
    cls: str  # the class it belongs to (the term itself without a vocabulary)


Extractor = Callable[[str], list[Noun]]

_WORD = re.compile(r"[a-z0-9]+")
IRREGULAR = {"men": "man", "women": "woman", "people": "person", "children": "child", "feet": "foot",
             "teeth": "tooth", "mice": "mouse", "geese": "goose", "oxen": "ox", "knives": "knife",
             "leaves": "leaf", "shelves": "shelf", "wolves": "wolf", "loaves": "loaf", "calves": "calf",
             "halves": "half", "scarves": "scarf", "wives": "wife", "lives": "life", "policemen": "policeman",
             "skis": "ski", "buses": "bus", "glasses": "glass", "boxes": "box", "dishes": "dish",
             "benches": "bench", "sandwiches": "sandwich", "kites": "kite", "bushes": "bush"}


def words(text: str) -> list[str]:
    """Lower-case words (letters and digits); punctuation and hyphens separate words."""
    return _WORD.findall(text.lower())


def singular_forms(word: str) -> set[str]:
    """The word and each singular it may be the plural of: "ties" -> {ties, tie, ty}, "men" -> {men, man}."""
    forms = {word}
    if word in IRREGULAR:
        forms.add(IRREGULAR[word])
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        forms.add(word[:-1])
        if word.endswith("es"):
            forms.add(word[:-2])
        if word.endswith("ies"):
            forms.add(word[:-3] + "y")
        if word.endswith("ves"):
            forms.update({word[:-3] + "f", word[:-3] + "fe"})
    return forms


def singular(word: str) -> str:
    """The most likely singular of one word without a dictionary (irregulars, -ies, -ches/-shes/-xes/-ses, -s)."""
    if word in IRREGULAR:
        return IRREGULAR[word]
    if len(word) <= 3 or not word.endswith("s") or word.endswith(("ss", "us", "is")):
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith(("ches", "shes", "xes", "sses", "zzes")):
        return word[:-2]
    return word[:-1]


class VocabularyNouns:
    """Caption -> the vocabulary terms it mentions (see the module docstring).

    vocabulary: `{term: class}`; terms of several words match as phrases. A caption word matches a
    term word when one of its `singular_forms` equals one of the term word's (so "clouds" matches
    the term "cloud" and "cloud" the term "clouds")."""

    def __init__(self, vocabulary: Mapping[str, str]):
        if not vocabulary:
            raise ValueError("the noun vocabulary is empty")
        self.vocabulary = dict(vocabulary)
        self._by_form: dict[str, set[str]] = {}  # a singular form -> the term words having it
        self._terms: dict[tuple[str, ...], str] = {}  # term words -> term
        for term in self.vocabulary:
            key = tuple(words(term))
            if not key:
                raise ValueError(f"vocabulary term {term!r} has no words")
            self._terms.setdefault(key, term)
            for w in key:
                for form in singular_forms(w):
                    self._by_form.setdefault(form, set()).add(w)
        self._longest = max(len(k) for k in self._terms)

    def _term_words(self, word: str) -> list[str]:
        """The term words `word` may stand for: itself first, then the others in sorted order."""
        found = set().union(*(self._by_form.get(f, set()) for f in singular_forms(word)))
        return sorted(found, key=lambda w: (w != word, w))

    def _match_at(self, tokens: list[list[str]], i: int) -> tuple[int, str] | None:
        """The longest term starting at token i -> (its length, term), else None."""
        for n in range(min(self._longest, len(tokens) - i), 0, -1):
            candidates = [()]
            for options in tokens[i:i + n]:
                candidates = [c + (w,) for c in candidates for w in options]
            for key in candidates:
                if key in self._terms:
                    return n, self._terms[key]
        return None

    def __call__(self, caption: str) -> list[Noun]:
        tokens = [self._term_words(w) for w in words(caption)]
        found: dict[str, Noun] = {}
        i = 0
        while i < len(tokens):
            match = self._match_at(tokens, i) if tokens[i] else None
            if match is None:
                i += 1
                continue
            n, term = match
            found.setdefault(term, Noun(term, self.vocabulary[term]))
            i += n
        return list(found.values())


NLTK_HINT = ("pip install nltk, then fetch its tagger data: python -m nltk.downloader averaged_perceptron_tagger_eng "
             "(and wordnet for lemmas); or use nouns.extractor='vocabulary' (offline)")


class NltkNouns:
    """Caption -> nouns by NLTK part-of-speech tags (NN/NNS; runs of them form one compound noun).

    tagger: `list[str] -> list[(word, tag)]`, default `nltk.pos_tag` (checked at construction).
    lemmatize: `str -> str` for the compound's last word, default WordNet's noun lemmatiser when
    its data is present, else `singular`."""

    def __init__(self, tagger: Callable[[list[str]], list[tuple[str, str]]] | None = None,
                 lemmatize: Callable[[str], str] | None = None):
        if tagger is None:
            try:
                import nltk  # noqa: PLC0415  (optional dependency)
            except ImportError:
                raise ImportError(f"nouns.extractor='nltk' needs NLTK: {NLTK_HINT}") from None
            try:
                nltk.pos_tag(["a", "dog"])
            except LookupError as e:
                raise LookupError(f"NLTK's tagger data is missing ({str(e).strip().splitlines()[0]}): {NLTK_HINT}") \
                    from None
            tagger = nltk.pos_tag
            if lemmatize is None:
                lemmatize = _wordnet_lemmatizer(nltk)
        self.tagger, self.lemmatize = tagger, lemmatize or singular

    def __call__(self, caption: str) -> list[Noun]:
        tagged = self.tagger(words(caption))
        found: dict[str, Noun] = {}
        run: list[str] = []
        for word, tag in list(tagged) + [("", ".")]:
            if tag in ("NN", "NNS"):
                run.append(word)
                continue
            if run:
                noun = " ".join(run[:-1] + [self.lemmatize(run[-1])])
                found.setdefault(noun, Noun(noun, noun))
            run = []
        return list(found.values())


def _wordnet_lemmatizer(nltk) -> Callable[[str], str] | None:
    try:
        lemmatizer = nltk.stem.WordNetLemmatizer()
        lemmatizer.lemmatize("dogs")
    except LookupError:
        return None
    return lambda w: lemmatizer.lemmatize(w, "n")


# ------------------------------------------------------------------------------- vocabularies

# Caption wording of COCO-Stuff classes whose names are not what captions say: `wall-brick` ->
# "brick wall"; the other "a-b" names drop their suffix ("building-other" -> "building").
_COCO_TERMS = {"wall-brick": "brick wall", "wall-concrete": "concrete wall", "wall-panel": "wall panel",
               "wall-stone": "stone wall", "wall-tile": "tile wall", "wall-wood": "wooden wall",
               "floor-marble": "marble floor", "floor-stone": "stone floor", "floor-tile": "tile floor",
               "floor-wood": "wood floor", "ceiling-tile": "tile ceiling", "window-blind": "blind",
               "playingfield": "field", "sports ball": "ball"}
# Synonyms frequent in COCO Captions (hand-written; each maps to one class, none is another class's term).
COCO_SYNONYMS = {
    "person": ("man", "woman", "boy", "girl", "child", "kid", "baby", "guy", "lady", "player", "people", "skier",
               "surfer", "skateboarder", "snowboarder", "rider", "policeman", "officer", "adult", "crowd"),
    "bicycle": ("bike", "cyclist"), "car": ("taxi", "suv", "van"), "motorcycle": ("motorbike", "motor bike", "scooter"),
    "airplane": ("plane", "jet", "aircraft", "airliner"), "bus": ("double decker",), "train": ("locomotive",),
    "truck": ("pickup", "lorry"), "boat": ("ship", "sailboat", "canoe", "kayak", "yacht"),
    "traffic light": ("stoplight", "traffic signal"), "fire hydrant": ("hydrant",), "bench": ("park bench",),
    "bird": ("pigeon", "seagull", "gull", "duck", "parrot"), "cat": ("kitten", "kitty"), "dog": ("puppy",),
    "horse": ("pony",), "sheep": ("lamb",), "cow": ("cattle", "bull", "calf"), "handbag": ("purse", "bag"),
    "tie": ("necktie",), "suitcase": ("luggage",), "skis": ("ski",), "sports ball": ("soccer ball", "tennis ball"),
    "tennis racket": ("racket", "racquet"), "baseball glove": ("mitt", "glove"), "cup": ("mug",), "donut": ("doughnut",), "couch": ("sofa",), "dining table": ("kitchen table",),
    "tv": ("television",), "laptop": ("computer",), "cell phone": ("phone", "cellphone", "smartphone"),
    "refrigerator": ("fridge",), "teddy bear": ("teddy", "stuffed animal"), "hair drier": ("hair dryer",),
    "clouds": ("cloud",), "sea": ("ocean",), "river": ("stream", "creek"), "road": ("street", "highway"),
    "pavement": ("sidewalk",), "grass": ("lawn",), "sand": ("beach",), "dirt": ("soil",), "rock": ("boulder",),
    "water-other": ("water", "lake", "pond"), "sky-other": ("sky",), "tree": ("forest",),
    "building-other": ("building", "tower"), "house": ("home",), "light": ("lamp",), "carpet": ("rug",),
    "window-other": ("window",), "door-stuff": ("door",),
    "plant-other": ("plant",), "food-other": ("food", "meal"), "clothes": ("shirt", "jacket", "coat", "dress"),
}


def _coco_term(name: str) -> str:
    if name in _COCO_TERMS:
        return _COCO_TERMS[name]
    return name.split("-")[0] if "-" in name else name


def coco_vocabulary() -> dict[str, str]:
    """COCO-Stuff 171 in caption wording plus `COCO_SYNONYMS` -> `{term: COCO-Stuff class}`."""
    from ovseg_jax.data.registry import class_names  # noqa: PLC0415

    vocabulary: dict[str, str] = {}
    for name in class_names("coco_stuff_171"):
        for term in (_coco_term(name), *COCO_SYNONYMS.get(name, ())):
            vocabulary.setdefault(term, name)  # the first class claiming a term keeps it
    return vocabulary


def read_vocabulary(path: str | Path) -> dict[str, str]:
    """A vocabulary file (one class per line: `class` or `class: synonym, synonym`; `#` comments)
    -> `{term: class}`."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: noun vocabulary file not found; expected one class per line, "
                                "'class' or 'class: synonym, synonym'")
    vocabulary: dict[str, str] = {}
    for line_no, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, _, rest = line.partition(":")
        terms = [name.strip()] + [t.strip() for t in rest.split(",") if t.strip()]
        if not words(terms[0]):
            raise ValueError(f"{path}:{line_no}: class {terms[0]!r} has no words")
        for term in terms:
            vocabulary.setdefault(term, terms[0])
    if not vocabulary:
        raise ValueError(f"{path}: no classes in the vocabulary file")
    return vocabulary


def vocabulary(spec: str | Sequence[str] | Mapping[str, str]) -> dict[str, str]:
    """"coco", "synthetic", a vocabulary file, a list of names or a `{term: class}` mapping -> `{term: class}`."""
    if isinstance(spec, Mapping):
        return dict(spec)
    if not isinstance(spec, str):
        return {n: n for n in spec}
    if spec == "coco":
        return coco_vocabulary()
    if spec == "synthetic":
        from ovseg_jax.data import synthetic  # noqa: PLC0415

        return {n: n for n in synthetic.CLASS_NAMES}
    return read_vocabulary(spec)


def make_extractor(kind: str, vocabulary_spec: str | Iterable[str] | Mapping[str, str] = "coco") -> Extractor:
    """"vocabulary" (with `vocabulary_spec`), "nltk" or "module:function" -> an extractor."""
    if kind == "vocabulary":
        return VocabularyNouns(vocabulary(vocabulary_spec))
    if kind == "nltk":
        return NltkNouns()
    if ":" in kind:
        module, _, name = kind.partition(":")
        function = getattr(importlib.import_module(module), name)
        return lambda caption: [n if isinstance(n, Noun) else Noun(str(n), str(n)) for n in function(caption)]
    raise ValueError(f"nouns.extractor={kind!r}: expected 'vocabulary', 'nltk' or 'module:function'")
