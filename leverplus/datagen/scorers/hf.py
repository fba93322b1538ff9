"""The ``hf`` scorer: a Hugging Face transformers vision-language model of the Qwen2-VL family (reference#rldata).

Optional extra: ``pip install -e .[lvlm]`` (transformers, pillow). Weights come only from a local folder or the
local Hugging Face cache (``local_files_only=True`` everywhere); nothing is ever downloaded implicitly.

Prompt (reference#lvlm-prompt, ``qwen2vl_interface.py``): one chat, ``[system prompt] + user turn [img(ex1), txt(ex1), ...,
img(query), txt(query)]``, with ICD text ``Question:{q} Short answer:{a}`` and query text ``Question:{q} Short
answer:`` (texts ``.strip(" ")``, empty ones dropped), rendered with the model's chat template and the
generation prompt. Generation settings come from the config (reference: ``max_new_tokens=5, num_beams=3,
length_penalty=0.0, min_new_tokens=0, do_sample=False``); the new tokens are decoded with special tokens skipped.

Teacher forcing (InfoScore reference#formats-beam-json, ``vqa_gt_prob`` reference#gt-prob): ``P(a | prompt) = exp(−mean CE)`` over exactly the tokens
of ``a`` inside the chat-template sequence fed to the model (token offsets locate the answer's characters), not
over a span counted on plain text as the reference did ([BUG?] reference#formats-beam-json). ``answer_placement`` puts ``a`` where the
model would generate it (``"assistant"``, ours) or at the end of the query text in the user turn with no
generation prompt (``"user_turn"``, the reference's ``transfer_prompts``).

Inputs are assembled from the tokenizer and the image processor directly: each ``<|image_pad|>`` of the
rendered chat is expanded to ``prod(image_grid_thw) / merge_size²`` tokens, which is what ``Qwen2VLProcessor``
does; this avoids the processor class, whose video half needs torchvision in transformers >= 4.52.
"""

from __future__ import annotations

import inspect
import json
from collections import OrderedDict
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from leverplus.datagen.scorers.base import Scorer
from leverplus.datagen.scorers.vqa_data import OfficialAnnotations, VQAItems
from leverplus.errors import LeverPlusInputError

#: The reference's Qwen2.5-VL system prompt (``configs/infer_model/qwen2.5_vl_3B.yaml``), "four sets" whatever
#: the shot count, as in the reference.
REFERENCE_SYSTEM_PROMPT = (
    "In the upcoming task, you will see four sets of dialogues, each containing two roles: user and assistant. "
    "The user is the questioner, who provides an image and asks a question based on it; the assistant is the "
    "responder, who answers according to the image and question provided by the user. Afterward, you will receive "
    "an image and a question from the user. Please act as the assistant and answer based on the four previous "
    "dialogue sets and your own knowledge. Strictly follow the answering format: if the examples use only one or "
    "two keywords, your reply must also use only one or two keywords; if the examples contain no more than three "
    "tokens, your reply must not exceed three tokens either."
)
ANSWER_PLACEMENTS = ("assistant", "user_turn")
#: Generation settings the reference used (``configs/task/vqa.yaml`` plus ``do_sample=False``).
GEN_ARG_NAMES = ("max_new_tokens", "num_beams", "length_penalty", "min_new_tokens", "do_sample")


def _require_transformers():
    try:
        # lazy: transformers is the optional 'lvlm' extra, and importing it costs seconds (sim never needs it)
        import transformers  # noqa: F401
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise LeverPlusInputError("the hf scorer needs the optional 'lvlm' extra (transformers, pillow)",
                                  field="scorer.name", fix="pip install -e .[lvlm]") from e
    return transformers


def resolve_model_dir(model: Optional[str], field: str = "scorer.hf.model") -> Path:
    """A local folder as is, or the local Hugging Face cache snapshot of a hub id; never downloads. ``field``: the
    config field that named it (for the error)."""
    if not model:
        raise LeverPlusInputError("no model given", field=field,
                                  fix=f"pass {field}=/path/to/Qwen2.5-VL-3B-Instruct (a local folder) or a "
                                      "hub id already in the local Hugging Face cache")
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise LeverPlusInputError("is a file, not a model folder", file=str(path), field=field,
                                  fix="pass the folder that holds config.json and the weights")
    try:
        # lazy: huggingface_hub comes with the optional 'lvlm' extra and only the hf scorer needs it
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError, HFValidationError, ... all mean "not available locally"
        raise LeverPlusInputError(
            f"model {model!r} is neither a local folder nor in the local Hugging Face cache "
            f"({type(e).__name__})", field=field,
            fix=f"download it once yourself (e.g. `huggingface-cli download {model}`), or pass "
                f"{field}=/path/to/model-folder; leverplus never downloads weights") from None


def _chat_template(model_dir: Path, tokenizer: Any) -> str:
    """The model's chat template: ``chat_template.json`` / ``chat_template.jinja`` (the processor's) or the
    tokenizer's own."""
    j = model_dir / "chat_template.json"
    if j.is_file():
        tpl = json.loads(j.read_text(encoding="utf-8")).get("chat_template")
        if isinstance(tpl, str) and tpl:
            return tpl
    jinja = model_dir / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text(encoding="utf-8")
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.chat_template
    raise LeverPlusInputError("the model folder has no chat template", file=str(model_dir),
                              fix="use an instruct checkpoint that ships chat_template.json or a tokenizer template")


def _check_scorer_args(items: Dict[str, VQAItems], prompt_template: str, answer_placement: str,
                       batch_size: int) -> None:
    """The constructor arguments that need no model: a train split, a known placement, a usable template."""
    if "train" not in items:
        raise LeverPlusInputError("no train items file", field="scorer.hf.data",
                                  fix="pass scorer.hf.data={train: /path/train_items.json}")
    if answer_placement not in ANSWER_PLACEMENTS:
        raise LeverPlusInputError(f"unknown answer_placement {answer_placement!r}",
                                  field="scorer.hf.answer_placement", fix=f"use one of {ANSWER_PLACEMENTS}")
    if prompt_template.count("<Q>") != 1 or prompt_template.count("<A>") != 1 or \
            prompt_template.index("<Q>") > prompt_template.index("<A>"):
        raise LeverPlusInputError(f"{prompt_template!r} must hold <Q> once, then <A> once",
                                  field="scorer.hf.prompt_template", fix="e.g. 'Question:<Q> Short answer:<A>'")
    if batch_size < 1:
        raise LeverPlusInputError(f"must be >= 1, got {batch_size}", field="scorer.hf.batch_size")


def _resolve_device(device: str) -> torch.device:
    """``auto``: CUDA when available, else CPU."""
    return torch.device("cuda" if device == "auto" and torch.cuda.is_available()
                        else ("cpu" if device == "auto" else device))


def _resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto``: bfloat16 on CUDA, float32 on CPU."""
    out = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
           "bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}.get(dtype)
    if out is None:
        raise LeverPlusInputError(f"unknown dtype {dtype!r}", field="scorer.hf.dtype",
                                  fix="auto, bfloat16, float16 or float32")
    return out


def _resolve_attn(attn_implementation: str, device: torch.device) -> str:
    """``auto``: flash_attention_2 when flash_attn is installed and the model runs on CUDA, else sdpa."""
    if attn_implementation != "auto":
        return attn_implementation
    try:
        # lazy: flash_attn is an optional CUDA extra; its presence is what ``auto`` asks about
        import flash_attn  # noqa: F401

        return "flash_attention_2" if device.type == "cuda" else "sdpa"
    except ImportError:
        return "sdpa"


def _load_tokenizer(transformers: Any, model_dir: Path, local: Dict[str, Any]) -> Any:
    """The model's fast tokenizer, left-padded (generation continues every row at the same position, reference)."""
    tokenizer = transformers.AutoTokenizer.from_pretrained(model_dir, **local)
    if not getattr(tokenizer, "is_fast", False):
        raise LeverPlusInputError("the tokenizer is not a fast tokenizer (no token offsets)",
                                  file=str(model_dir),
                                  fix="install `tokenizers` and use a checkpoint with tokenizer.json")
    tokenizer.padding_side = "left"  # generation continues every row at the same position (reference)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _load_model(transformers: Any, model_dir: Path, attn_implementation: str, dtype: torch.dtype,
                local: Dict[str, Any], device: torch.device) -> Any:
    """The image-text-to-text model on ``device``, in eval mode."""
    auto = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
    version = tuple(int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if version >= (4, 56) else "torch_dtype"  # renamed in transformers 4.56
    return auto.from_pretrained(model_dir, attn_implementation=attn_implementation,
                                **{dtype_kw: dtype}, **local).to(device).eval()


class HFScorer(Scorer):
    """A Qwen2-VL-family transformers model as a :class:`~leverplus.datagen.scorers.base.Scorer` (module docstring).

    items: split -> :class:`VQAItems` (``"train"`` required: queries and ICDs are train rows).
    annotations: official annotation files (``vqaEval``); queries they miss go to the fallback.
    gen_args: generation keyword arguments (reference values in ``HFScorerConfig``).
    """

    def __init__(self, model: str, items: Dict[str, VQAItems], annotations: OfficialAnnotations, *,
                 gen_args: Dict[str, Any], system_prompt: Optional[str] = None,
                 prompt_template: str = "Question:<Q> Short answer:<A>", answer_placement: str = "assistant",
                 batch_size: int = 8, device: str = "auto", dtype: str = "auto", attn_implementation: str = "auto",
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None,
                 image_cache_size: int = 1000) -> None:
        transformers = _require_transformers()
        _check_scorer_args(items, prompt_template, answer_placement, batch_size)
        self.items, self.annotations = items, annotations
        self.system_prompt = REFERENCE_SYSTEM_PROMPT if system_prompt is None else system_prompt
        self.prompt_template, self.answer_placement = prompt_template, answer_placement
        self.batch_size = int(batch_size)
        self.gen_args = dict(gen_args)
        self.model_dir = resolve_model_dir(model)
        self.name = Path(model).name if Path(model).expanduser().is_dir() else str(model)
        self.device = _resolve_device(device)
        self.dtype = _resolve_dtype(dtype, self.device)
        self.attn_implementation = _resolve_attn(attn_implementation, self.device)
        local = dict(local_files_only=True)
        self.tokenizer = _load_tokenizer(transformers, self.model_dir, local)
        pix = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
        self.image_processor = transformers.AutoImageProcessor.from_pretrained(self.model_dir, **local, **pix)
        self.chat_template = _chat_template(self.model_dir, self.tokenizer)
        self.model = _load_model(transformers, self.model_dir, self.attn_implementation, self.dtype, local,
                                 self.device)
        cfg = self.model.config
        self.image_token_id = int(cfg.image_token_id)
        self.image_token = self.tokenizer.convert_ids_to_tokens(self.image_token_id)
        self.merge_size = int(getattr(self.image_processor, "merge_size", 2))
        params = inspect.signature(self.model.forward).parameters
        self._wants_mm_types = "mm_token_type_ids" in params
        self._logits_kw = "logits_to_keep" if "logits_to_keep" in params else (
            "num_logits_to_keep" if "num_logits_to_keep" in params else None)
        self._images: "OrderedDict[Tuple[str, int], Any]" = OrderedDict()
        self._image_cache_size = int(image_cache_size)

    # ---------------------------------------------------------------------------------- data
    def _split_items(self, split: str) -> VQAItems:
        if split not in self.items:
            raise LeverPlusInputError(f"no items file for split {split!r}", field="scorer.hf.data",
                                      fix=f"add scorer.hf.data.{split}=/path/{split}_items.json")
        return self.items[split]

    def num_items(self, split: str) -> int:
        return len(self._split_items(split))

    def item(self, split: str, query_index: int) -> dict:
        it = self._split_items(split)[query_index]
        return {"question_id": it.question_id, "image_id": it.image_id, "question": it.question,
                "answer": it.answer, "gt_answers_raw": list(it.answers)}

    def official_answers(self, split: str, query_index: int) -> Optional[Tuple[List[str], str]]:
        return self.annotations.lookup(self._split_items(split)[query_index].question_id)

    def _image(self, split: str, index: int):
        key = (split, int(index))
        if key in self._images:
            self._images.move_to_end(key)
            return self._images[key]
        # lazy: PIL comes with the optional 'lvlm' extra and only the hf scorer opens images
        from PIL import Image

        path = self._split_items(split)[index].image
        try:
            with Image.open(path) as im:
                img = im.convert("RGB")
        except (OSError, ValueError) as e:
            raise LeverPlusInputError(f"cannot open the image ({e})", file=str(path), record=f"{split} item {index}",
                                      field="image", fix="check the image path and scorer.hf.image_root") from e
        self._images[key] = img
        if len(self._images) > self._image_cache_size:
            self._images.popitem(last=False)
        return img

    # ---------------------------------------------------------------------------------- prompts
    def _text(self, item_question: str, answer: str) -> tuple[str, int]:
        """``template`` filled and ``.strip(" ")``-ed, and where the answer starts in it."""
        before, after = self.prompt_template.split("<A>")
        head = before.replace("<Q>", item_question)
        full = head + answer + after
        lead = len(full) - len(full.lstrip(" "))
        return full.strip(" "), len(head) - lead

    def render(self, split: str, query_index: int, icd_ids: Sequence[int],
               answer: Optional[str] = None) -> tuple[str, Optional[tuple[int, int]]]:
        """The chat text fed to the model (image pads not yet expanded) and, when teacher forcing ``answer``,
        its character span in that text."""
        content = []
        for i in icd_ids:
            it = self._split_items("train")[i]
            text, _ = self._text(it.question, it.answer)
            content.append({"type": "image"})
            if text:
                content.append({"type": "text", "text": text})
        q = self._split_items(split)[query_index]
        in_user = answer is not None and self.answer_placement == "user_turn"
        qtext, start = self._text(q.question, answer if in_user else "")
        content.append({"type": "image"})
        if qtext:
            content.append({"type": "text", "text": qtext})
        messages = ([{"role": "system", "content": self.system_prompt}] if self.system_prompt else []) + \
            [{"role": "user", "content": content}]
        text = self.tokenizer.apply_chat_template(messages, chat_template=self.chat_template, tokenize=False,
                                                  add_generation_prompt=not in_user)
        if answer is None:
            return text, None
        if in_user:
            at = text.rfind(qtext)
            if at < 0:
                raise LeverPlusInputError("the chat template altered the query text", field="scorer.hf.model",
                                          fix="use answer_placement=assistant")
            return text, (at + start, at + start + len(answer))
        return text + answer, (len(text), len(text) + len(answer))

    def _encode(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]],
                answers: Optional[Sequence[str]] = None) -> tuple[dict, Optional[torch.Tensor], list[str]]:
        """Model inputs for a batch (left padded), the answer-token mask [B, L] when teacher forcing, and the
        rendered texts."""
        texts, spans, images = [], [], []
        for b, (q, icds) in enumerate(zip(query_indices, icd_lists)):
            text, span = self.render(split, q, icds, None if answers is None else answers[b])
            texts.append(text)
            spans.append(span)
            images += [self._image("train", i) for i in icds] + [self._image(split, q)]
        vision = self.image_processor(images=images, return_tensors="pt")
        grids = vision["image_grid_thw"]
        expanded, shifted, g = [], [], 0
        for text, span in zip(texts, spans):
            pieces = text.split(self.image_token)
            out = pieces[0]
            for piece in pieces[1:]:
                out += self.image_token * int(grids[g].prod() // self.merge_size ** 2) + piece
                g += 1
            if span is not None:  # the answer follows the last image, so its offset from the end is unchanged
                if span[0] < text.rfind(self.image_token) + len(self.image_token):
                    raise LeverPlusInputError("the answer does not follow the query image", field="scorer.hf")
                shift = len(out) - len(text)
                span = (span[0] + shift, span[1] + shift)
            expanded.append(out)
            shifted.append(span)
        if g != len(grids):
            raise LeverPlusInputError(f"the chat holds {g} image placeholders for {len(grids)} images",
                                      field="scorer.hf.model", fix="use a Qwen2-VL-family chat template")
        enc = self.tokenizer(expanded, add_special_tokens=False, padding=True, return_tensors="pt",
                             return_offsets_mapping=answers is not None)
        mask = None
        if answers is not None:
            off = enc.pop("offset_mapping")
            lo = torch.tensor([s[0] for s in shifted])[:, None]
            hi = torch.tensor([s[1] for s in shifted])[:, None]
            mask = (off[..., 0] < hi) & (off[..., 1] > lo) & (off[..., 1] > off[..., 0]) & enc["attention_mask"].bool()
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "pixel_values": vision["pixel_values"], "image_grid_thw": grids}
        if self._wants_mm_types:
            inputs["mm_token_type_ids"] = (enc["input_ids"] == self.image_token_id).int()
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        return inputs, mask, texts

    def _batches(self, n: int):
        for start in range(0, n, self.batch_size):
            yield slice(start, min(n, start + self.batch_size))

    # ---------------------------------------------------------------------------------- model
    @torch.inference_mode()
    def generate(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]]) -> List[str]:
        out: List[str] = []
        pad = self.tokenizer.pad_token_id
        for sl in self._batches(len(query_indices)):
            inputs, _, _ = self._encode(split, query_indices[sl], icd_lists[sl])
            gen = self.model.generate(**inputs, **self.gen_args, pad_token_id=pad)
            new = gen[:, inputs["input_ids"].shape[1]:]
            out += self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return out

    @torch.inference_mode()
    def answer_probs(self, split: str, query_indices: Sequence[int], icd_lists: Sequence[Sequence[int]],
                     answers: Sequence[str]) -> np.ndarray:
        """``exp(−mean CE)`` over the answer's tokens; an answer with no characters gets 0."""
        probs = np.zeros(len(answers), dtype=np.float64)
        todo = [i for i, a in enumerate(answers) if a]
        for sl in self._batches(len(todo)):
            idx = todo[sl]
            inputs, mask, _ = self._encode(split, [query_indices[i] for i in idx], [icd_lists[i] for i in idx],
                                           [answers[i] for i in idx])
            L = mask.shape[1]
            first = int(mask.float().argmax(dim=1).min())  # earliest answer token of the batch
            keep = L - first + 1  # logits from position first-1 on predict the answer tokens
            kw = {self._logits_kw: keep} if self._logits_kw else {}
            logits = self.model(**inputs, **kw).logits.float()[:, -keep:]  # [B, keep, V]
            ids = inputs["input_ids"][:, L - keep + 1:]  # targets of logits[:, :-1]
            logp = torch.log_softmax(logits[:, :-1], dim=-1).gather(-1, ids[..., None])[..., 0]
            m = mask[:, L - keep + 1:].to(logp.device)
            n = m.sum(dim=1)
            nll = -(logp * m).sum(dim=1) / n.clamp(min=1)
            probs[idx] = torch.where(n > 0, torch.exp(-nll), torch.zeros_like(nll)).double().cpu().numpy()
        return probs

    def answer_token_mask(self, split: str, query_index: int, icd_ids: Sequence[int],
                          answer: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids [L], answer mask [L]) of one teacher-forced prompt: what :meth:`answer_probs` averages over."""
        inputs, mask, _ = self._encode(split, [query_index], [list(icd_ids)], [answer])
        return inputs["input_ids"][0].cpu(), mask[0]

    def prompts(self, split: str, query_indices: Sequence[int],
                icd_lists: Sequence[Sequence[int]]) -> List[Tuple[str, int]]:
        out = []
        for sl in self._batches(len(query_indices)):
            inputs, _, texts = self._encode(split, query_indices[sl], icd_lists[sl])
            out += [(t, int(n)) for t, n in zip(texts, inputs["attention_mask"].sum(dim=1).tolist())]
        return out

    def describe(self) -> Dict[str, Any]:
        ev = {}
        for split, items in self.items.items():
            ev[f"{split}_ques_path"] = items.path
        for split, path in self.annotations.files.items():
            ev[f"{split}_ann_path"] = path
        return {"vqa_model": self.name, "task_gen_args": dict(self.gen_args), "eval": ev,
                "scorer": {"model_dir": str(self.model_dir), "system_prompt": self.system_prompt,
                           "prompt_template": self.prompt_template, "answer_placement": self.answer_placement,
                           "dtype": str(self.dtype).replace("torch.", ""),
                           "attn_implementation": self.attn_implementation}}


def from_config(cfg: Any) -> HFScorer:
    """``build_scorer`` factory for ``scorer.name=hf`` (``cfg.hf`` is an ``HFScorerConfig``)."""
    h = cfg.hf
    if not h.data:
        raise LeverPlusInputError("no items files", field="scorer.hf.data",
                                  fix="pass scorer.hf.data={train: /path/train_items.json} (see docs/rldata.md)")
    items = {str(s): VQAItems(p, h.image_root) for s, p in dict(h.data).items()}
    gen_args = {k: getattr(h, k) for k in GEN_ARG_NAMES}
    return HFScorer(h.model, items, OfficialAnnotations(dict(h.annotations or {})), gen_args=gen_args,
                    system_prompt=h.system_prompt, prompt_template=h.prompt_template,
                    answer_placement=h.answer_placement, batch_size=h.batch_size, device=h.device, dtype=h.dtype,
                    attn_implementation=h.attn_implementation, min_pixels=h.min_pixels, max_pixels=h.max_pixels,
                    image_cache_size=h.image_cache_size)


__all__ = ["ANSWER_PLACEMENTS", "HFScorer", "REFERENCE_SYSTEM_PROMPT", "from_config", "resolve_model_dir"]
