"""Registry of DGP primitives by their spec ``type``. Adding a primitive adds a file and a line."""

from devinterp.language.primitive import Primitive
from devinterp.language.primitives.bigram import Bigram
from devinterp.language.primitives.brackets import Brackets
from devinterp.language.primitives.category import CategoryTransition
from devinterp.language.primitives.induction import Induction
from devinterp.language.primitives.long_range import LongRange
from devinterp.language.primitives.quote import Quote
from devinterp.language.primitives.skip_trigram import SkipTrigram
from devinterp.language.primitives.token_trigram import TokenTrigram
from devinterp.language.primitives.topic import Topic

PRIMITIVES: dict[str, type[Primitive]] = {
    cls.kind: cls for cls in (CategoryTransition, Bigram, SkipTrigram, Induction, TokenTrigram, LongRange, Topic, Quote, Brackets)
}

__all__ = ["PRIMITIVES", "Bigram", "Brackets", "CategoryTransition", "Induction", "LongRange", "Quote", "SkipTrigram", "TokenTrigram", "Topic"]
