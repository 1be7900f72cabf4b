"""FVE step 1: the initial prompt and its TF-IDF review keywords."""
import pytest

from reveal_recbole.fve.prompt import (
    DEFAULT_TEMPLATE,
    build_prompt,
    check_template,
    item_category,
    keyword_text,
    review_keywords,
)


def test_build_prompt_fills_the_paper_template():
    meta = {
        "title": "Gorilla Super Glue Gel, 15 Gram, Clear.",
        "categories": ["Industrial & Scientific", "Tapes, Adhesives & Sealants", "Cyanoacrylate Adhesives"],
        "keywords": ["gel", "nozzle", "clear"],
    }
    assert build_prompt(meta) == (
        "An item image of a Cyanoacrylate Adhesives. Item name: Gorilla Super Glue Gel, 15 Gram, Clear. "
        "Users often mention: gel, nozzle, clear. Focus on the overall appearance of the item."
    )


def test_build_prompt_defaults_for_missing_fields():
    prompt = build_prompt({"title": "  Lab   Beaker "})
    assert prompt.startswith(
        "An item image of a product. Item name: Lab Beaker. Users often mention: its overall look."
    )


@pytest.mark.parametrize(
    "categories, expected",
    [
        ("Industrial & Scientific,Tapes, Adhesives & Sealants,Urethane Adhesives", "Urethane Adhesives"),
        ("Home > Kitchen > Mugs", "Mugs"),
        ("Beauty|Skin Care|", "Skin Care"),
        (["Toys", "", "Puzzles"], "Puzzles"),
        ("Industrial & Scientific Janitorial Supplies", "Industrial & Scientific Janitorial Supplies"),
        (None, ""),
    ],
)
def test_item_category_takes_the_most_specific_level(categories, expected):
    assert item_category(categories) == expected


def test_custom_template_and_unknown_placeholders():
    assert build_prompt({"title": "Mug", "brand": "Acme"}, "{brand} {title}") == "Acme Mug"
    assert check_template(DEFAULT_TEMPLATE) == ["category", "title", "keywords"]
    with pytest.raises(ValueError, match=r"unknown placeholder\(s\) \{colour\}.*allowed"):
        build_prompt({"title": "Mug"}, "A {colour} {title}")
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_template("An item {0}")
    with pytest.raises(ValueError, match="malformed prompt template"):
        check_template("An item {title")


def test_review_keywords_prefers_terms_specific_to_the_item():
    texts = [
        ["The glue dries clear and the nozzle never clogs.", "Clear glue, great nozzle!"],
        "The tape is strong and the tape roll is wide.",
        ["This glue is strong."],
        "",
    ]
    keywords = review_keywords(texts, top_k=2)
    # "clear" and "nozzle" occur twice in item 0 and nowhere else; "glue" also occurs in item 2.
    assert keywords[0] == ["clear", "nozzle"]
    assert keywords[1][0] == "tape"
    assert keywords[3] == []
    assert review_keywords(texts, top_k=2) == keywords  # deterministic


def test_review_keywords_tf_idf_values():
    # Item 0: "alpha alpha beta", item 1: "beta gamma". N = 2.
    # idf(alpha) = ln(3/2) + 1, idf(beta) = ln(3/3) + 1 = 1.
    # item 0: alpha 2/3 * 1.405 = 0.937 > beta 1/3; item 1: gamma 0.703 > beta 0.5.
    assert review_keywords(["alpha alpha beta", "beta gamma"], top_k=3) == [["alpha", "beta"], ["gamma", "beta"]]
    with pytest.raises(ValueError):
        review_keywords(["x"], top_k=0)


def test_keyword_text_falls_back_to_the_description():
    assert keyword_text(["Great nozzle", "  "], "A glue.") == ["Great nozzle"]
    assert keyword_text([], "A glue.") == ["A glue."]
    assert keyword_text(None, "") == []
