"""How each TFDS benchmark becomes a Task: its prompt, target, answer format and cloze form.

Prompts, targets, stop sequences and answer extraction follow lm-evaluation-harness so numbers
compare (docs/benchmarks.md lists each template and the lm-eval task it mirrors). Multiple-choice
tasks answer with the choice letter (lm-eval's generative MMLU form), keep ``choices_field`` for the
MCF reference, and carry lm-eval's cloze form (`spt_jax.tasks.lm_eval_forms`) for the CF references.
"""

from __future__ import annotations

from collections.abc import Mapping

from spt_jax.tasks import lm_eval_forms as forms
from spt_jax.tasks import mmlu as mmlu_builder
from spt_jax.tasks.answers import LETTERS, AnswerSpec, FormatSpec
from spt_jax.tasks.task import ClozeSpec, FewShotForm, Task


def _mc_format(n_choices: int) -> FormatSpec:
    # lm-eval's generative MMLU: first line, whitespace stripped, exact match ignoring case and
    # punctuation -- so the answer is one letter, optionally wrapped in punctuation ('B', 'B.', '(B)').
    return FormatSpec(pattern=rf"[^\w\s]*(?P<answer>[A-{LETTERS[n_choices - 1]}])[^\w\s]*", mode="strict",
                      stop_sequences=("\n",), ignore_case=True)


def multiple_choice_task(name: str, source, *, question_prefix: str, n_choices: int, instruction: str,
                         split_names: Mapping[str, str], description: str, cloze: ClozeSpec,
                         lm_eval: FewShotForm = FewShotForm()) -> Task:
    """A letter-answer multiple-choice task: '<prefix><question>\\nA. ...\\nB. ...\\nAnswer:' -> ' B',
    with lm-eval's cloze form of the benchmark for the CF references."""
    return Task(
        name=name, source=source, cloze=cloze, lm_eval=lm_eval,
        input_template=question_prefix + "{question}\n{choices_text}\nAnswer:",
        target_template=" {answer}",
        format=_mc_format(n_choices),
        answer=AnswerSpec(kind="choice"),
        instruction=instruction,
        choices_field="choices",
        max_new_tokens=4,
        split_names=split_names,
        description=description,
    )


def _mc_instruction(topic: str) -> str:
    # The sentence lm-eval's MMLU puts before its questions, with this benchmark's topic.
    return f"The following are multiple choice questions (with answers) about {topic}."


def arc_task(name, source, split_names, description):
    return multiple_choice_task(name, source, question_prefix="Question: ", n_choices=5,
                                instruction=_mc_instruction("science"), split_names=split_names,
                                description=description, cloze=forms.QUESTION_ANSWER)


def gsm8k_task(name, source, split_names, description):
    return Task(
        name=name, source=source,
        input_template="Question: {question}\nAnswer:",
        target_template=" {reasoning}#### {answer}",
        # lm-eval gsm8k "strict-match": the first '#### <number>' anywhere in the output.
        format=FormatSpec(pattern=r"#### (?P<answer>\-?[0-9\.\,]+)", mode="first",
                          stop_sequences=("Question:", "</s>", "<|im_end|>")),
        answer=AnswerSpec(kind="number"),
        instruction=("Solve each grade school math problem. Reason step by step, then give the final "
                     "answer on its own line as '#### <number>'."),
        max_new_tokens=256,
        split_names=split_names,
        description=description,
    )


def boolq_task(name, source, split_names, description):
    return Task(
        name=name, source=source,
        input_template="{passage}\nQuestion: {question}?\nAnswer:",
        target_template=" {answer}",
        format=FormatSpec(pattern=r"[^\w\s]*(?P<answer>yes|no)[^\w\s]*", mode="strict",
                          stop_sequences=("\n",), ignore_case=True),
        answer=AnswerSpec(kind="yesno"),
        instruction="Read each passage and answer the question about it with yes or no.",
        max_new_tokens=4,
        split_names=split_names,
        description=description,
    )


def triviaqa_task(name, source, split_names, description):
    return Task(
        name=name, source=source,
        input_template="Question: {question}?\nAnswer:",
        target_template=" {answer}",
        # lm-eval triviaqa: generation stops at a newline, '.' or ','; the rest, whitespace-stripped,
        # must equal an alias (case and punctuation ignored).
        format=FormatSpec(pattern=r"(?P<answer>.+)", mode="strict", stop_sequences=("\n", ".", ",")),
        answer=AnswerSpec(kind="string", aliases_field="aliases"),
        instruction="Answer each trivia question with a short answer: a name, a word or a number.",
        max_new_tokens=32,
        split_names=split_names,
        description=description,
    )


def hellaswag_task(name, source, split_names, description):
    return multiple_choice_task(name, source, question_prefix="", n_choices=4,
                                instruction=_mc_instruction("how a described situation continues"),
                                split_names=split_names, description=description, cloze=forms.BARE_QUESTION)


def piqa_task(name, source, split_names, description):
    return multiple_choice_task(name, source, question_prefix="Question: ", n_choices=2,
                                instruction=_mc_instruction("physical commonsense"),
                                split_names=split_names, description=description, cloze=forms.QUESTION_ANSWER)


def winogrande_task(name, source, split_names, description):
    return multiple_choice_task(name, source, question_prefix="", n_choices=2,
                                instruction=_mc_instruction("which option fills the blank (_) in a sentence"),
                                split_names=split_names, description=description, cloze=forms.WINOGRANDE)


def openbookqa_task(name, source, split_names, description):
    return multiple_choice_task(name, source, question_prefix="", n_choices=4,
                                instruction=_mc_instruction("elementary science"),
                                split_names=split_names, description=description, cloze=forms.BARE_QUESTION)


def mmlu_task(name, source, split_names, description, subject: str | None = None):
    # lm-eval's per-subject description; the all-subjects task shares one prefix, so it names no subject.
    instruction = (_mc_instruction(mmlu_builder.mmlu_subject_title(subject)) if subject
                   else "The following are multiple choice questions (with answers).")
    return multiple_choice_task(name, source, question_prefix="", n_choices=4, instruction=instruction,
                                split_names=split_names, description=description, cloze=forms.QUESTION_ANSWER,
                                lm_eval=FewShotForm(description=instruction + "\n\n", sampler="first_n"))
