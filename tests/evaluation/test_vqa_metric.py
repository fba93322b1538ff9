"""Tests for leverplus.evaluation.vqa_metric: the official VQA accuracy (GT-Vision-Lab/VQA vqaEval.py), post-processing,
the fallback match and answer relevance. Expected values are worked out by hand in the comments."""

from __future__ import annotations

import math

import pytest

from leverplus.errors import LeverPlusInputError
from leverplus.evaluation.vqa_metric import (
    CONTRACTIONS,
    PUNCTUATION,
    answer_relevance,
    edit_similarity,
    fallback_match,
    normalize_answer,
    process_digit_article,
    process_punctuation,
    token_f1,
    vqa_accuracy,
    vqa_correct,
    vqa_postprocess,
)

# ----------------------------------------------------------------------------------------------------------
# processPunctuation
# ----------------------------------------------------------------------------------------------------------


def test_punctuation_list_is_the_official_one():
    # The official list has 21 characters; ":" and "'" and "." are NOT in it.
    assert PUNCTUATION == (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<",
                           "@", "`", ",", "?", "!")
    assert process_punctuation("x:y") == "x:y"
    assert process_punctuation("x'y") == "x'y"


@pytest.mark.parametrize("p", PUNCTUATION)
def test_each_punctuation_char_not_touching_space_becomes_space(p):
    # "x<p>y": p touches no space and there is no digit,digit -> replaced by " " -> "x y"
    assert process_punctuation(f"x{p}y") == "x y"
    assert normalize_answer(f"x{p}y") == "x y"


@pytest.mark.parametrize("p", PUNCTUATION)
def test_each_punctuation_char_touching_space_is_deleted_everywhere(p):
    # "x<p>y <p>z": " <p>" occurs, so EVERY <p> is deleted (also the one between x and y) -> "xy z"
    assert process_punctuation(f"x{p}y {p}z") == "xy z"
    # "x<p>y<p> z": "<p> " occurs -> "xy z"
    assert process_punctuation(f"x{p}y{p} z") == "xy z"


def test_punctuation_decision_uses_the_input_text_per_character():
    # "-" touches a space (deleted everywhere); "/" does not (becomes a space):
    # "a/b-c -d" -> "a b-c -d" -> "a bc d"
    assert process_punctuation("a/b-c -d") == "a bc d"


def test_digit_comma_digit_deletes_all_punctuation():
    # "1,000" matches (\d)(,)(\d) -> "," deleted (not replaced) -> "1000"
    assert normalize_answer("1,000") == "1000"
    # with a digit-comma-digit anywhere, every punctuation char is deleted: "1,000-2/3" -> "10002" + "3"
    assert process_punctuation("1,000-2/3") == "100023"
    # without digits on both sides the comma becomes a space: "red,white" -> "red white"
    assert normalize_answer("red,white") == "red white"
    assert normalize_answer("1,x") == "1 x"


def test_periods_between_digits_kept_others_removed():
    assert normalize_answer("3.5") == "3.5"  # "." followed by a digit stays
    assert normalize_answer(".5") == ".5"  # still followed by a digit
    assert normalize_answer("dog.") == "dog"  # deleted, not replaced
    assert normalize_answer("3.") == "3"
    assert normalize_answer("u.s.a.") == "usa"  # deleted, not replaced by spaces
    assert normalize_answer("3.x") == "3x"


def test_period_strip_stops_after_32_periods_like_the_official_call():
    # official: periodStrip.sub("", text, re.UNICODE) -> count = re.UNICODE = 32; 40 - 32 = 8 periods stay
    assert process_punctuation("x" + "." * 40) == "x" + "." * 8
    assert process_punctuation("x" + "." * 32) == "x"


# ----------------------------------------------------------------------------------------------------------
# processDigitArticle
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "word, digit",
    [("none", "0"), ("zero", "0"), ("one", "1"), ("two", "2"), ("three", "3"), ("four", "4"), ("five", "5"),
     ("six", "6"), ("seven", "7"), ("eight", "8"), ("nine", "9"), ("ten", "10")],
)
def test_number_words(word, digit):
    assert normalize_answer(word) == digit
    assert normalize_answer(word.upper()) == digit  # lower-cased first


def test_number_words_only_whole_words_up_to_ten():
    assert normalize_answer("eleven") == "eleven"
    assert normalize_answer("twenty two") == "twenty 2"
    assert normalize_answer("someone") == "someone"


def test_articles_dropped_only_as_whole_words():
    assert normalize_answer("the dog") == "dog"
    assert normalize_answer("A Dog") == "dog"
    assert normalize_answer("an apple") == "apple"
    assert normalize_answer("a an the") == ""
    assert normalize_answer("theater") == "theater"


@pytest.mark.parametrize(
    "raw, expanded",
    [
        ("dont", "don't"),  # n't
        ("isnt", "isn't"),
        ("cant", "can't"),
        ("wont", "won't"),
        ("ive", "ive"),  # key is "Ive": unreachable after lower-casing
        ("im", "im"),  # key is "Im": unreachable
        ("youve", "you've"),  # 've
        ("hed", "he'd"),  # 'd
        ("itll", "it'll"),  # 'll
        ("whats", "what's"),  # 's
        ("theyre", "they're"),  # 're
        ("maam", "ma'am"),  # 'am
        ("oclock", "o'clock"),
        ("yall", "y'all"),
        ("twas", "'twas"),
        ("couldnt've", "couldn't've"),  # two-level
        ("hed've", "he'd've"),
        ("y'allll", "y'all'll"),
        ("somebody'd", "somebodyd"),  # official table quirk
        ("don't", "don't"),  # already contracted: unchanged
        ("Dont", "don't"),  # lower-cased first
    ],
)
def test_contractions(raw, expanded):
    assert normalize_answer(raw) == expanded


def test_contraction_table_size_and_quirky_keys():
    assert len(CONTRACTIONS) == 120
    assert {"Id've", "I'dve", "Im", "Ive"} <= set(CONTRACTIONS)
    # contractions are applied after articles are dropped and number words mapped: "the dont one" -> "don't 1"
    assert normalize_answer("the dont one") == "don't 1"


def test_case_and_whitespace():
    assert normalize_answer("YES") == "yes"
    assert normalize_answer("yes\nno") == "yes no"
    assert normalize_answer("\tyes \n") == "yes"
    assert normalize_answer("  two   dogs  ") == "2 dogs"
    # the tab becomes a space BEFORE processPunctuation, so "-" then touches a space and is deleted:
    # "x-y\t-z" -> "x-y -z" -> "xy z" (it would be "x y z" without the tab rule)
    assert normalize_answer("x-y\t-z") == "xy z"
    assert process_digit_article(process_punctuation("x-y\t-z")) == "x y z"


# ----------------------------------------------------------------------------------------------------------
# vqa_accuracy
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m, expected",
    # acc = [(10-m)*min(1, m/3) + m*min(1, (m-1)/3)] / 10
    # m=1: 9*(1/3)/10 = .3; m=2: (8*2/3 + 2*1/3)/10 = 6/10; m=3: (7*1 + 3*2/3)/10 = .9; m=4: (6 + 4)/10 = 1
    [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (5, 1.0), (6, 1.0), (7, 1.0), (8, 1.0), (9, 1.0),
     (10, 1.0)],
)
def test_m_matching_annotators_out_of_10(m, expected):
    gts = ["yes"] * m + ["no"] * (10 - m)
    assert vqa_accuracy("yes", gts) == expected
    assert vqa_correct(vqa_accuracy("yes", gts)) == int(m > 0)


def test_leave_one_out_by_position_even_for_identical_strings():
    # 3 annotators ["yes","yes","no"], pred "yes":
    # j=0 others (yes,no) -> 1/3; j=1 -> 1/3; j=2 others (yes,yes) -> 2/3; mean = (4/3)/3 = 4/9 = 0.4444..
    # -> round(44.444.., 2) = 44.44 -> 0.4444
    assert vqa_accuracy("yes", ["yes", "yes", "no"]) == pytest.approx(0.4444, abs=1e-12)
    # 7 annotators, one "yes": 6 * (1/3) / 7 = 2/7 = 0.285714.. -> 28.57 -> 0.2857
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 6) == pytest.approx(0.2857, abs=1e-12)
    # a single annotator never has another to agree with: 0
    assert vqa_accuracy("yes", ["yes"]) == 0.0


# The cases below are worked out by hand from vqaEval.py at a013f00 ("Fixed processing answers bug", 2021-03-11):
#   clean = newline/tab -> space, strip (prediction and every GT);
#   if len(set(cleaned GTs)) > 1: processPunctuation then processDigitArticle on every GT and on the prediction;
#   acc = mean over annotators j of min(1, #{k != j : gt_k == pred} / 3).
# With m matching annotators out of n: a matching j sees m-1 matches, a non-matching one m, so
#   acc = [m·min(1, (m-1)/3) + (n-m)·min(1, m/3)] / n   (n = 10: m = 1 -> .3, 2 -> .6, 3 -> .9, >= 4 -> 1).
# "old" is the revision leverplus followed before (458a8b2, 2016): prediction always fully normalised, GTs only
# processPunctuation (and only when they differ), GTs never stripped. lever_plus: always normalise both sides.


def both(pred, gts):
    return (vqa_accuracy(pred, gts), vqa_accuracy(pred, gts, normalization="lever_plus"))


def test_all_identical_gts_normalise_nothing():
    # 10 x "yes": one distinct GT -> no normalisation at all; "Yes" != "yes" -> 0 matches -> 0.
    # lever_plus: "Yes" -> "yes" == "yes" x10: every j sees 9 matches -> 1. (old: pred "yes" -> 1)
    assert both("Yes", ["yes"] * 10) == (0.0, 1.0)
    # the other way round: "yes" != "Yes" -> 0 (old: pred "yes" vs untouched "Yes" -> 0 as well); lever_plus 1
    assert both("yes", ["Yes"] * 10) == (0.0, 1.0)
    # punctuation matters: "dog." != "dog" -> 0; lever_plus "dog" == "dog" -> 1
    assert both("dog.", ["dog"] * 10) == (0.0, 1.0)
    # the identical raw string always matches: "Dog." == "Dog." -> 1 (old: pred -> "dog" != "Dog." -> 0)
    assert both("Dog.", ["Dog."] * 10) == (1.0, 1.0)
    # number words: "two" == "two" -> 1 (old: pred -> "2" -> 0); "2" != "two" -> 0 (lever_plus: "2" == "2" -> 1)
    assert both("two", ["two"] * 10) == (1.0, 1.0)
    assert both("2", ["two"] * 10) == (0.0, 1.0)
    # articles: "dog" != "the dog" -> 0; lever_plus drops "the" -> 1
    assert both("dog", ["the dog"] * 10) == (0.0, 1.0)
    # contractions: "dont know" != "don't know" -> 0; lever_plus "dont" -> "don't" -> 1
    assert both("dont know", ["don't know"] * 10) == (0.0, 1.0)
    # digit-comma-digit: "1000" != "1,000" -> 0; "1,000" == "1,000" -> 1
    assert both("1000", ["1,000"] * 10) == (0.0, 1.0)
    assert both("1,000", ["1,000"] * 10) == (1.0, 1.0)


def test_identity_is_decided_after_cleaning_and_cleaning_always_applies():
    # GTs 9 x "yes" + "yes\n": cleaned -> 10 x "yes", ONE distinct answer -> no normalisation; "Yes" -> 0.
    # lever_plus: "yes" x10 -> 1.
    assert both("Yes", ["yes"] * 9 + ["yes\n"]) == (0.0, 1.0)
    # the cleaning itself runs on both sides even without normalisation:
    # pred "\tyes\n" -> "yes"; GT "dog " -> "dog" (old: GT never stripped -> 0)
    assert both("\tyes\n", ["yes"] * 10) == (1.0, 1.0)
    assert both("dog", ["dog "] * 10) == (1.0, 1.0)
    assert both("dog", [" dog\t"] * 5 + ["dog"] * 5) == (1.0, 1.0)  # cleaned: all "dog" -> identical -> 1
    # a newline inside an answer becomes a space: "yes\nno" -> "yes no" != "yes" -> 0
    assert both("yes\nno", ["yes"] * 4 + ["no"] * 6) == (0.0, 0.0)
    # the tab becomes a space BEFORE processPunctuation: pred "x-y\t-z" -> "x-y -z"; " -" occurs -> every "-"
    # deleted -> "xy z". GTs 3 x "xy z" + 7 x "no" differ -> normalised (unchanged) -> m = 3 -> .9
    assert both("x-y\t-z", ["xy z"] * 3 + ["no"] * 7) == (0.9, 0.9)


def test_mixed_case_gts_are_lower_cased_with_the_prediction():
    # 5 x "Yes" + 5 x "YES": two distinct -> all normalised -> 10 x "yes"; pred "yes" -> m = 10 -> 1.
    # (old: GTs only de-punctuated -> "Yes"/"YES" never equal "yes" -> 0)
    assert both("yes", ["Yes"] * 5 + ["YES"] * 5) == (1.0, 1.0)
    # 8 x "Yes" + 2 x "yes" -> 10 x "yes" -> 1 (old: only the 2 "yes" match -> .6)
    assert both("yes", ["Yes"] * 8 + ["yes"] * 2) == (1.0, 1.0)
    # leave-one-out fraction, n = 10: pred "Yes" -> "yes"; GTs "yes", "YES" -> "yes", 8 x "no": m = 2.
    # j in the two matching: 1 other match -> 1/3; j among the 8: 2 matches -> 2/3;
    # (2·1/3 + 8·2/3) / 10 = (18/3) / 10 = .6
    assert both("Yes", ["yes", "YES"] + ["no"] * 8) == (0.6, 0.6)
    # n = 4: ["Yes", "yes", "no", "No"] -> [yes, yes, no, no]; pred "yes": m = 2 -> (2·1/3 + 2·2/3) / 4 = .5
    assert both("yes", ["Yes", "yes", "no", "No"]) == (0.5, 0.5)


def test_digit_comma_digit_in_mixed_gts():
    # GTs differ -> normalised. "1,000" matches (\d)(,)(\d) -> every punctuation char deleted -> "1000";
    # "1000" stays; "1 000" stays "1 000"; "no" stays. pred "1,000" -> "1000": m = 3 (two "1,000" + one "1000")
    # -> .9 (old: GT "1,000" -> "1000" too, so also .9)
    assert both("1,000", ["1,000"] * 2 + ["1000", "1 000"] + ["no"] * 6) == (0.9, 0.9)
    # without digits on both sides the comma is punctuation that becomes a space: "red,white" -> "red white"
    assert both("red white", ["red,white"] * 3 + ["red"] * 7) == (0.9, 0.9)


def test_periods_in_mixed_gts():
    # "3.5." : the first "." is followed by "5" -> kept; the last is followed by nothing -> deleted -> "3.5".
    # "35" is another answer. pred "3.5" -> "3.5": m = 3 -> .9
    assert both("3.5", ["3.5"] * 2 + ["3.5."] + ["35"] * 7) == (0.9, 0.9)
    # "3.5" is never turned into "35": pred "35" matches the 7 x "35" only -> 1 (>= 4 matches)
    assert both("35", ["3.5"] * 2 + ["3.5."] + ["35"] * 7) == (1.0, 1.0)
    assert both("35", ["3.5"] * 4 + ["4"] * 6) == (0.0, 0.0)
    # trailing period stripped on both sides: pred "dog." -> "dog"; GTs "dog", "dog", "dog." -> "dog": m = 3 -> .9
    assert both("dog.", ["dog"] * 2 + ["dog."] + ["cat"] * 7) == (0.9, 0.9)


def test_number_words_articles_and_contractions_in_mixed_gts():
    # number words on BOTH sides now: GTs "2", "two" -> "2", "2"; pred "two" -> "2": m = 2 -> .6
    # (old: GT "two" stays "two" -> m = 1 -> .3)
    assert both("two", ["2", "two"] + ["3"] * 8) == (0.6, 0.6)
    # "Two" is lower-cased first, then mapped: 4 matches -> 1
    assert both("2", ["2", "two", "Two", "TWO"] + ["3"] * 6) == (1.0, 1.0)
    # articles dropped on both sides: "a dog", "the dog" -> "dog"; pred "dog": m = 2 -> .6 (old: 0)
    assert both("dog", ["a dog", "the dog"] + ["cat"] * 8) == (0.6, 0.6)
    # pred "an apple" -> "apple"; GT "apple" x1: m = 1 -> 9·(1/3)/10 = .3
    assert both("an apple", ["apple"] + ["pear"] * 9) == (0.3, 0.3)
    # contractions restored on the GT side too: "dont know" -> "don't know"; pred "don't know" (the "'" is not
    # in the punctuation list) -> m = 3 -> .9 (old: GT stays "dont know" -> 0)
    assert both("don't know", ["dont know"] * 3 + ["no"] * 7) == (0.9, 0.9)
    # and on the prediction side: pred "dont know" -> "don't know" vs 3 x "don't know" -> .9
    assert both("dont know", ["don't know"] * 3 + ["no"] * 7) == (0.9, 0.9)


def test_punctuation_that_becomes_a_space_versus_deleted_in_gts():
    # "hot-dog": "-" touches no space -> replaced by " " -> "hot dog": pred "hot dog" m = 3 -> .9, "hotdog" 0
    gts = ["hot-dog"] * 3 + ["pizza"] * 7
    assert both("hot dog", gts) == (0.9, 0.9)
    assert both("hotdog", gts) == (0.0, 0.0)
    # "hot-dog -": " -" occurs in the text -> EVERY "-" is deleted -> "hotdog " -> split/join -> "hotdog"
    gts = ["hot-dog -"] * 3 + ["pizza"] * 7
    assert both("hotdog", gts) == (0.9, 0.9)
    assert both("hot dog", gts) == (0.0, 0.0)
    # "!" between words becomes a space ("yes!no" -> "yes no"), at the end it touches nothing either -> space,
    # which the final split/join removes: "red!" -> "red " -> "red"
    assert both("red", ["red!"] * 3 + ["blue"] * 7) == (0.9, 0.9)
    assert both("yes no", ["yes!no"] * 3 + ["no"] * 7) == (0.9, 0.9)


def test_official_and_lever_plus_agree_unless_all_gts_are_identical_and_lever_plus_is_never_lower():
    import random

    rng = random.Random(0)
    forms = ["yes", "Yes", "yes.", "YES", " yes\n", "no", "2", "two", "Two", "2.", "the dog", "dog", "Dog!",
             "dont know", "don't know", "1,000", "1000", "3.5", "hot-dog"]
    for _ in range(2000):
        gts = [rng.choice(forms[: rng.randint(1, len(forms))]) for _ in range(rng.choice([1, 3, 10]))]
        if rng.random() < 0.3:
            gts = [gts[0]] * len(gts)
        pred = rng.choice(forms)
        official, lever_plus = both(pred, gts)
        if len({g.strip() for g in gts}) > 1:
            assert official == lever_plus, (pred, gts)
        assert lever_plus >= official, (pred, gts)


def test_memo_keys_on_the_normalisation_mode():
    # the same (prediction, GTs) under both modes: two memo entries, two different answers
    assert vqa_accuracy("Yes", ("yes",) * 10) == 0.0
    assert vqa_accuracy("Yes", ("yes",) * 10, normalization="lever_plus") == 1.0
    assert vqa_accuracy("Yes", ("yes",) * 10) == 0.0


def test_accuracy_keywords_and_errors():
    # full credit after 2 matches: m=1 -> 9*(1/2)/10 = .45
    assert vqa_accuracy("yes", ["yes"] + ["no"] * 9, matches_for_full_credit=2) == 0.45
    # ndigits=0: 4/9 -> round(44.44, 0) = 44 -> .44
    assert vqa_accuracy("yes", ["yes", "yes", "no"], ndigits=0) == 0.44
    with pytest.raises(LeverPlusInputError, match="gt_answers"):
        vqa_accuracy("yes", [])
    with pytest.raises(LeverPlusInputError, match="record 1"):
        vqa_accuracy("yes", ["yes", None])
    with pytest.raises(LeverPlusInputError, match="prediction"):
        vqa_accuracy(None, ["yes"])
    with pytest.raises(LeverPlusInputError, match="normalization"):
        vqa_accuracy("yes", ["yes"], normalization="lavis")


def test_vqa_correct():
    assert vqa_correct(0.0) == 0
    assert vqa_correct(0.3) == 1
    assert vqa_correct(1.0) == 1
    assert vqa_correct(0.3, threshold=0.6) == 0
    for bad in (30.0, -0.1, math.nan):
        with pytest.raises(LeverPlusInputError):
            vqa_correct(bad)


# ----------------------------------------------------------------------------------------------------------
# vqa_postprocess
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("yes Question: what", "yes "),  # cut before "Question", no strip
        ("red, white", "red"),  # cut before ", "
        ("red,white", "red,white"),  # separator needs the space
        ("Short answer: dog", ""),  # stop word at the start -> empty
        ("cat Answer: dog, Question", "cat "),
        ("a, b Question", "a"),  # stop word first ("a, b "), then ", "
        ("no question", "no question"),  # case-sensitive
        ("Questionnaire", ""),  # substring match
        (" Dog.", " Dog."),  # no lower-casing, no strip
        ("", ""),
    ],
)
def test_vqa_postprocess(raw, expected):
    assert vqa_postprocess(raw) == expected


def test_vqa_postprocess_keywords():
    assert vqa_postprocess("dog; cat", stop_words=(), separator="; ") == "dog"
    assert vqa_postprocess("dog Short", stop_words=("Q",)) == "dog Short"


# ----------------------------------------------------------------------------------------------------------
# fallback_match
# ----------------------------------------------------------------------------------------------------------


def test_fallback_match():
    assert fallback_match("Dog ", ["dog", "cat"]) == (1, 1.0)  # exact after lower+strip
    assert fallback_match("DOG", ["Dog"]) == (1, 1.0)
    assert fallback_match("dog", ["hot dog"]) == (1, 0.5)  # pred inside GT
    assert fallback_match("hot dog", ["dog"]) == (1, 0.5)  # GT inside pred
    assert fallback_match("cat", ["dog"]) == (0, 0.0)
    assert fallback_match("dog", []) == (0, 0.0)
    assert fallback_match("cat", ["dog"], exact_score=2.0, partial_score=0.25) == (0, 0.0)
    assert fallback_match("dog", ["hot dog"], partial_score=0.25) == (1, 0.25)


def test_fallback_empty_prediction_is_never_correct():
    # the reference gives (1, 0.5) here because "" is a substring of every GT
    assert fallback_match("", ["dog"]) == (0, 0.0)
    assert fallback_match("  \n", ["dog", ""]) == (0, 0.0)
    # an empty GT string does not match every prediction either
    assert fallback_match("dog", ["", "cat"]) == (0, 0.0)


# ----------------------------------------------------------------------------------------------------------
# answer_relevance
# ----------------------------------------------------------------------------------------------------------


def test_token_f1_by_hand():
    # [red, car] vs [a, red, truck]: overlap 1, P = 1/2, R = 1/3, F1 = 2*(1/6)/(5/6) = 0.4
    assert token_f1(["red", "car"], ["a", "red", "truck"]) == pytest.approx(0.4)
    # multiset: [the, the, dog] vs [the, dog]: overlap 2, P = 2/3, R = 1, F1 = (4/3)/(5/3) = 0.8
    assert token_f1(["the", "the", "dog"], ["the", "dog"]) == pytest.approx(0.8)
    assert token_f1(["x"], ["y"]) == 0.0
    assert token_f1([], ["y"]) == 0.0


def test_edit_similarity_by_hand():
    # "cat" vs "cart": blocks "ca" + "t" -> 3 matched chars; 2*3/(3+4) = 6/7
    assert edit_similarity("cat", "cart") == pytest.approx(6 / 7)
    # "the the dog" vs "the dog": block "the dog" (7) -> 2*7/(11+7) = 7/9
    assert edit_similarity("the the dog", "the dog") == pytest.approx(7 / 9)
    assert edit_similarity("cat", "dog") == 0.0


def test_answer_relevance_by_hand():
    r = answer_relevance("cat", ["cart", "dog"])
    # F1: no shared token -> 0; edit: max(6/7, 0) = 6/7; score = 6/7
    assert r["vqa_rel_token_f1"] == 0.0
    assert r["vqa_rel_edit_sim"] == pytest.approx(6 / 7)
    assert r["vqa_rel_score"] == pytest.approx(6 / 7)

    r = answer_relevance("The the dog", ["the dog", "cat"])
    # F1 0.8 (above); edit 7/9 = .778; score = max = 0.8
    assert r == pytest.approx({"vqa_rel_token_f1": 0.8, "vqa_rel_edit_sim": 7 / 9, "vqa_rel_score": 0.8})

    r = answer_relevance("red car", ["a red truck", "blue car"])
    # F1: 0.4 vs [a, red, truck]; [blue, car]: P = R = 1/2 -> 0.5; max 0.5
    assert r["vqa_rel_token_f1"] == pytest.approx(0.5)

    # case and punctuation vanish in tokenisation: "Red-Car!" -> "red car"
    assert answer_relevance("Red-Car!", ["red car"]) == pytest.approx(
        {"vqa_rel_token_f1": 1.0, "vqa_rel_edit_sim": 1.0, "vqa_rel_score": 1.0})


def test_answer_relevance_empty_cases_are_zero():
    zero = {"vqa_rel_token_f1": 0.0, "vqa_rel_edit_sim": 0.0, "vqa_rel_score": 0.0}
    assert answer_relevance("", ["dog"]) == zero
    assert answer_relevance("?!", ["dog"]) == zero  # no tokens
    assert answer_relevance("dog", []) == zero
    assert answer_relevance("dog", ["", "?"]) == zero


def test_vqa_accuracy_memo_is_transparent_and_bad_input_still_raises():
    from leverplus.errors import LeverPlusInputError
    from leverplus.evaluation.vqa_metric import _vqa_accuracy_cached, vqa_accuracy

    gts = ["2"] * 3 + ["three"] * 7
    first = vqa_accuracy("two", gts)  # GTs differ -> both sides normalised: "two" -> "2", "three" -> "3"
    hits = _vqa_accuracy_cached.cache_info().hits
    assert vqa_accuracy("two", tuple(gts)) == first == 0.9  # 3 matching annotators -> 0.9, list or tuple alike
    assert _vqa_accuracy_cached.cache_info().hits == hits + 1
    with pytest.raises(LeverPlusInputError, match="expected a string"):
        vqa_accuracy("2", [["two"]] + gts[1:])  # unhashable GT: skips the memo, gets the validation error
