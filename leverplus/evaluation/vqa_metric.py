"""The VQA answer metrics: the official VQA accuracy, answer post-processing, the string-match fallback,
and answer relevance (reference#postprocess, reference#correctness, reference#relevance).

``vqa_accuracy(normalization="official")`` (the default) follows the current official evaluation script:
GT-Vision-Lab/VQA, ``PythonEvaluationTools/vqaEvaluation/vqaEval.py``, class ``VQAEval``, at commit a013f00
"Fixed processing answers bug" (2021-03-11, the latest change to that file). Per question it does:

1. newline and tab -> space, then ``strip``, on the prediction and on every GT answer;
2. only if the (cleaned) GT answers are not all identical: ``processPunctuation`` then ``processDigitArticle`` on
   every GT answer and on the prediction; when all GTs are identical, nothing is normalised (case, punctuation,
   articles and number words then all matter);
3. leave-one-out over the annotators against the answers as left by steps 1-2 (see :func:`vqa_accuracy`).

``normalization="lever_plus"`` is the Lever-Plus copy of the script (reference#correctness): the same steps without the
identity guard, so prediction and GTs are always fully normalised. The two agree whenever the GT answers differ;
with ten identical GTs, ``official`` needs the cleaned strings to be equal and ``lever_plus`` only their normal
forms ("Yes" vs 10 x "yes": 0 vs 1). ``lever_plus`` is therefore never below ``official``.

leverplus used to follow the revision before a013f00 (commit 458a8b2, 2016-10-08): the prediction always fully
normalised, the GTs only punctuation-processed (no lower-casing, number words, articles or contractions) and
only when they differ, the GTs never stripped. There "yes" scored 0 against 10 answers "Yes"/"YES", and "Yes"
scored 1 against 10 x "yes"; a013f00 fixed exactly that mismatch between the two sides.
"""

from __future__ import annotations

import difflib
import math
import re
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from leverplus.config.sim_params import NORMALIZATION_MODES
from leverplus.errors import LeverPlusInputError

# --------------------------------------------------------------------------------------------------------------
# Tables of the official script (VQAEval.__init__). They are data, kept verbatim, quirks included:
# the keys "Id've", "I'dve", "Im" and "Ive" can never match (words are lower-cased first), and
# "somebody'd" maps to "somebodyd".
# --------------------------------------------------------------------------------------------------------------
CONTRACTIONS: dict[str, str] = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's",
    "howd": "how'd", "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "let's": "let's", "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've",
    "mightn'tve": "mightn't've", "mightve": "might've", "mustnt": "mustn't", "mustve": "must've",
    "neednt": "needn't", "notve": "not've", "oclock": "o'clock", "oughtnt": "oughtn't",
    "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at", "shant": "shan't",
    "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebody'd": "somebodyd", "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've",
    "somebodyll": "somebody'll", "somebodys": "somebody's", "someoned": "someone'd",
    "someoned've": "someone'd've", "someone'dve": "someone'd've", "someonell": "someone'll",
    "someones": "someone's", "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's", "thered": "there'd",
    "thered've": "there'd've", "there'dve": "there'd've", "therere": "there're", "theres": "there's",
    "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've", "theyll": "they'll",
    "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've",
    "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll", "whatre": "what're",
    "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've", "wholl": "who'll",
    "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
NUMBER_WORDS: dict[str, str] = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}
ARTICLES: tuple[str, ...] = ("a", "an", "the")
# Order matters: each character is handled in turn on the text left by the previous ones.
PUNCTUATION: tuple[str, ...] = (
    ";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!",
)
# The official pattern, verbatim. "(?!<=\d)" is a typo for a look-behind: as a look-ahead at a "." it always
# holds, so the pattern deletes every "." that is not followed by a digit ("3.5" keeps it, "3." loses it).
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(\,)(\d)")
# The official call is ``periodStrip.sub("", text, re.UNICODE)``: re.UNICODE (== 32) lands in ``count``,
# so at most 32 periods are deleted.
OFFICIAL_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _require_str(value: object, field: str, record: str | None = None) -> str:
    if not isinstance(value, str):
        raise LeverPlusInputError(
            f"expected a string, got {type(value).__name__} ({value!r})",
            record=record,
            field=field,
            fix="pass answers as str (decode the model output first)",
        )
    return value


def clean_whitespace(text: str) -> str:
    """Newline and tab become spaces, then strip: what the official script always does to the prediction and
    to every GT answer."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def process_punctuation(text: str, *, period_strip_count: int = OFFICIAL_PERIOD_STRIP_COUNT) -> str:
    """Official ``processPunctuation``.

    Each punctuation character is deleted if it touches a space anywhere in the *input* text (``p + " "`` or
    ``" " + p``), or if the input contains a digit-comma-digit pattern such as "1,000"; otherwise every
    occurrence is replaced by a space. Then periods not followed by a digit are deleted (at most
    ``period_strip_count`` of them, 32 in the official script). No lower-casing here: that is
    ``process_digit_article``'s first step.
    """
    has_digit_comma = _COMMA_BETWEEN_DIGITS.search(text) is not None
    out = text
    for p in PUNCTUATION:
        if (p + " " in text or " " + p in text) or has_digit_comma:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=period_strip_count)


def process_digit_article(text: str) -> str:
    """Official ``processDigitArticle``: lower-case, split on whitespace, number words -> digits, drop
    a/an/the, expand contractions ("dont" -> "don't"), join with single spaces."""
    words = [NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [w for w in words if w not in ARTICLES]
    return " ".join(CONTRACTIONS.get(w, w) for w in words)


def normalize_answer(text: str) -> str:
    """The full normalisation of one answer: ``clean_whitespace`` -> ``process_punctuation`` ->
    ``process_digit_article`` (the official script applies it to the prediction and every GT answer of a
    question whose GT answers are not all identical; ``lever_plus`` always)."""
    _require_str(text, "answer")
    return process_digit_article(process_punctuation(clean_whitespace(text)))


# A pure string function, called for 10 annotator answers of every scored prediction: cached (bounded).
_normalize_cached = lru_cache(maxsize=1 << 17)(normalize_answer)


def vqa_accuracy(
    prediction: str,
    gt_answers: Sequence[str],
    *,
    normalization: str = "official",
    matches_for_full_credit: int = 3,
    ndigits: int = 2,
) -> float:
    """VQA accuracy of one prediction against its annotators' answers, in [0, 1].

    Normalisation (module docstring): ``"official"`` (default) is vqaEval.py at a013f00: prediction and GTs
    get ``clean_whitespace``; then, only when the cleaned GTs are not all identical, every GT and the prediction
    get ``normalize_answer``. ``"lever_plus"`` always normalises both (reference#correctness).

    Matching: for each annotator j, count the *other* annotators k != j whose answer, as left by the
    normalisation step, equals the prediction, score ``min(1, matches / 3)``, and average over annotators. The
    official script normalises the answer dicts in place and the leave-one-out loop reads ``item['answer']``
    from those dicts, so it compares *processed* GT answers (the list ``gtAnswers`` of cleaned strings only
    decides whether to normalise). It drops ``item != gtAnsDatum`` from the list; the dicts all differ by
    ``answer_id``, so exactly one answer is left out even when the strings repeat. The script stores
    ``round(100 * acc, 2)``; this returns that value / 100. With m of 10 annotators matching: m=0 -> 0,
    1 -> 0.3, 2 -> 0.6, 3 -> 0.9, >=4 -> 1.0.

    A pure function, and every evaluation scores the same few thousand queries with answers from a small
    vocabulary, so results are memoised (bounded); unhashable input skips the memo and gets the validation error.
    """
    args = (prediction, tuple(gt_answers) if isinstance(gt_answers, (list, tuple)) else gt_answers, normalization,
            matches_for_full_credit, ndigits)
    try:
        hash(args)
    except TypeError:
        return _vqa_accuracy(*args)
    return _vqa_accuracy_cached(*args)


def _vqa_accuracy(prediction, gt_answers, normalization, matches_for_full_credit, ndigits) -> float:
    """:func:`vqa_accuracy` itself: validation, normalisation, leave-one-out matching."""
    _require_str(prediction, "prediction")
    if normalization not in NORMALIZATION_MODES:
        raise LeverPlusInputError(
            f"unknown normalization {normalization!r}",
            field="normalization",
            fix=f"use one of {NORMALIZATION_MODES}",
        )
    gts = list(gt_answers)
    if not gts:
        raise LeverPlusInputError(
            "the list of ground-truth answers is empty",
            field="gt_answers",
            fix="give the annotators' answers for this question (VQA has 10)",
        )
    for j, gt in enumerate(gts):
        _require_str(gt, "gt_answers", record=str(j))

    pred = clean_whitespace(prediction)
    gts = [clean_whitespace(g) for g in gts]
    # the official guard: identical GTs (after cleaning) leave both sides as they are; lever_plus has no guard
    if normalization == "lever_plus" or len(set(gts)) > 1:
        pred = _normalize_cached(pred)
        gts = [_normalize_cached(g) for g in gts]

    per_annotator = []
    for j in range(len(gts)):
        matches = sum(1 for k, g in enumerate(gts) if k != j and g == pred)
        per_annotator.append(min(1, float(matches) / matches_for_full_credit))
    acc = float(sum(per_annotator)) / len(per_annotator)
    return round(100 * acc, ndigits) / 100


_vqa_accuracy_cached = lru_cache(maxsize=1 << 17)(_vqa_accuracy)


def vqa_correct(acc: float, *, threshold: float = 0.0) -> int:
    """Hard correctness used by the rewards: 1 iff ``acc > threshold`` (reference: 0, i.e. >= 1 annotator)."""
    if not isinstance(acc, (int, float)) or math.isnan(acc) or not 0.0 <= acc <= 1.0:
        raise LeverPlusInputError(
            f"VQA accuracy must be a number in [0, 1], got {acc!r}",
            field="vqa_acc_score",
            fix="pass the accuracy as a fraction (divide the official 0..100 score by 100)",
        )
    return int(acc > threshold)


def vqa_postprocess(
    text: str,
    *,
    stop_words: Sequence[str] = ("Question", "Answer", "Short"),
    separator: str = ", ",
) -> str:
    """Cut a generation down to the answer (reference#postprocess): keep the text before the first stop word
    (case-sensitive), then before the first ``separator``. No lower-casing and no strip."""
    _require_str(text, "prediction")
    if stop_words:
        text = re.split("|".join(re.escape(w) for w in stop_words), text, maxsplit=1)[0]
    if separator:
        text = text.split(separator, 1)[0]
    return text


def fallback_match(
    prediction: str,
    gt_answers: Sequence[str],
    *,
    exact_score: float = 1.0,
    partial_score: float = 0.5,
) -> tuple[int, float]:
    """String-match fallback used when the official metric cannot run (reference#correctness): returns (correct, score).

    Lower-case and strip both sides; exact membership -> (1, exact_score); substring containment in either
    direction -> (1, partial_score); else (0, 0.0). Unlike the reference ([BUG?]), an empty or whitespace-only
    prediction is never correct, and empty GT strings never match by containment. No GTs -> (0, 0.0).
    """
    _require_str(prediction, "prediction")
    pred = prediction.lower().strip()
    gts = [_require_str(g, "gt_answers", record=str(j)).lower().strip() for j, g in enumerate(gt_answers)]
    if not pred:
        return 0, 0.0
    if pred in gts:
        return 1, float(exact_score)
    if any(g and (g in pred or pred in g) for g in gts):
        return 1, float(partial_score)
    return 0, 0.0


_TOKEN = re.compile(r"[a-z0-9]+")


def relevance_tokens(text: str) -> list[str]:
    """Relevance tokens: runs of ``[a-z0-9]`` in the lower-cased text."""
    return _TOKEN.findall(text.lower())


def token_f1(prediction_tokens: Sequence[str], gt_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1 (multiset overlap); 0 when either side is empty or nothing overlaps."""
    overlap = sum((Counter(prediction_tokens) & Counter(gt_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(prediction_tokens)
    recall = overlap / len(gt_tokens)
    return 2 * precision * recall / (precision + recall)


def edit_similarity(a: str, b: str) -> float:
    """``difflib.SequenceMatcher(None, a, b).ratio()`` = 2 * matched characters / (len(a) + len(b))."""
    return difflib.SequenceMatcher(None, a, b).ratio()


def answer_relevance(prediction: str, gt_answers: Sequence[str]) -> dict[str, float]:
    """Soft relevance of a prediction to the GT answers (reference#relevance).

    Both sides are normalised to their relevance tokens joined by single spaces (our choice: the spec names
    the token pattern but not the string the edit similarity sees). ``vqa_rel_token_f1`` and
    ``vqa_rel_edit_sim`` are maxima over the GTs; ``vqa_rel_score`` is the larger of the two. All three are 0
    for an empty prediction or an empty GT list.
    """
    _require_str(prediction, "prediction")
    pred_tokens = relevance_tokens(prediction)
    gt_token_lists = [relevance_tokens(_require_str(g, "gt_answers", record=str(j))) for j, g in enumerate(gt_answers)]
    gt_token_lists = [t for t in gt_token_lists if t]
    if not pred_tokens or not gt_token_lists:
        return {"vqa_rel_token_f1": 0.0, "vqa_rel_edit_sim": 0.0, "vqa_rel_score": 0.0}
    pred_text = " ".join(pred_tokens)
    f1_max = max(token_f1(pred_tokens, t) for t in gt_token_lists)
    ed_max = max(edit_similarity(pred_text, " ".join(t)) for t in gt_token_lists)
    return {"vqa_rel_token_f1": f1_max, "vqa_rel_edit_sim": ed_max, "vqa_rel_score": max(f1_max, ed_max)}

def gt_prob_formula(gt_answers_norm: Sequence[str], prob: Callable[[str], float],
                    full_credit_count: int = 3) -> float:
    """reference#gt-prob ``vqa_gt_prob``: Σ over unique GT strings a of ``min(count(a)/3, 1) · prob(a)``.

    ``gt_answers_norm`` are the GT strings after ``vqa_postprocess`` (so "two" and "2" stay distinct and are
    counted separately). Not bounded by 1, as in the reference.
    """
    counts = Counter(gt_answers_norm)
    return float(sum(min(c / full_credit_count, 1.0) * prob(a) for a, c in counts.items()))
