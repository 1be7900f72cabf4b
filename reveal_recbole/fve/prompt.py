"""FVE step 1: the initial per-item prompt that conditions the image encoder.

REVEAL extracts an item's image feature *conditioned on a text prompt* so the encoder looks
for what users care about. The first prompt comes from metadata alone:

    An item image of a {category}. Item name: {title}. Users often mention: {keywords}.
    Focus on the overall appearance of the item.

``category`` is the most specific level of the item's category path, ``keywords`` are the
terms that distinguish this item's reviews (or its description when it has no reviews) from
the other items', found by TF-IDF across items (:func:`review_keywords`).
"""
from __future__ import annotations

import math
import re
import string
from collections import Counter
from typing import Mapping, Sequence

DEFAULT_TEMPLATE = (
    "An item image of a {category}. Item name: {title}. Users often mention: {keywords}. "
    "Focus on the overall appearance of the item."
)
# Fields a template may use; an item's metadata supplies them (keywords as a list or a string).
PROMPT_FIELDS = ("category", "title", "keywords", "brand")
# What an empty field reads as, so a prompt never says "Users often mention: ."
FIELD_DEFAULTS = {"category": "product", "title": "unknown", "keywords": "its overall look", "brand": "unknown"}

# Category paths come as lists, or joined by ">", "|" or a bare comma. Amazon level names
# contain ", " (e.g. "Tapes, Adhesives & Sealants"), so a comma followed by a space is not a
# separator. A path joined by spaces only (the bundled .item file's token_seq) cannot be split
# and is used whole.
_CATEGORY_SEPARATOR = re.compile(r"\s*(?:>|\||,(?!\s))\s*")
_WORD = re.compile(r"[a-z][a-z0-9'-]*[a-z0-9]")
MIN_KEYWORD_LENGTH = 3
# English function words and review boilerplate that TF-IDF alone would keep for short texts.
STOP_WORDS = frozenset(
    """a about above after again against all also am an and any are as at be because been before
    being below between both but by can could did do does doing down during each even ever every
    few for from further get gets got had has have having he her here hers him his how i if in
    into is it its itself just let me more most much my no nor not now of off on once only or
    other our ours out over own same she should so some such than that the their them then there
    these they this those through to too under until up upon us very was we were what when where
    which while who whom why will with would you your yours one two use used using item items
    product products really well get got make made bought buy buying good great nice like love
    work works worked don't doesn't didn't it's i'm i've can't won't""".split()
)


def check_template(template: str) -> list[str]:
    """The template's field names; a clear error on unknown or positional placeholders."""
    try:
        fields = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as error:
        raise ValueError(f"malformed prompt template {template!r}: {error}") from None
    unknown = sorted({name for name in fields if name not in PROMPT_FIELDS})
    if unknown:
        raise ValueError(
            f"unknown placeholder(s) {', '.join('{' + n + '}' for n in unknown)} in prompt template; "
            f"allowed: {', '.join('{' + n + '}' for n in PROMPT_FIELDS)}"
        )
    return fields


def item_category(categories: str | Sequence[str] | None) -> str:
    """The most specific level of a category path (its last non-empty level)."""
    if categories is None:
        return ""
    levels = _CATEGORY_SEPARATOR.split(categories) if isinstance(categories, str) else list(categories)
    levels = [level.strip() for level in levels if level and level.strip()]
    return levels[-1] if levels else ""


def _clean(value: str) -> str:
    return " ".join(str(value).split()).rstrip(" .")


def build_prompt(item_meta: Mapping[str, object], template: str = DEFAULT_TEMPLATE) -> str:
    """Fill ``template`` from an item's metadata.

    ``item_meta`` holds ``title``, ``categories`` (a path, see :func:`item_category`) or
    ``category``, ``keywords`` (list or string) and optionally ``brand``. Empty fields read as
    :data:`FIELD_DEFAULTS`.
    """
    check_template(template)
    keywords = item_meta.get("keywords") or ""
    if not isinstance(keywords, str):
        keywords = ", ".join(str(k) for k in keywords)
    category = item_meta.get("category") or item_category(item_meta.get("categories"))
    values = {
        "category": _clean(category),
        "title": _clean(item_meta.get("title") or ""),
        "keywords": _clean(keywords),
        "brand": _clean(item_meta.get("brand") or ""),
    }
    values = {field: value or FIELD_DEFAULTS[field] for field, value in values.items()}
    return template.format(**values)


def is_content_word(word: str) -> bool:
    """A lower-case word of at least three characters that is not a stop word."""
    return len(word) >= MIN_KEYWORD_LENGTH and word not in STOP_WORDS


def tokenize(text: str) -> list[str]:
    """Lower-case words of at least three characters, without stop words or pure numbers."""
    return [w for w in _WORD.findall(text.lower()) if is_content_word(w)]


def review_phrase(reviews: Sequence[str], min_reviews: int = 2) -> str:
    """The two-word phrase (adjacent content words, e.g. "red star") that the most reviews mention,
    or "" when none is in at least ``min_reviews`` of them; ties go to the alphabetically first.

    What users keep naming is the cue a prompt should point the encoder at, and a short phrase is
    the form caption-trained encoders (CLIP, the aligned head) read best. Each review counts a phrase once.
    """
    counts: Counter = Counter()
    for review in reviews:
        words = _WORD.findall(str(review).lower())
        counts.update({f"{a} {b}" for a, b in zip(words, words[1:]) if is_content_word(a) and is_content_word(b)})
    ranked = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return ranked[0][0] if ranked and ranked[0][1] >= min_reviews else ""


def keyword_text(reviews: Sequence[str] | None, description: str = "") -> list[str]:
    """The document keywords come from: the item's non-empty reviews, else its description."""
    texts = [review for review in reviews or () if review and review.strip()]
    return texts or ([description] if description and description.strip() else [])


def review_keywords(texts: Sequence[str | Sequence[str]], top_k: int = 5) -> list[list[str]]:
    """TF-IDF keywords per item, the document of item ``i`` being ``texts[i]``.

    Each document is an item's reviews (a string or a list of review strings), or its
    description when it has none (:func:`keyword_text`). Method, over unigrams from :func:`tokenize`:

    - tf(t, d) = count of t in d / number of terms in d;
    - idf(t) = ln((1 + N) / (1 + df(t))) + 1 (smoothed, as scikit-learn's), N = number of items;
    - keywords = the ``top_k`` terms of highest tf * idf, ties broken alphabetically, so the
      result is deterministic. Items without terms get an empty list.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    documents = [Counter(tokenize(t if isinstance(t, str) else "\n".join(t))) for t in texts]
    document_frequency = Counter(term for doc in documents for term in doc)
    n_documents = len(documents)
    keywords = []
    for doc in documents:
        length = sum(doc.values())
        scores = {
            term: count / length * (math.log((1 + n_documents) / (1 + document_frequency[term])) + 1)
            for term, count in doc.items()
        }
        keywords.append(sorted(scores, key=lambda term: (-scores[term], term))[:top_k])
    return keywords
