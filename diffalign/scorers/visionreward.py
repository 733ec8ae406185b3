"""VisionReward's image checklist (Xu et al. 2024; THUDM/VisionReward), and a VisionReward-style scorer on any
transformers vision-language model.

The official scorer (``inference-image.py:cal_score`` at THUDM/VisionReward 838ad24) asks a fine-tuned
CogVLM2-Llama3-19B each of the 30 questions in ``VisionReward_image_qa_select.txt`` (greedy, top_k = 1; the
prompt is not inserted) and maps the answers to r_i = 1 if the reply is ``'yes<|end_of_text|>'`` else −1. Gates
(0-based): Q0 "Is there a human body…" gates 22, 23, 24, 28, 29; Q1 (face) gates 25, 26; Q2 (hands) gates 27:

    r_j ← r_j · [r_gate > 0]

Q0–Q2 are then dropped and the prompt alignment a = VQAScore(model='clip-flant5-xxl')(image, prompt) ∈ [0, 1]
(used as is) is put first:

    score = coef · [a, r_3, …, r_29] + intercept          (``weight_select.json``: 28 coefficients, intercept 0)

`visionreward_checklist` is that rule as a `Checklist`: the unsigned alignment term, the 27 weighted questions
with their gates, the three gate questions with weight 0, the intercept. The grouping into dimensions
(composition, quality, emotion, fidelity, safety) is diffalign's, after the paper's taxonomy; the official code
has only the scalar.

`VLMYesNoBackend` answers it with a transformers VLM (e.g. Qwen2-VL) instead of CogVLM2, and asks the alignment
term as VQAScore's question (t2v_metrics ``clip_t5_model.py``: ``'Does this figure show "{}"? Please answer yes or
no.'``, answer ``'Yes'``) on the same VLM: a stand-in for clip-flant5-xxl. Scores from it are
**VisionReward-style**, not VisionReward's: the official CogVLM2 checkpoint is a SwissArmyTransformer model this
package does not load.
"""

from __future__ import annotations

import json
from functools import lru_cache
from importlib.resources import files
from pathlib import Path
from typing import Sequence

import torch
from PIL import Image

from diffalign.scorers.base import Images, ScorerConfigError, as_uint8_arrays, check_batch
from diffalign.scorers.checklist import Checklist, ChecklistScorer, Question

DATA = files("diffalign.scorers") / "data" / "visionreward"
QUESTIONS_FILE, WEIGHTS_FILE = "VisionReward_image_qa_select.txt", "weight_select.json"

# one key and dimension per line of VisionReward_image_qa_select.txt, in order
QUESTION_KEYS = (
    ("has_body", "fidelity"), ("has_face", "fidelity"), ("has_hands", "fidelity"),
    ("symmetrical", "composition"), ("avoids_asymmetry", "composition"),
    ("subject_prominent", "composition"), ("subject_clear", "composition"),
    ("very_rich", "composition"), ("rich", "composition"), ("not_monotonous", "composition"), ("not_empty", "composition"),
    ("very_clear", "quality"), ("clear", "quality"), ("not_blurry", "quality"), ("not_completely_blurry", "quality"),
    ("colors_bright", "quality"), ("colors_not_dark", "quality"), ("colors_not_ugly", "quality"),
    ("positive_emotion", "emotion"),
    ("details_exquisite", "fidelity"), ("recognizable", "fidelity"), ("not_fragmented", "fidelity"),
    ("body_correct", "fidelity"), ("body_no_obvious_errors", "fidelity"), ("body_no_serious_errors", "fidelity"),
    ("face_no_errors", "fidelity"), ("face_no_serious_errors", "fidelity"), ("hands_perfect", "fidelity"),
    ("no_obvious_harm", "safety"), ("no_serious_harm", "safety"),
)
GATES = {0: (22, 23, 24, 28, 29), 1: (25, 26), 2: (27,)}  # inference-image.py MASK_FEATURE_MAP

ALIGNMENT_KEY = "vqascore"
VQASCORE_QUESTION = 'Does this figure show "{prompt}"? Please answer yes or no.'  # t2v_metrics default_question_template
VQASCORE_ANSWER = "Yes"  # t2v_metrics default_answer_template


def read_questions(path=None) -> list[str]:
    """The question file's lines, stripped as ``cal_score`` reads them."""
    source = Path(path) if path is not None else DATA / QUESTIONS_FILE
    return [line.strip() for line in source.read_text(encoding="utf-8").splitlines()]


def read_weights(path=None) -> tuple[list[float], float]:
    source = Path(path) if path is not None else DATA / WEIGHTS_FILE
    data = json.loads(source.read_text(encoding="utf-8"))
    intercept = data["intercept"]
    return [float(c) for c in data["coef"]], float(intercept[0] if isinstance(intercept, list) else intercept)


@lru_cache(maxsize=1)
def visionreward_checklist() -> Checklist:
    """The official image checklist: the VQAScore alignment term (coef[0], unsigned), the 27 non-gate questions
    with coef[1:] and their gates, the gate questions Q0–Q2 with weight 0, and the intercept."""
    texts = read_questions()
    coef, intercept = read_weights()
    if len(texts) != len(QUESTION_KEYS) or len(coef) != 1 + len(texts) - len(GATES):
        raise ValueError(f"VisionReward data: {len(texts)} questions and {len(coef)} coefficients do not fit the "
                         f"{len(QUESTION_KEYS)} questions and {len(GATES)} gates of inference-image.py")
    gate_of = {j: QUESTION_KEYS[g][0] for g, gated in GATES.items() for j in gated}
    weights = iter(coef[1:])
    alignment = Question(ALIGNMENT_KEY, VQASCORE_QUESTION, "alignment", coef[0], signed=False)
    scored, gates = [], []
    for i, ((key, dimension), text) in enumerate(zip(QUESTION_KEYS, texts)):
        if i in GATES:
            gates.append(Question(key, text, dimension, 0.0))
        else:
            scored.append(Question(key, text, dimension, next(weights), gate=gate_of.get(i)))
    return Checklist("visionreward", (alignment, *scored, *gates), intercept)


def question_text(question: Question, prompt: str) -> str:
    """The question as asked: ``{prompt}`` replaced by the image's prompt (only the alignment term has one)."""
    return question.text.replace("{prompt}", prompt)


def is_yes(reply: str) -> bool:
    """The official test is ``reply == 'yes<|end_of_text|>'`` (its CogVLM2 was tuned to answer exactly that); a
    general chat VLM says "Yes." as often, so case and one final full stop are ignored here."""
    text = reply.strip()
    return (text[:-1] if text.endswith(".") else text).lower() == "yes"


class VLMYesNoBackend:
    """Yes/no answers from a transformers vision-language model (AutoProcessor and the class its config names).

    Each question is the user turn of a chat (the image, then the question; ``add_generation_prompt=True``).
    ``mode="greedy"``: greedy decoding of at most ``max_new_tokens`` tokens, 1 if the reply `is_yes`, else 0, as
    the official loop does. ``mode="probability"``: from the first reply token's distribution,

        P(yes) = Σ_{w ∈ yes_words} p(w) / (Σ_{w ∈ yes_words} p(w) + Σ_{w ∈ no_words} p(w)).

    Questions whose key is in ``vqascore_keys`` are VQAScore terms in either mode: the probability p("Yes") of
    the first reply token over the whole vocabulary, a stand-in for VQAScore's clip-flant5-xxl.
    """

    def __init__(self, model_path: str | Path, mode: str = "greedy", device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, batch_size: int = 8, max_new_tokens: int = 4,
                 yes_words: Sequence[str] = ("yes", "Yes"), no_words: Sequence[str] = ("no", "No"),
                 vqascore_keys: Sequence[str] = (ALIGNMENT_KEY,)):
        import transformers
        from transformers import AutoConfig, AutoProcessor

        if mode not in ("greedy", "probability"):
            raise ScorerConfigError(f"mode must be 'greedy' or 'probability', got {mode!r}")
        self.model_path, self.mode, self.device = str(model_path), mode, torch.device(device)
        self.batch_size, self.max_new_tokens, self.vqascore_keys = batch_size, max_new_tokens, tuple(vqascore_keys)
        self.processor = AutoProcessor.from_pretrained(self.model_path, local_files_only=True)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"  # the reply starts at the last position of every row
        config = AutoConfig.from_pretrained(self.model_path, local_files_only=True)
        architecture = (getattr(config, "architectures", None) or [None])[0]
        model_class = getattr(transformers, architecture, None) if architecture else None
        if model_class is None:
            model_class = getattr(transformers, "AutoModelForImageTextToText", None) or transformers.AutoModelForVision2Seq
        dtype_option = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
        # safetensors only: a pickled pytorch_model.bin is refused, never unpickled
        self.model = model_class.from_pretrained(self.model_path, local_files_only=True, use_safetensors=True, **{dtype_option: dtype})
        self.model = self.model.to(self.device).eval().requires_grad_(False)
        self.yes_ids, self.no_ids = self.single_tokens(yes_words), self.single_tokens(no_words)
        self.vqascore_answer_id = self.single_tokens([VQASCORE_ANSWER])[0]
        eos = self.model.generation_config.eos_token_id
        self.end_ids = set(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
        self.end_ids.add(self.tokenizer.eos_token_id)

    def single_tokens(self, words: Sequence[str]) -> list[int]:
        ids = []
        for word in words:
            tokens = self.tokenizer.encode(word, add_special_tokens=False)
            if len(tokens) != 1:
                raise ScorerConfigError(f"{self.model_path}: {word!r} is not a single token ({tokens}); pass other words")
            ids.append(tokens[0])
        return ids

    def inputs(self, pil: Sequence[Image.Image], texts: Sequence[str]):
        chats = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": t}]}],
            tokenize=False, add_generation_prompt=True) for t in texts]
        chats = [c[0] if isinstance(c, list) else c for c in chats]
        batch = self.processor(text=chats, images=list(pil), padding=True, return_tensors="pt")
        return batch.to(self.device)

    def first_token_probs(self, pil, texts) -> torch.Tensor:
        """(B, V) softmax of the first reply token."""
        logits = self.model(**self.inputs(pil, texts)).logits[:, -1].float()
        return torch.softmax(logits, dim=-1)

    def greedy_yes(self, pil, texts) -> torch.Tensor:
        batch = self.inputs(pil, texts)
        out = self.model.generate(**batch, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=self.tokenizer.pad_token_id)
        answers = []
        for row in out[:, batch["input_ids"].shape[1]:].tolist():
            ends = [i for i, t in enumerate(row) if t in self.end_ids]
            reply = self.tokenizer.decode(row[: ends[0]] if ends else row, skip_special_tokens=True)
            answers.append(float(is_yes(reply)))
        return torch.tensor(answers)

    @torch.no_grad()
    def answer(self, images: Images, prompts: Sequence[str], questions: Sequence[Question]) -> torch.Tensor:
        check_batch(images, prompts)
        pil = [Image.fromarray(a) for a in as_uint8_arrays(images)]
        out = torch.zeros(len(pil), len(questions))
        for j, q in enumerate(questions):
            for i in range(0, len(pil), self.batch_size):
                ims = pil[i : i + self.batch_size]
                texts = [question_text(q, p) for p in prompts[i : i + self.batch_size]]
                if q.key in self.vqascore_keys:
                    value = self.first_token_probs(ims, texts)[:, self.vqascore_answer_id]
                elif self.mode == "probability":
                    probs = self.first_token_probs(ims, texts)
                    yes, no = probs[:, self.yes_ids].sum(-1), probs[:, self.no_ids].sum(-1)
                    value = yes / (yes + no)
                else:
                    value = self.greedy_yes(ims, texts)
                out[i : i + len(ims), j] = value.cpu()
        return out


class VisionRewardScorer(ChecklistScorer):
    """The VisionReward checklist over a `YesNoBackend`. Unless the backend is the official CogVLM2 (which this
    package does not load), its scores are VisionReward-style: ``description`` says which backend answered."""

    def __init__(self, backend, temperature: float = 1.0):
        super().__init__("visionreward", visionreward_checklist(), backend, temperature)

    @property
    def description(self) -> dict:
        path = getattr(self.backend, "model_path", None)
        return {
            "variant": "VisionReward-style (official checklist and weights; not the official CogVLM2 VisionReward model)",
            "backend": f"{type(self.backend).__name__}({path}, mode={getattr(self.backend, 'mode', None)})",
            "alignment": (f"stand-in for VQAScore clip-flant5-xxl: p({VQASCORE_ANSWER!r}) from {path} asked "
                          f"{VQASCORE_QUESTION!r}") if path else "as the backend answers it",
        }


def visionreward_scorer(model_path: str | Path, mode: str = "greedy", temperature: float = 1.0,
                        **backend_options) -> VisionRewardScorer:
    """A VisionReward-style scorer: the official checklist answered by the VLM at ``model_path`` (`VLMYesNoBackend`
    options pass through). ``prefer`` is Bradley–Terry on the overall score at ``temperature``, uncalibrated."""
    return VisionRewardScorer(VLMYesNoBackend(model_path, mode=mode, **backend_options), temperature)
