"""The data-generating process: a language built from known primitives, with exact ground truth."""

from devinterp.language.language import Language, Sample, load_language, parse_language, plogp
from devinterp.language.primitive import Firing, MinimalContext, Primitive
from devinterp.language.save_corpus import save_corpus
from devinterp.language.spec import SpecError

__all__ = [
    "Firing",
    "MinimalContext",
    "Language",
    "Primitive",
    "Sample",
    "SpecError",
    "load_language",
    "parse_language",
    "plogp",
    "save_corpus",
]
